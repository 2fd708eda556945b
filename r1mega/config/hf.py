"""`model=hf`: the `ModelConfig` of a Hugging Face directory, read from its `config.json`.

Families (HF `model_type` -> `arch`): `deepseek_v3` (the released config, FP8 `quantization_config`,
YaRN `rope_scaling`, `num_nextn_predict_layers`), `qwen2` (Qwen2 / Qwen2.5), `llama` (Llama-3, and
Llama-3.1's `rope_scaling` type `llama3`), `qwen3` and `qwen3_moe` (arch `qwen3`). Every key of
config.json is mapped onto a field, checked to hold a value r1mega computes the same way, or known
not to change the model's forward pass (token ids, cache and dtype settings); anything else (an
unknown `model_type`, a sliding window, an unknown rope type, a key this reader does not know) is
refused with its name.

`conf/model/hf.yaml` sets every derived field to `${hf:<field>}`: this module's resolver reads
`<model.hf_dir>/config.json` (default: `recipe.base`) when the field is first used, so the Hydra
run and `r1mega.config.compose` see the same model; an explicit `model.<field>=` still overrides.
`r1mega.config.validate` reports a directory that cannot be read, and a preset that disagrees with
`recipe.base`'s config.json (`preset_mismatches`), before any model is built. JSON only: importing
this module loads neither torch nor transformers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# HF model_type -> ModelConfig.arch
FAMILIES = {"deepseek_v3": "deepseek_v3", "qwen2": "qwen2", "llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3"}
# Keys that do not change the forward pass (ids, generation/cache flags, bookkeeping, init, dtype).
NEUTRAL = {
    "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "transformers_version",
    "use_cache", "torch_dtype", "dtype", "_name_or_path", "attention_dropout", "initializer_range",
    "max_position_embeddings", "model_type", "tie_word_embeddings", "output_router_logits",
    "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "ep_size", "pretraining_tp", "head_dim",
    "num_key_value_heads", "max_window_layers", "sliding_window", "use_sliding_window", "layer_types",
    "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps", "hidden_act", "vocab_size", "hidden_size",
    "intermediate_size", "num_hidden_layers", "num_attention_heads", "id2label", "label2id", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "tokenizer_class", "task_specific_params",
    "problem_type", "is_encoder_decoder", "chunk_size_feed_forward", "tf_legacy_loss", "use_bfloat16",
    "decoder_start_token_id", "sep_token_id", "prefix", "finetuning_task", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "is_decoder", "pruned_heads",
}
FAMILY_KEYS = {
    "deepseek_v3": {
        "attention_bias", "first_k_dense_replace", "kv_lora_rank", "moe_intermediate_size", "moe_layer_freq",
        "n_group", "n_routed_experts", "n_shared_experts", "norm_topk_prob", "num_experts_per_tok",
        "num_nextn_predict_layers", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "quantization_config",
        "routed_scaling_factor", "scoring_func", "topk_group", "topk_method", "v_head_dim", "rope_interleave",
        "qk_head_dim",  # transformers 5: qk_nope_head_dim + qk_rope_head_dim
    },
    "qwen2": set(),
    "llama": {"attention_bias", "mlp_bias"},
    "qwen3": {"attention_bias"},
    "qwen3_moe": {"attention_bias", "decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size",
                  "norm_topk_prob", "num_experts", "num_local_experts", "num_experts_per_tok",
                  "shared_expert_intermediate_size"},  # num_local_experts: transformers 5's name
}
# Fields that decide the maths (shapes, numerics); `preset_mismatches` compares these.
COMPARED = (
    "arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "vocab_size", "rotary_base", "norm_epsilon", "untie_embeddings_and_output_weights", "add_qkv_bias",
    "qk_layernorm", "multi_latent_attention", "rope_type", "mtp_num_layers",
)
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
ROPE_FIELDS = {"yarn": ("rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                        "mscale_all_dim"),
               "llama3": ("rotary_scaling_factor", "original_max_position_embeddings")}
MOE_FIELDS = (
    "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_topk",
    "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_topk_scaling_factor", "moe_router_pre_softmax", "first_k_dense_layers",
)
# megatron-core's llama3 rope scaling (RotaryEmbedding._apply_scaling) fixes these three.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class HFConfigError(ValueError):
    """A config.json r1mega cannot map; `problems` holds one sentence per refused key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def read_config(path) -> dict:
    """The parsed `<path>/config.json`; HFConfigError names the file when it is missing or not JSON."""
    f = Path(str(path)) / "config.json"
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise HFConfigError([f"{path} is not a Hugging Face model directory (no config.json there)."]) from None
    except (OSError, ValueError) as e:
        raise HFConfigError([f"{f} cannot be read: {e}."]) from None


