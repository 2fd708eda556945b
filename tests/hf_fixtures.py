"""Tiny random Hugging Face checkpoints made locally (nothing downloaded): the transformers model of
a model preset (`tiny_dense`: Qwen2, `tiny_moe`: DeepSeek-V3, `tiny_qwen3(_moe)`) with the config the
checkpoint export writes (`hf_mapping.hf_config`), or of a released config.json (`RELEASED`) shrunk to
CPU size (`make_tiny_released`), plus a word-level tokenizer over its vocabulary, so that vLLM can
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


# config.json of released checkpoints, as published on the Hugging Face Hub (values copied by hand;
# nothing downloaded): each family's reader is tested on the real thing, not on our own export.
RELEASED = {
    "deepseek_v3": {  # deepseek-ai/DeepSeek-V3-Base (auto_map omitted)
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
        "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    },
    "qwen2": {  # Qwen/Qwen2.5-7B
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
        "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
        "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    },
    "llama": {  # meta-llama/Llama-3.1-8B
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
    },
    "qwen3": {  # Qwen/Qwen3-8B
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "qwen3_moe": {  # Qwen/Qwen3-30B-A3B
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
        "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
}
# The preset each released config must equal field by field (r1mega.config.hf.preset_mismatches).
RELEASED_PRESET = {"deepseek_v3": "deepseek_v3_671b", "qwen2": "qwen2.5_7b", "llama": None, "qwen3": "qwen3_8b",
                   "qwen3_moe": "qwen3_30b_a3b"}
_TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
             max_position_embeddings=1024, torch_dtype="float32", bos_token_id=0, eos_token_id=EOS_ID)
TINY = {  # the released configs at CPU size: only sizes change, every structural key stays
    "deepseek_v3": dict(_TINY, num_key_value_heads=4, first_k_dense_replace=1, q_lora_rank=128, qk_nope_head_dim=64,
                        v_head_dim=64, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                        moe_intermediate_size=64, num_nextn_predict_layers=0, max_position_embeddings=163840,
                        quantization_config=None),  # transformers builds neither MTP nor fp8 weights
    "qwen2": dict(_TINY, num_key_value_heads=2, max_window_layers=2, sliding_window=1024),
    "llama": dict(_TINY, num_key_value_heads=2, max_position_embeddings=131072),  # > the llama3 rope's 8,192
    "qwen3": dict(_TINY, num_key_value_heads=2, max_window_layers=2, tie_word_embeddings=True),  # head_dim 128 kept
    "qwen3_moe": dict(_TINY, num_key_value_heads=2, max_window_layers=2, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=128),
}


def tiny_released_config(family: str) -> dict:
    return {k: v for k, v in {**RELEASED[family], **TINY[family]}.items() if v is not None}


def make_tiny_released(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A random transformers checkpoint (+ tokenizer) whose config.json is the released one of
    `family` at CPU size (`TINY`); norms and router biases perturbed so a swapped tensor shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = tiny_released_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(torch.randn_like(t) * 0.02)
    out = Path(out_dir)
    model.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2))  # the released keys, as written
    tiny_tokenizer(config["vocab_size"]).save_pretrained(out)
    return out
