"""Platform adapters: `cpu` holds every megatron-core patch needed without a GPU, applied only on CPU."""