def _rope(c: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling or None): transformers 5 writes `rope_parameters` (theta inside)."""
    params = dict(c.get("rope_parameters") or {})
    scaling = dict(c.get("rope_scaling") or {}) or {k: v for k, v in params.items() if k != "rope_theta"}
    theta = c.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), (None if kind == "default" else dict(scaling, rope_type=kind))


def model_fields(c: dict, source: str = "config.json") -> dict:
    """ModelConfig fields of HF config `c` (`source` names it in messages). Raises HFConfigError
    listing every key it cannot map, or naming a required key that is missing."""
    try:
        return _model_fields(c, source)
    except KeyError as e:
        raise HFConfigError([f"{source}: no {e.args[0]!r} key, which model_type={c.get('model_type')!r} "
                             f"requires."]) from None


def _model_fields(c: dict, source: str) -> dict:
    mt = c.get("model_type")
    if mt not in FAMILIES:
        raise HFConfigError([f"{source}: model_type={mt!r} is not supported (supported: {', '.join(FAMILIES)})."])
    p: list[str] = []

    def refuse(key: str, why: str) -> None:
        p.append(f"{source}: {key}={c.get(key)!r} {why}.")

    unknown = sorted(set(c) - NEUTRAL - FAMILY_KEYS[mt])
    p += [f"{source}: key {k!r} (= {c[k]!r}) is not known to r1mega's {mt} reader and may change the model; "
          f"refused rather than ignored." for k in unknown]
    heads = c["num_attention_heads"]
    dtype = c.get("torch_dtype", c.get("dtype", "bfloat16"))
    f = dict(
        name=f"hf_{mt}", arch=FAMILIES[mt], num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
        ffn_hidden_size=c["intermediate_size"], num_attention_heads=heads, vocab_size=c["vocab_size"],
        num_query_groups=c.get("num_key_value_heads", heads), kv_channels=None,
        max_position_embeddings=c.get("max_position_embeddings", 4096), norm_epsilon=c.get("rms_norm_eps", 1e-6),
        untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", False),
        add_qkv_bias=mt == "qwen2", qk_layernorm=mt in ("qwen3", "qwen3_moe"),
        init_method_std=c.get("initializer_range", 0.02), params_dtype="fp32" if dtype == "float32" else "bf16",
        multi_latent_attention=False, rope_type="rope", mtp_num_layers=0, num_experts=None,
    )
    f["rotary_base"], scaling = _rope(c)
    if c.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "is not supported (r1mega's models use SwiGLU, silu)")
    if mt != "deepseek_v3" and c.get("head_dim") not in (None, c["hidden_size"] // heads):
        f["kv_channels"] = c["head_dim"]
    if c.get("use_sliding_window"):
        refuse("use_sliding_window", "(sliding-window attention) is not supported")
    if any(t != "full_attention" for t in c.get("layer_types") or []):
        p.append(f"{source}: layer_types has {sorted(set(c['layer_types']) - {'full_attention'})} (sliding-window "
                 f"attention) which is not supported.")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            refuse(key, "is not supported (r1mega maps no o_proj / MLP biases)")
    if mt == "deepseek_v3":
        _deepseek_v3(c, f, scaling, source, p, refuse)
    elif scaling is not None:
        if scaling["rope_type"] == "llama3" and mt == "llama":
            bad = {k: scaling.get(k) for k, v in LLAMA3_ROPE.items() if not _same(scaling.get(k), v)}
            if bad:
                p.append(f"{source}: rope_scaling (llama3) has {bad}; megatron-core's llama3 rope scaling supports "
                         f"only {LLAMA3_ROPE}.")
            f.update(rope_type="llama3", rotary_scaling_factor=float(scaling["factor"]),
                     original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))
        else:
            p.append(f"{source}: rope_scaling type {scaling['rope_type']!r} is not supported for {mt} "
                     f"(supported: none{', llama3' if mt == 'llama' else ''}).")
    if mt == "qwen3_moe":
        _qwen3_moe(c, f, source, p, refuse)
    if p:
        raise HFConfigError(p)
    return f


def _deepseek_v3(c, f, scaling, source, p, refuse) -> None:
    if c.get("qk_head_dim", c["qk_nope_head_dim"] + c["qk_rope_head_dim"]) != c["qk_nope_head_dim"] + c["qk_rope_head_dim"]:
        refuse("qk_head_dim", "is not qk_nope_head_dim + qk_rope_head_dim")
    if c.get("q_lora_rank") is None:
        refuse("q_lora_rank", "(no query compression, DeepSeek-V2-Lite) is not supported")
    if c.get("topk_method", "noaux_tc") != "noaux_tc":
        refuse("topk_method", "is not supported (DeepSeek-V3 routes with noaux_tc)")
    if c.get("scoring_func", "sigmoid") != "sigmoid":
        refuse("scoring_func", "is not supported (DeepSeek-V3 scores experts with sigmoid)")
    if not c.get("norm_topk_prob", True):
        refuse("norm_topk_prob", "is not supported (megatron normalises the sigmoid top-k weights)")
    if c.get("moe_layer_freq", 1) != 1:
        refuse("moe_layer_freq", "is not supported (every layer after first_k_dense_replace is MoE)")
    if not c.get("rope_interleave", True):
        refuse("rope_interleave", "is not supported (megatron's MLA reads DeepSeek's interleaved rope rows)")
    q = c.get("quantization_config")
    if q is not None and (q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3"
                          or list(q.get("weight_block_size", [128, 128])) != [128, 128]):
        p.append(f"{source}: quantization_config={q!r} is not supported (only DeepSeek's fp8 e4m3 128x128 block "
                 f"scales, dequantized on import).")
    experts = c["n_routed_experts"]
    f.update(
        multi_latent_attention=True, num_query_groups=None, q_lora_rank=c.get("q_lora_rank"),
        kv_lora_rank=c["kv_lora_rank"], qk_head_dim=c["qk_nope_head_dim"], qk_pos_emb_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"], num_experts=experts, moe_ffn_hidden_size=c["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=(c.get("n_shared_experts") or 0) * c["moe_intermediate_size"] or None,
        moe_router_topk=c["num_experts_per_tok"], moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_num_groups=c.get("n_group") or None,
        moe_router_group_topk=c.get("topk_group") or None,
        moe_router_topk_scaling_factor=float(c.get("routed_scaling_factor", 1.0)), moe_router_pre_softmax=False,
        moe_aux_loss_coeff=float(c.get("aux_loss_alpha", 0.0)),
        moe_router_load_balancing_type="seq_aux_loss" if c.get("seq_aux", True) else "aux_loss",
        first_k_dense_layers=c.get("first_k_dense_replace", 0), mtp_num_layers=c.get("num_nextn_predict_layers", 0),
    )
    if scaling is not None:
        if scaling["rope_type"] != "yarn":
            p.append(f"{source}: rope_scaling type {scaling['rope_type']!r} is not supported for deepseek_v3 "
                     f"(supported: none, yarn).")
        else:
            f.update(rope_type="yarn", rotary_scaling_factor=float(scaling["factor"]),
                     original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                     beta_fast=float(scaling.get("beta_fast", 32)), beta_slow=float(scaling.get("beta_slow", 1)),
                     mscale=float(scaling.get("mscale", 1)), mscale_all_dim=float(scaling.get("mscale_all_dim", 0)))


def _qwen3_moe(c, f, source, p, refuse) -> None:
    layers = c["num_hidden_layers"]
    step, dense = c.get("decoder_sparse_step", 1), sorted(c.get("mlp_only_layers") or [])
    if step != 1:
        refuse("decoder_sparse_step", "is not supported (only 1: every layer not in mlp_only_layers is MoE)")
    if dense != list(range(len(dense))) or len(dense) >= layers:
        refuse("mlp_only_layers", "is not supported (only the first k layers may be dense)")
    if c.get("shared_expert_intermediate_size"):
        refuse("shared_expert_intermediate_size", "is not supported (Qwen3-MoE has no shared expert)")
    f.update(
        num_experts=c["num_experts"] if "num_experts" in c else c["num_local_experts"],
        moe_ffn_hidden_size=c["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=None, moe_router_topk=c["num_experts_per_tok"],
        moe_router_score_function="softmax", moe_router_enable_expert_bias=False, moe_router_num_groups=None,
        moe_router_group_topk=None, moe_router_topk_scaling_factor=None,
        # softmax over the top-k logits = softmax over all renormalised over the top-k (norm_topk_prob)
        moe_router_pre_softmax=not c.get("norm_topk_prob", True),
        moe_aux_loss_coeff=float(c.get("router_aux_loss_coef", 0.0)), moe_router_load_balancing_type="aux_loss",
        first_k_dense_layers=len(dense),
    )


_CACHE: dict[tuple[str, float], dict] = {}


def fields_of_dir(path) -> dict:
    """`model_fields` of `<path>/config.json`, cached by path and modification time."""
    f = Path(str(path)) / "config.json"
    key = (str(f.resolve()), f.stat().st_mtime if f.is_file() else 0.0)
    if key not in _CACHE:
        fields = model_fields(read_config(path), str(f))
        fields["name"] = f"hf_{Path(str(path)).resolve().name}"
        _CACHE[key] = fields
    return _CACHE[key]


def model_dir_of(model, root) -> str | None:
    """The directory a `model=hf` node reads: `model.hf_dir`, else the run's `recipe.base`."""
    path = model.get("hf_dir") if hasattr(model, "get") else getattr(model, "hf_dir", None)
    if path is None and root is not None and hasattr(root, "get") and root.get("recipe") is not None:
        path = root.recipe.get("base")
    return path


