"""A tiny random Hugging Face model for running the evaluation without a trained checkpoint.

Tokenizer: `r1mega.data.tokenizer.train_tokenizer` on synthetic arithmetic documents plus the
benchmark problems (byte-level, so it encodes any text; the problems make it compress them).
Model: transformers' random init of the preset's `hf_mapping.hf_config`, config.json written by us
(transformers 5 drops keys vLLM needs, as in `tests/hf_fixtures.py`). Built once per preset and
config under `cache_dir`; it scores about 0, which is expected.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from r1mega.checkpoint.hf_mapping import hf_config
from r1mega.config.schema import ArithmeticConfig
from r1mega.data import arithmetic
from r1mega.data.tokenizer import train_tokenizer
from r1mega.eval import benchmarks

NUM_DOCS = 3000
SEED = 0


def _texts() -> list[str]:
    docs = arithmetic.pretraining_corpus(ArithmeticConfig(), NUM_DOCS, SEED)
    problems = [row["problem"] for name in benchmarks.BENCHMARKS for row in benchmarks.load(name)]
    return [prompt + completion for prompt, completion in docs] + problems


def random_model(model_cfg, cache_dir: str | Path) -> Path:
    """The HF directory of a random `model_cfg` (a ModelConfig) with a local tokenizer, cached."""
    config = hf_config(model_cfg)
    key = hashlib.sha256(json.dumps([config, NUM_DOCS, SEED], sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"eval-{model_cfg.name}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tokenizer = train_tokenizer(_texts(), model_cfg.vocab_size)
    config = dict(config, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    try:
        tmp.rename(out)  # atomic: a directory under its final name is complete
    except OSError:  # another process finished the same model first
        shutil.rmtree(tmp)
    return out
