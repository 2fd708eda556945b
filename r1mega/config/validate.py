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
    pipeline = _pipeline_problems(m, par)
    return p + pipeline + _recompute_problems(m, par, chunks_known=not pipeline)


RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def _model_chunks(m, par) -> list[int]:
    """Layers of each model chunk (pipeline stage, or virtual stage), as megatron-core splits them."""
    pp, vpp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size or 1
    first, last = par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
    mids = pp - (first is not None) - (last is not None)
    each = (m.num_layers - (first or 0) - (last or 0)) // mids if mids else 0
    stages = [first] * (first is not None) + [each] * mids + [last] * (last is not None)
    return [s // vpp for s in stages]


def _recompute_problems(m, par, chunks_known: bool) -> list[str]:
    """Activation recompute, by megatron-core's TransformerConfig rules (and where its uniform
    chunking would index past a chunk's last layer)."""
    g = getattr(par, "recompute_granularity", None)  # the planner's candidate layouts have none
    method, n = getattr(par, "recompute_method", None), getattr(par, "recompute_num_layers", None)
    if g is None:
        if method is not None or n is not None:
            return [f"parallel.recompute_method={method} / parallel.recompute_num_layers={n} have no effect "
                    f"while parallel.recompute_granularity is null; set it to full or clear them."]
        return []
    if g not in RECOMPUTE_GRANULARITIES:
        return [f"parallel.recompute_granularity={g!r} is not one of {', '.join(RECOMPUTE_GRANULARITIES)} or null."]
    if g == "selective":
        if method is not None or n is not None:
            return ["parallel.recompute_granularity=selective recomputes core attention in every layer; "
                    "parallel.recompute_method and parallel.recompute_num_layers must be null with it."]
        return []
    if method not in RECOMPUTE_METHODS:
        return [f"parallel.recompute_method={method!r} must be one of {', '.join(RECOMPUTE_METHODS)} "
                f"when parallel.recompute_granularity=full."]
    if n is None or n < 1:
        return [f"parallel.recompute_num_layers={n} must be at least 1 when parallel.recompute_granularity=full."]
    if method == "uniform" and chunks_known:
        bad = sorted({c for c in _model_chunks(m, par) if c % n})
        if bad:
            return [f"parallel.recompute_num_layers={n} does not divide the {', '.join(map(str, bad))} layers of "
                    f"some pipeline stages (parallel.recompute_method=uniform checkpoints chunks of that many "
                    f"layers of a stage); use a divisor of every stage's layers or recompute_method=block."]
    return []


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


def _schedule_points(r, algo) -> list[tuple[int, str]]:
    """(response limit, where it comes from) at every point of an RL recipe's length schedule that
    the run reaches: entry K applies from rollout K // (optimizer steps per rollout) on."""
    per = int(algo.num_mini_batches) * int(algo.ppo_epochs) if algo is not None else 1
    pts = [(int(r.max_response_tokens), "")]
    for k, v in sorted((int(k), int(v)) for k, v in (getattr(r, "response_length_schedule", None) or {}).items()):
        if k // max(per, 1) < getattr(r, "rollouts", k // max(per, 1) + 1):
            pts.append((v, f" (from response_length_schedule at optimizer step {k})"))
    return pts


def _rl_problems(r, where: str, algo, rollout, model, dropped_at: str) -> list[str]:
    """Lengths and step units of one GRPO run (`recipe`, or a stage `recipe.rl_reasoning`)."""
    p = []
    prompt = int(r.max_prompt_tokens)
    resp, origin = max(_schedule_points(r, algo), key=lambda t: t[0])
    total = prompt + resp
    head = f"{where}.max_prompt_tokens={prompt} + {where}.max_response_tokens={resp}{origin} = {total}"
    if total > rollout.max_model_len:
        p.append(f"{head} exceeds rollout.max_model_len={rollout.max_model_len}; raise rollout.max_model_len "
                 f"or shorten the responses.")
    if total > r.train_max_tokens:
        p.append(f"{head} exceeds {where}.train_max_tokens={r.train_max_tokens} (tokens per training microbatch; "
                 f"a longer sample would {dropped_at}); raise {where}.train_max_tokens or shorten the responses.")
    ev = getattr(r, "eval", None)
    if ev is not None and prompt + ev.max_tokens > rollout.max_model_len:
        p.append(f"{where}.max_prompt_tokens={prompt} + {where}.eval.max_tokens={ev.max_tokens} = "
                 f"{prompt + ev.max_tokens} exceeds rollout.max_model_len={rollout.max_model_len}; the engine "
                 f"would skip the longest eval prompts; raise rollout.max_model_len or lower {where}.eval.max_tokens.")
    for k in (getattr(r, "response_length_schedule", None) or {}):
        if int(k) < 0:
            p.append(f"{where}.response_length_schedule has key {k}: keys are optimizer steps, >= 0.")
    for f in ("rollouts", "prompts_per_rollout"):
        if getattr(r, f, 1) < 1:
            p.append(f"{where}.{f}={getattr(r, f)} must be at least 1.")
    if algo is not None:
        per = int(algo.num_mini_batches) * int(algo.ppo_epochs)
        every = algo.get("ref_update_optimizer_steps") if hasattr(algo, "get") else algo.ref_update_optimizer_steps
        if every is not None and (every < 1 or every % per):
            p.append(f"algorithm.ref_update_optimizer_steps={every} must be a positive multiple of the optimizer "
                     f"steps per rollout, algorithm.num_mini_batches x ppo_epochs = {algo.num_mini_batches}x"
                     f"{algo.ppo_epochs} = {per}{f' (in {where})' if where != 'recipe' else ''}.")
    return p


def _length_problems(cfg) -> list[str]:
    """Lengths an engine or the trainer would silently clamp, skip or overrun: prompt + response
    against vLLM's `max_model_len` and the training microbatch, and `max_model_len` against the
    model's positions (vLLM refuses a longer context than the HF config's max_position_embeddings).
    Packed training restarts positions per sequence, so `train_max_tokens` itself is not bounded by
    the model's positions; one sample is (through `max_model_len`)."""
    from omegaconf import OmegaConf

    r, rollout, model = getattr(cfg, "recipe", None), getattr(cfg, "rollout", None), cfg.model
    if r is None or rollout is None or getattr(r, "name", "none") == "none":  # the planner's config; recipe=none
        return []
    p = []
    if rollout.max_model_len > model.max_position_embeddings:
        p.append(f"rollout.max_model_len={rollout.max_model_len} exceeds model.max_position_embeddings="
                 f"{model.max_position_embeddings}; vLLM refuses a longer context than the model's positions.")
    algo = getattr(cfg, "algorithm", None)
    if hasattr(r, "prompts_per_rollout"):  # recipe=r1_zero (an RLRecipeConfig)
        p += _rl_problems(r, "recipe", algo, rollout, model, "still form its own, larger microbatch")
    for stage in ("rl_reasoning", "rl_all"):  # recipe=r1's GRPO stages, their algorithm merged for the stage
        st = getattr(r, stage, None)
        if st is not None:
            st_algo = OmegaConf.merge(algo, st.algorithm) if algo is not None and OmegaConf.is_config(algo) else algo
            p += _rl_problems(st, f"recipe.{stage}", st_algo, rollout, model, "still form its own, larger microbatch")
    # Sampling without a prompt limit of its own (rejection sampling, distillation, final evals): the
    # engine skips every prompt that does not leave `max_tokens`; the RL stages' prompt limit is the budget.
    budget = getattr(getattr(r, "rl_reasoning", None), "max_prompt_tokens", 1)
    for name, node in (("recipe.rejection_sft.rejection", getattr(getattr(r, "rejection_sft", None), "rejection", None)),
                       ("recipe.generate", getattr(r, "generate", None)),
                       ("recipe.eval", getattr(r, "eval", None) if not hasattr(r, "prompts_per_rollout") else None)):
        if node is not None and budget + node.max_tokens > rollout.max_model_len:
            what = (f"recipe.rl_reasoning.max_prompt_tokens={budget} + {name}.max_tokens={node.max_tokens} = "
                    f"{budget + node.max_tokens}" if budget > 1 else f"{name}.max_tokens={node.max_tokens} (+ a prompt)")
            p.append(f"{what} exceeds rollout.max_model_len={rollout.max_model_len}; the engine would skip those "
                     f"prompts; raise rollout.max_model_len or lower {name}.max_tokens.")
    # Rejection-sampled rows become SFT samples of prompt + response tokens; rows_to_samples drops
    # longer ones, i.e. exactly the longest accepted reasoning.
    rej_sft = getattr(r, "rejection_sft", None)
    if rej_sft is not None and budget > 1 and budget + rej_sft.rejection.max_tokens > rej_sft.sft.max_tokens:
        p.append(f"recipe.rejection_sft.sft.max_tokens={rej_sft.sft.max_tokens} is below recipe.rl_reasoning."
                 f"max_prompt_tokens={budget} + recipe.rejection_sft.rejection.max_tokens="
                 f"{rej_sft.rejection.max_tokens} = {budget + rej_sft.rejection.max_tokens}, so the SFT stage would "
                 f"drop the longest accepted samples; raise recipe.rejection_sft.sft.max_tokens or lower "
                 f"recipe.rejection_sft.rejection.max_tokens.")
    # SFT and pretraining pack samples of up to `max_tokens`; positions past the model's are never served.
    sfts = [("recipe.pretrain", getattr(r, "pretrain", None) if getattr(r, "base", "") == "embedded" else None),
            ("recipe.cold_start.sft", getattr(getattr(r, "cold_start", None), "sft", None)),
            ("recipe.rejection_sft.sft", getattr(getattr(r, "rejection_sft", None), "sft", None)),
            ("recipe.sft", getattr(r, "sft", None))]
    for name, node in sfts:
        if node is not None and node.max_tokens > model.max_position_embeddings:
            p.append(f"{name}.max_tokens={node.max_tokens} exceeds model.max_position_embeddings="
                     f"{model.max_position_embeddings}; samples that long would train positions the model does "
                     f"not have; lower {name}.max_tokens.")
    return p


def _mtp_problems(cfg) -> list[str]:
    """Multi-token prediction: depth and loss weights are non-negative."""
    algo = getattr(cfg, "algorithm", None)
    fields = [("model.mtp_num_layers", cfg.model.mtp_num_layers),
              ("model.mtp_loss_scaling_factor", getattr(cfg.model, "mtp_loss_scaling_factor", 0.0)),
              ("algorithm.mtp_loss_coef", getattr(algo, "mtp_loss_coef", 0.0))]
    return [f"{name}={value} must be non-negative." for name, value in fields if value < 0]


def validate(cfg) -> None:
    """Raise `ConfigError` listing every rule `cfg` breaks; return None when it can run."""
    problems = _model_problems(cfg.model) + _mtp_problems(cfg)
    if not problems:
        problems = _parallel_problems(cfg.model, cfg.parallel, world_size_of(cfg.parallel))
    problems += _platform_problems(cfg.model, cfg.parallel, cfg.platform)
    problems += _input_problems(cfg)
    problems += _length_problems(cfg)
    if problems:
        raise ConfigError(problems)
