"""Cross-field rules checked before anything is built: one sentence per violation, naming the field."""
from __future__ import annotations

import os

ARCHS = ("deepseek_v3", "qwen2", "llama")
FP8_RECIPES = ("blockwise", "delayed")


class ConfigError(ValueError):
    """A config that cannot run; `problems` holds one sentence per violated rule."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def world_size_of(parallel) -> int:
    if parallel.world_size is not None:
        return parallel.world_size
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def _model_problems(m) -> list[str]:
    p = []
    if m.arch not in ARCHS:
        p.append(f"model.arch={m.arch!r} is not one of {', '.join(ARCHS)}.")
    for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
        if getattr(m, f) <= 0:
            p.append(f"model.{f}={getattr(m, f)} must be positive.")
    if m.multi_latent_attention and m.arch != "deepseek_v3":
        p.append(f"model.multi_latent_attention is only defined for arch deepseek_v3, not {m.arch!r}.")
    if m.num_query_groups and m.num_attention_heads % m.num_query_groups:
        p.append(
            f"model.num_query_groups={m.num_query_groups} does not divide "
            f"model.num_attention_heads={m.num_attention_heads}."
        )
    if m.fp8 is not None and m.fp8 not in FP8_RECIPES:
        p.append(f"model.fp8={m.fp8!r} is not one of {', '.join(FP8_RECIPES)} or null.")
    if m.num_experts:
        if not m.moe_ffn_hidden_size:
            p.append("model.moe_ffn_hidden_size must be set when model.num_experts is set.")
        if m.moe_router_score_function not in ("softmax", "sigmoid"):
            p.append(f"model.moe_router_score_function={m.moe_router_score_function!r} is not softmax or sigmoid.")
        if not 0 < m.moe_router_topk <= m.num_experts:
            p.append(f"model.moe_router_topk={m.moe_router_topk} must be in [1, model.num_experts={m.num_experts}].")
        if not 0 <= m.first_k_dense_layers < m.num_layers:
            p.append(f"model.first_k_dense_layers={m.first_k_dense_layers} must be below model.num_layers={m.num_layers}.")
        g = m.moe_router_num_groups
        if g:
            if m.num_experts % g:
                p.append(f"model.moe_router_num_groups={g} does not divide model.num_experts={m.num_experts}.")
            elif not m.moe_router_group_topk or m.moe_router_group_topk > g:
                p.append(f"model.moe_router_group_topk={m.moe_router_group_topk} must be in [1, model.moe_router_num_groups={g}].")
            elif m.moe_router_topk > m.moe_router_group_topk * (m.num_experts // g):
                p.append(
                    f"model.moe_router_topk={m.moe_router_topk} exceeds the experts in "
                    f"model.moe_router_group_topk={m.moe_router_group_topk} groups."
                )
            elif m.arch == "deepseek_v3" and m.moe_router_topk != 2 * m.moe_router_group_topk:
                # megatron scores a group by its top topk/group_topk experts, HF and vLLM by its top 2.
                p.append(
                    f"model.moe_router_topk={m.moe_router_topk} must be 2 x model.moe_router_group_topk="
                    f"{m.moe_router_group_topk} so megatron routes like the DeepSeek-V3 HF/vLLM models."
                )
    return p


def _parallel_problems(m, par, world: int) -> list[str]:
    p = []
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    ep, etp = par.expert_model_parallel_size, par.expert_tensor_parallel_size
    for f in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
              "expert_model_parallel_size", "expert_tensor_parallel_size"):
        if getattr(par, f) < 1:
            return [f"parallel.{f}={getattr(par, f)} must be at least 1."]
    if m.num_attention_heads % tp:
        p.append(
            f"parallel.tensor_model_parallel_size={tp} does not divide model.num_attention_heads={m.num_attention_heads}."
        )
    if world % (tp * pp * cp):
        p.append(
            f"parallel.world_size={world} is not divisible by tensor x pipeline x context parallel = "
            f"{tp}x{pp}x{cp} = {tp * pp * cp}."
        )
    if m.num_query_groups and m.num_query_groups % tp:
        p.append(f"parallel.tensor_model_parallel_size={tp} does not divide model.num_query_groups={m.num_query_groups}.")
    if m.vocab_size % tp:
        p.append(f"parallel.tensor_model_parallel_size={tp} does not divide model.vocab_size={m.vocab_size}.")
    if m.ffn_hidden_size % tp:
        p.append(f"parallel.tensor_model_parallel_size={tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}.")
    if m.num_experts:
        if m.num_experts % ep:
            p.append(f"parallel.expert_model_parallel_size={ep} does not divide model.num_experts={m.num_experts}.")
        if world % (ep * etp * pp):
            p.append(
                f"parallel.world_size={world} is not divisible by expert x expert-tensor x pipeline parallel = "
                f"{ep}x{etp}x{pp}."
            )
        if m.moe_ffn_hidden_size and m.moe_ffn_hidden_size % etp:
            p.append(
                f"parallel.expert_tensor_parallel_size={etp} does not divide model.moe_ffn_hidden_size={m.moe_ffn_hidden_size}."
            )
        if tp > 1 and not par.sequence_parallel:
            p.append("parallel.sequence_parallel must be true when tensor parallelism is used with MoE (megatron-core requires it).")
    elif ep > 1:
        p.append(f"parallel.expert_model_parallel_size={ep} needs a MoE model, but model.num_experts is unset.")
    p += _pipeline_problems(m, par)
    return p


def _pipeline_problems(m, par) -> list[str]:
    pp, vpp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size or 1
    first, last = par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
    layers, stages = m.num_layers, pp
    if first is not None or last is not None:
        if pp < 2:
            return ["parallel.num_layers_in_first/last_pipeline_stage need pipeline_model_parallel_size >= 2."]
        for v in (first, last):
            if v is not None:
                layers, stages = layers - v, stages - 1
        if layers < 0 or (stages == 0 and layers != 0):
            return [f"parallel.num_layers_in_first/last_pipeline_stage add up to more than model.num_layers={m.num_layers}."]
    if stages and layers % (stages * vpp):
        return [
            f"parallel.pipeline_model_parallel_size={pp} (x virtual {vpp}) does not divide the "
            f"{layers} layers of model.num_layers={m.num_layers} left to split evenly."
        ]
    return []


def _platform_problems(m, par, plat) -> list[str]:
    p = []
    if plat.device not in ("cpu", "cuda"):
        p.append(f"platform.device={plat.device!r} is not cpu or cuda.")
    if plat.device == "cpu":
        if plat.backend != "gloo":
            p.append(f"platform.backend={plat.backend!r} cannot run on CPU; use gloo.")
        if plat.transformer_engine:
            p.append("platform.transformer_engine=true needs platform.device=cuda.")
        if m.fp8 is not None:
            p.append(f"model.fp8={m.fp8!r} needs Transformer Engine on a GPU; set model.fp8=null on platform.device=cpu.")
        if par.expert_tensor_parallel_size > 1:
            p.append("parallel.expert_tensor_parallel_size > 1 fails under gloo (uneven all_gather); keep it 1 on CPU.")
    if m.fp8 is not None and not plat.transformer_engine:
        p.append(f"model.fp8={m.fp8!r} needs platform.transformer_engine=true.")
    return p


def _input_problems(cfg) -> list[str]:
    """Files a run reads: the prompt files of `data`, the base model directory of an RL recipe."""
    from pathlib import Path

    from r1mega.data.prompts import data_dir

    p = []
    data = getattr(cfg, "data", None)
    if data is not None and data.source not in ("arithmetic", "jsonl"):
        p.append(f"data.source={data.source!r} is not one of arithmetic, jsonl.")
    if data is not None and data.source == "jsonl":
        for key in ("train_file", "eval_file"):
            name = data.get(key)
            path = None if name is None else (Path(name) if Path(name).is_absolute() else data_dir(data) / name)
            if path is None or not path.is_file():
                p.append(f"data.{key}={name!r} is not a file (looked in {path or data_dir(data)}).")
    base = getattr(getattr(cfg, "recipe", None), "base", "embedded")  # the planner's config has no recipe
    if base != "embedded" and not (Path(base) / "config.json").is_file():
        p.append(f"recipe.base={base!r} is not a Hugging Face model directory (no config.json there).")
    return p


def validate(cfg) -> None:
    """Raise `ConfigError` listing every rule `cfg` breaks; return None when it can run."""
    problems = _model_problems(cfg.model)
    if not problems:
        problems = _parallel_problems(cfg.model, cfg.parallel, world_size_of(cfg.parallel))
    problems += _platform_problems(cfg.model, cfg.parallel, cfg.platform)
    problems += _input_problems(cfg)
    if problems:
        raise ConfigError(problems)
