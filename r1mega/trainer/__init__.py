"""Training: the megatron-core engine (model chunks + optimizer) and the loops built on it."""
