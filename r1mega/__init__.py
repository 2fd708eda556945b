"""r1mega: the DeepSeek-R1 pipeline on Megatron-Core."""