def _resolve(field: str, _parent_, _root_):
    path = model_dir_of(_parent_, _root_)
    if path is None:
        raise HFConfigError(["model=hf needs model.hf_dir=<Hugging Face directory> (or recipe.base=<directory>)."])
    fields = fields_of_dir(path)
    if field in fields:
        return fields[field]
    from dataclasses import fields as schema_fields

    from r1mega.config.schema import ModelConfig

    # A field this family does not set (MLA or MoE fields of a dense model): the schema's default.
    return next(f.default for f in schema_fields(ModelConfig) if f.name == field)


def register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("hf"):
        OmegaConf.register_new_resolver("hf", _resolve)


def uses_hf(model) -> bool:
    """Whether a composed model node is `model=hf` (its fields are `${hf:...}` interpolations)."""
    from omegaconf import OmegaConf

    return OmegaConf.is_config(model) and OmegaConf.is_interpolation(model, "arch")


def _norm(f: dict) -> dict:
    """Fields with megatron's defaults spelled out (None query groups = MHA, ...)."""
    g = dict(f)
    g["num_query_groups"] = g.get("num_query_groups") or g["num_attention_heads"]
    g["kv_channels"] = g.get("kv_channels") or g["hidden_size"] // g["num_attention_heads"]
    g["moe_router_topk_scaling_factor"] = g.get("moe_router_topk_scaling_factor") or 1.0
    g["moe_router_num_groups"] = g.get("moe_router_num_groups") or 1
    g["moe_router_group_topk"] = g.get("moe_router_group_topk") or 1
    g["mtp_num_layers"] = g.get("mtp_num_layers") or 0
    return g


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def preset_mismatches(preset: dict, derived: dict) -> list[tuple[str, object, object]]:
    """(field, preset value, config.json value) for every maths-deciding field where a model preset
    and a directory's derived fields differ (MLA, rope scaling and MoE fields where they apply)."""
    a, b = _norm(preset), _norm(derived)
    keys = list(COMPARED)
    if b["multi_latent_attention"] or a["multi_latent_attention"]:
        keys = [k for k in keys if k not in ("num_query_groups", "kv_channels")] + list(MLA_FIELDS)
    keys += ROPE_FIELDS.get(b["rope_type"], ())
    if a.get("num_experts") or b.get("num_experts"):
        keys += MOE_FIELDS
        if not b.get("first_k_dense_layers") and not a.get("first_k_dense_layers"):
            keys.remove("ffn_hidden_size")  # no dense layer uses it
    return [(k, a.get(k), b.get(k)) for k in keys if not _same(a.get(k), b.get(k))]


