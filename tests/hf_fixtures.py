"""Tiny random Hugging Face checkpoints made locally (nothing downloaded): the transformers model of
a model preset (`tiny_dense`: Qwen2, `tiny_moe`: DeepSeek-V3) with the config the checkpoint export
writes (`hf_mapping.hf_config`), plus a word-level tokenizer over its vocabulary, so that vLLM can
serve the directory."""
from __future__ import annotations

import json
from pathlib import Path

import torch

EOS_ID = 1


def tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer whose token i is the word `t{i}`; ids 0/1 are bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Sequence([])  # tokens are emitted as-is
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token=f"t{EOS_ID}", unk_token="t2", pad_token="t2")


def make_tiny_hf(model_name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a random transformers model for preset `model_name` (+ tokenizer) under `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from r1mega.checkpoint.hf_mapping import hf_config
    from r1mega.config import compose

    m = compose([f"model={model_name}"]).model
    config = dict(hf_config(m), bos_token_id=0, eos_token_id=EOS_ID)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    _randomize_moe_biases(model)
    out = Path(out_dir)
    model.save_pretrained(out)
    # The export's own config.json: transformers 5 drops keys vLLM needs (topk_method, scoring_func).
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tiny_tokenizer(m.vocab_size).save_pretrained(out)
    return out


def _randomize_moe_biases(model) -> None:
    # transformers initializes e_score_correction_bias to zero; a nonzero bias makes a test notice
    # when the router's correction bias is dropped or misnamed.
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.1)
