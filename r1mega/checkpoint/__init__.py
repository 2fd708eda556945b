"""Checkpoints: megatron-core distributed checkpoints (any layout in, any layout out)."""