def mismatch_problem(model, base) -> str | None:
    """One sentence listing every field where preset `model` (a composed ModelConfig) disagrees with
    `<base>/config.json`, or None when they agree. Raises HFConfigError for an unreadable directory."""
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(model, resolve=True) if OmegaConf.is_config(model) else dict(vars(model))
    diff = preset_mismatches(preset, fields_of_dir(base))
    if not diff:
        return None
    listed = "; ".join(f"model.{k}: preset {p!r}, config.json {c!r}" for k, p, c in diff)
    return (f"model={preset.get('name')} disagrees with {Path(str(base)) / 'config.json'} in {len(diff)} field(s): "
            f"{listed} (use model=hf to take the directory's config).")


def with_hf_default(overrides: list[str]) -> list[str]:
    """`overrides` plus `model=hf model.hf_dir=<dir>` when they point `recipe.base` at a directory with
    a config.json and choose no model: the directory's own config is the default model."""
    if any(o.split("=", 1)[0].lstrip("+~") == "model" for o in overrides):
        return list(overrides)
    base = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "recipe.base"), None)
    if base and (Path(base) / "config.json").is_file():
        # First: argparse takes overrides before any flag. hf_dir spelled out: a copy of the model node
        # taken out of the run's config (a stage's reward model, a teacher) still finds its directory.
        return ["model=hf", f"model.hf_dir={base}", *overrides]
    return list(overrides)
