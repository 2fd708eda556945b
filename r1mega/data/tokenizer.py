"""A byte-level BPE tokenizer trained locally (no download) for the tiny models.

Digits are split one per token (arithmetic stays learnable), the template's fixed text and the
R1 tags are added tokens, so a prompt costs a handful of tokens. Byte-level means any text,
GSM8K or MATH included, encodes and decodes exactly. Saved as a Hugging Face tokenizer that
vLLM and transformers load from the model directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from r1mega.data import templates

EOS = "<|endoftext|>"
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    fixed = [templates.R1_ZERO_PREFIX, templates.R1_ZERO_SUFFIX, templates.R1_USER, templates.R1_ASSISTANT, *TAGS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(fixed),
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in fixed])
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, more than model.vocab_size={vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, model_max_length=1 << 20)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
