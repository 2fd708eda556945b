"""Prompts and text: dataset files, templates, the synthetic arithmetic task, tokenizer, packing."""
