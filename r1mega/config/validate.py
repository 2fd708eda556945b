"""Cross-field rules checked before anything is built: one sentence per violation, naming the field."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, is_dataclass
from typing import Iterator, Optional

from r1mega.config.algorithm import CORRECTION_MODES, LOSS_AGG
from r1mega.config.reward import ISOLATIONS

ARCHS = ("deepseek_v3", "qwen2", "llama", "qwen3")
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


# -- Ranges: every field of every schema, declared once ------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """The allowed values of one field: a numeric range (`lo`/`hi`, open or closed ends) or a set of
    `choices` (a tuple, or a function returning one, for choices that live in heavier modules).
    None is always allowed here: a field that may not be None is typed without Optional, and
    OmegaConf refuses None for it at composition. `why` is appended to the message in parentheses."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: object = None
    why: str = ""
    text: Optional[str] = None  # the clause of the message; derived from the bounds when None

    def because(self, why: str) -> "Rule":
        return Rule(self.lo, self.hi, self.lo_open, self.hi_open, self.choices, why, self.text)

    def check(self, path: str, v, nullable: bool = False) -> Optional[str]:
        tail = f" ({self.why})." if self.why else "."
        if self.choices is not None:
            choices = self.choices() if callable(self.choices) else self.choices
            if v not in choices:
                return f"{path}={v!r} is not one of {', '.join(map(str, choices))}{' or null' if nullable else ''}{tail}"
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None  # the type is OmegaConf's business
        ok = math.isfinite(v)
        if self.lo is not None:
            ok = ok and (v > self.lo if self.lo_open else v >= self.lo)
        if self.hi is not None:
            ok = ok and (v < self.hi if self.hi_open else v <= self.hi)
        return None if ok else f"{path}={v} {self.text or self._clause()}{tail}"

    def _clause(self) -> str:
        if self.hi is None:
            return f"must be {'above' if self.lo_open else 'at least'} {self.lo}"
        return (f"must be in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}")


def at_least(n: int) -> Rule:
    return Rule(lo=n)


POSITIVE_INT = Rule(lo=1, text="must be positive")  # counts and sizes
POSITIVE = Rule(lo=0, lo_open=True, text="must be positive")  # rates, scales, epsilons
NON_NEGATIVE = Rule(lo=0, text="must be non-negative")
FRACTION = Rule(lo=0, hi=1)  # probabilities, shares
TOP_P = Rule(lo=0, hi=1, lo_open=True)
BETA = Rule(lo=0, hi=1, hi_open=True)  # Adam betas
SEED = NON_NEGATIVE


def one_of(*choices) -> Rule:
    return Rule(choices=choices)


def _benchmarks():
    from r1mega.eval.benchmarks import BENCHMARKS

    return BENCHMARKS


def _scripts():
    from r1mega.rewards.language import SCRIPTS

    return tuple(SCRIPTS)


TEMPLATES = ("r1_zero", "r1")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
_SAMPLING = dict(temperature=POSITIVE.because("sampling needs temperature > 0; at 0 every sample of a prompt is the same"),
                 top_p=TOP_P)
_EVAL = dict(k=POSITIVE_INT, temperature=NON_NEGATIVE, top_p=TOP_P, max_tokens=POSITIVE_INT)
_SCHEDULE = dict(lr=NON_NEGATIVE, min_lr=NON_NEGATIVE, lr_decay_style=one_of(*LR_DECAY_STYLES))
_RL_RUN = dict(rollouts=at_least(1), prompts_per_rollout=at_least(1), max_prompt_tokens=POSITIVE_INT,
               max_response_tokens=POSITIVE_INT, train_max_tokens=POSITIVE_INT, save_every=at_least(1),
               keep_last=at_least(1), template=one_of(*TEMPLATES), **_SAMPLING)

# Schema class name -> {field: rule}. A class gets the rules of its bases too (RLRecipeConfig and
# RLStageConfig those of RLRunConfig); the walk finds each class wherever it sits (EvalConfig under recipe.eval and under
# every RL stage). Names, not classes, so this module imports neither torch nor the recipes.
# tests/test_validation.py checks that every numeric or enumerated field of every schema is here.
RANGES: dict[str, dict[str, Rule]] = {
    "ModelConfig": dict(
        arch=one_of(*ARCHS), num_layers=POSITIVE_INT, hidden_size=POSITIVE_INT, ffn_hidden_size=POSITIVE_INT,
        num_attention_heads=POSITIVE_INT, num_query_groups=POSITIVE_INT, kv_channels=POSITIVE_INT,
        vocab_size=POSITIVE_INT, max_position_embeddings=POSITIVE_INT, rotary_base=POSITIVE, norm_epsilon=POSITIVE,
        init_method_std=POSITIVE, q_lora_rank=POSITIVE_INT, kv_lora_rank=POSITIVE_INT, qk_head_dim=POSITIVE_INT,
        qk_pos_emb_head_dim=POSITIVE_INT, v_head_dim=POSITIVE_INT, rope_type=one_of("rope", "yarn", "llama3"),
        rotary_scaling_factor=POSITIVE, original_max_position_embeddings=POSITIVE_INT, beta_fast=POSITIVE,
        beta_slow=POSITIVE, mscale=NON_NEGATIVE, mscale_all_dim=NON_NEGATIVE, num_experts=POSITIVE_INT,
        moe_ffn_hidden_size=POSITIVE_INT, moe_shared_expert_intermediate_size=POSITIVE_INT,
        moe_router_topk=POSITIVE_INT, moe_router_score_function=one_of("softmax", "sigmoid"),
        moe_router_bias_update_rate=NON_NEGATIVE, moe_router_num_groups=POSITIVE_INT,
        moe_router_group_topk=POSITIVE_INT, moe_router_topk_scaling_factor=POSITIVE, moe_aux_loss_coeff=NON_NEGATIVE,
        moe_router_load_balancing_type=one_of("none", "aux_loss", "seq_aux_loss", "global_aux_loss"),
        first_k_dense_layers=NON_NEGATIVE, mtp_num_layers=NON_NEGATIVE, mtp_loss_scaling_factor=NON_NEGATIVE,
        params_dtype=one_of("fp32", "bf16"), fp8=Rule(choices=FP8_RECIPES, text=None)),
    "ParallelConfig": dict(
        world_size=at_least(1), tensor_model_parallel_size=at_least(1), pipeline_model_parallel_size=at_least(1),
        virtual_pipeline_model_parallel_size=at_least(1), num_layers_in_first_pipeline_stage=NON_NEGATIVE,
        num_layers_in_last_pipeline_stage=NON_NEGATIVE, context_parallel_size=at_least(1),
        expert_model_parallel_size=at_least(1), expert_tensor_parallel_size=at_least(1),
        recompute_granularity=one_of("selective", "full"), recompute_method=one_of("uniform", "block"),
        recompute_num_layers=at_least(1)),
    "PlatformConfig": dict(device=one_of("cpu", "cuda"), backend=one_of("gloo", "nccl"), seed=SEED),
    "RolloutConfig": dict(
        tensor_parallel_size=at_least(1), data_parallel_size=at_least(1),
        dtype=one_of("float32", "bfloat16", "float16", "fp8"), max_model_len=POSITIVE_INT,
        gpu_memory_utilization=Rule(lo=0, hi=1, lo_open=True), kv_cache_space_gb=at_least(1),
        sync_bucket_mb=at_least(1)),
    "OptimConfig": dict(
        weight_decay=NON_NEGATIVE, adam_beta1=BETA, adam_beta2=BETA, adam_eps=POSITIVE,
        clip_grad=NON_NEGATIVE.because("0 turns clipping off"), lr_warmup_steps=NON_NEGATIVE,
        lr_decay_steps=at_least(1), **_SCHEDULE),
    "ArithmeticConfig": dict(max_operand=at_least(1), num_heldout=at_least(1), p_format=FRACTION,
                             p_correct=FRACTION, seed=SEED),
    "DataConfig": dict(source=one_of("arithmetic", "jsonl"), eval_limit=at_least(1)),
    "PretrainConfig": dict(steps=at_least(1), batch_size=at_least(1), max_tokens=POSITIVE_INT, num_docs=at_least(1),
                           lr=NON_NEGATIVE, min_lr=NON_NEGATIVE, warmup_steps=NON_NEGATIVE, tokenizer_docs=at_least(1)),
    "RecordsConfig": dict(every=NON_NEGATIVE.because("rollouts between rollout records; 0 = none"), max_gb=POSITIVE,
                          wandb_every=NON_NEGATIVE.because("rollouts between W&B sample tables; 0 = none")),
    "EvalConfig": dict(every=NON_NEGATIVE.because("rollouts between evals; 0 = only before and after"), **_EVAL),
    "RLRunConfig": dict(_RL_RUN),
    "SFTStageConfig": dict(steps=at_least(1), epochs=at_least(1), batch_size=at_least(1), max_tokens=POSITIVE_INT,
                           warmup_steps=NON_NEGATIVE, save_every=at_least(1), keep_last=at_least(1), **_SCHEDULE),
    "ColdStartConfig": dict(num_examples=at_least(1)),
    "RewardModelTermConfig": dict(weight=Rule(), max_tokens=POSITIVE_INT),
    "MixConfig": dict(num_synthetic=NON_NEGATIVE, ratio=POSITIVE, seed=SEED),
    "RejectionSFTConfig": dict(num_prompts=at_least(1)),
    "RejectionConfig": dict(k=at_least(1), m=at_least(1), max_tokens=POSITIVE_INT, seed=SEED, batch_prompts=at_least(1),
                            min_total=Rule(), max_language_mixing=FRACTION, language=Rule(choices=_scripts),
                            max_paragraph_chars=POSITIVE_INT, **_SAMPLING),
    "R1RecipeConfig": dict(template=one_of(*TEMPLATES)),
    "DistillRecipeConfig": dict(num_prompts=at_least(1), template=one_of(*TEMPLATES)),
    "GRPOConfig": dict(
        group_size=at_least(2).because("GRPO normalises rewards within a group"),
        clip_eps_low=Rule(lo=0, hi=1, hi_open=True).because("the ratio is clipped below at 1 - clip_eps_low"),
        clip_eps_high=NON_NEGATIVE, dual_clip_c=Rule(lo=1, lo_open=True).because("the dual clip bound is c > 1"),
        kl_coef=NON_NEGATIVE, ref_update_optimizer_steps=at_least(1), loss_agg=Rule(choices=LOSS_AGG),
        norm_length=POSITIVE_INT, adv_eps=NON_NEGATIVE, ppo_epochs=at_least(1), num_mini_batches=at_least(1),
        mtp_loss_coef=NON_NEGATIVE, old_logp_source=one_of("trainer", "engine"), router_replay=one_of("auto", "none", "r2", "r3")),
    "RolloutCorrectionConfig": dict(
        mode=Rule(choices=CORRECTION_MODES),
        tis_cap=Rule(lo=1, lo_open=True).because("importance weights are truncated at C > 1"),
        mis_low=Rule(lo=0, hi=1, lo_open=True, hi_open=True).because("the kept ratios [mis_low, mis_high] must contain 1"),
        mis_high=Rule(lo=1, lo_open=True).because("the kept ratios [mis_low, mis_high] must contain 1")),
    "RewardConfig": dict(workers=NON_NEGATIVE.because("0 grades inline"), timeout_s=POSITIVE),
    "TermConfig": dict(weight=Rule()),
    "SandboxConfig": dict(cpu_s=at_least(1), wall_s=POSITIVE, memory_mb=at_least(1), file_mb=at_least(1),
                          nproc=at_least(1), output_kb=at_least(1), isolation=Rule(choices=ISOLATIONS)),
    # The evaluation CLI (`python -m r1mega.eval`, r1mega.eval.config.EvalOptions).
    "EvalOptions": dict(k=POSITIVE_INT, temperature=NON_NEGATIVE, top_p=TOP_P, max_tokens=POSITIVE_INT,
                        limit=at_least(1).because("the first N problems of each benchmark"), template=one_of(*TEMPLATES),
                        seed=SEED, workers=NON_NEGATIVE.because("0 grades inline"), timeout_s=POSITIVE),
    # The planner (`python -m r1mega.plan`, r1mega.plan.schema).
    "ClusterConfig": dict(gpu_memory_gb=POSITIVE, bf16_tflops=POSITIVE, fp8_tflops=POSITIVE, hbm_tbps=POSITIVE,
                          nvlink_gbps=POSITIVE, network_gbps=POSITIVE, pcie_gbps=POSITIVE, gpus_per_node=at_least(1),
                          host_memory_gb=POSITIVE),
    "PlannerConfig": dict(
        seq_length=POSITIVE_INT, prompt_length=POSITIVE_INT, global_batch_size=at_least(1), micro_batch_size=at_least(1),
        optimizer_steps_per_rl_step=at_least(1), recompute=one_of("none", "selective", "full"),
        recompute_method=one_of("uniform", "block"), recompute_num_layers=at_least(1),
        optimizer_offload_fraction=FRACTION, param_bytes=POSITIVE, grad_bytes=POSITIVE, optimizer_bytes=POSITIVE,
        fp8_weight_bytes=POSITIVE, activation_bytes=POSITIVE, fp8_activation_bytes=POSITIVE, logits_bytes=POSITIVE,
        kv_cache_bytes=POSITIVE, reserved_gb=NON_NEGATIVE, rollout_activation_gb=NON_NEGATIVE,
        rollout_max_num_seqs=at_least(1), host_memory_fraction=Rule(lo=0, hi=1, lo_open=True),
        mfu=Rule(lo=0, hi=1, lo_open=True), prefill_mfu=Rule(lo=0, hi=1, lo_open=True),
        decode_mfu=Rule(lo=0, hi=1, lo_open=True), hbm_efficiency=Rule(lo=0, hi=1, lo_open=True),
        comm_efficiency=Rule(lo=0, hi=1, lo_open=True), comm_overlap=FRACTION, collective_latency_us=NON_NEGATIVE,
        sync_efficiency=Rule(lo=0, hi=1, lo_open=True), top_k=at_least(1)),
    "PlanConfig": dict(num_gpus=at_least(1), layout=one_of("given", "best"), rollout_layout=one_of("given", "best"),
                       output=one_of("table", "json", "wandb")),
}


def _schema_of(node):
    """The dataclass a config node was built from (None for plain dicts, lists, SimpleNamespaces)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        t = OmegaConf.get_type(node)
        return t if t is not None and is_dataclass(t) else None
    return type(node) if is_dataclass(node) and not isinstance(node, type) else None


def _items(node) -> Iterator[tuple[str, object]]:
    """(key, value) of a config node or dataclass instance; MISSING values are left out."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        for k in node.keys():
            if not OmegaConf.is_missing(node, k):
                yield str(k), node[k]
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if not OmegaConf.is_missing(node, i):
                yield f"[{i}]", node[i]
    elif is_dataclass(node) and not isinstance(node, type):
        for f in fields(node):
            yield f.name, getattr(node, f.name)


def rules_of(cls) -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for c in reversed(cls.__mro__):
        rules.update(RANGES.get(c.__name__, {}))
    return rules


def range_problems(node, prefix: str = "") -> list[str]:
    """Every field of `node` (a composed config or a schema dataclass instance) and of the schemas
    below it against `RANGES`; one sentence per field out of range, named by its full path."""
    from omegaconf import DictConfig, ListConfig

    cls, p = _schema_of(node), []
    rules = rules_of(cls) if cls is not None else {}
    nullable = {f.name for f in fields(cls) if "Optional" in str(f.type)} if cls is not None else set()
    for key, value in _items(node):
        path = f"{prefix}{key}" if key.startswith("[") or not prefix else f"{prefix}.{key}"
        if isinstance(value, (DictConfig, ListConfig)) or (is_dataclass(value) and not isinstance(value, type)):
            p += range_problems(value, path)
        elif key in rules and value is not None:
            msg = rules[key].check(path, value, key in nullable)
            if msg:
                p.append(msg)
    return p


# -- Rules across fields (the ranges hold when these run) -------------------------------------------------
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


def _preset_problems(path: str, group: str, name) -> list[str]:
    if name is None or os.path.isfile(os.path.join(CONF, group, f"{name}.yaml")):
        return []
    known = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))
    return [f"{path}={name!r} is not a conf/{group} preset (known: {', '.join(known)})."]


def _rollout_correction_problems(algo, where: str, r, run: str) -> list[str]:
    """Sampling temperature 1 wherever the engine's log-probs (reported at temperature 1) meet the
    trainer's (computed at `run`.temperature)."""
    mode, source = algo.rollout_correction.mode, algo.old_logp_source
    temperature = getattr(r, "temperature", 1.0)
    if temperature == 1.0 or (mode == "none" and source != "engine"):
        return []
    what = f"{where}.rollout_correction.mode={mode}" if mode != "none" else f"{where}.old_logp_source=engine"
    return [f"{what} needs {run}.temperature=1.0, not {temperature} (the engine reports log-probs at "
            f"temperature 1, the trainer at the sampling temperature, so their ratio would measure the temperature)."]


def _router_replay_problems(algo, where: str, cfg) -> list[str]:
    """Routing replay needs routers (a MoE model), the pass it replays, and layouts it handles."""
    from omegaconf import OmegaConf

    from r1mega.models.router_replay import router_replay_mode

    mode = router_replay_mode(OmegaConf.merge(cfg, {"algorithm": algo}) if OmegaConf.is_config(cfg) else cfg)
    if mode == "none":
        return []
    at = f"{where}.router_replay={mode}"
    if cfg.model.num_experts is None:
        return [f"{at} replays MoE routing, but model={cfg.model.name} has no experts (model.num_experts is null)."]
    if mode == "r2" and algo.old_logp_source != "trainer":
        return [f"{at} replays the routes of the trainer's old-policy pass, which {where}.old_logp_source="
                f"{algo.old_logp_source} skips; use r3 (the engine's routes) or old_logp_source=trainer."]
    if cfg.parallel.context_parallel_size > 1:
        return [f"{at} is not supported with parallel.context_parallel_size={cfg.parallel.context_parallel_size} "
                f"(routes are not split over context-parallel ranks)."]
    if mode == "r3" and cfg.platform.device == "cpu" and not cfg.rollout.enforce_eager:
        return [f"{at} on CPU records the engine's routes with hooks, which need rollout.enforce_eager=true."]
    return []


def _grpo_problems(algo, where: str, r, run: str) -> list[str]:
    """GRPO knobs against each other and against the run `r` (a recipe or an RL stage) that uses them;
    `where` is where the algorithm's fields are set (`algorithm`, or a stage's merged `algorithm`)."""
    p = _rollout_correction_problems(algo, where, r, run)
    if algo.std_normalize and algo.adv_eps <= 0:
        p.append(f"{where}.adv_eps={algo.adv_eps} must be positive while {where}.std_normalize=true "
                 f"(a group whose rewards are all equal would divide 0 by 0).")
    ppr, mb = int(r.prompts_per_rollout), int(algo.num_mini_batches)
    if ppr % mb:
        p.append(f"{run}.prompts_per_rollout={ppr} does not split into {where}.num_mini_batches={mb} mini-batches of "
                 f"whole groups (each optimizer step trains on an equal share of the rollout's prompts, "
                 f"{where}.group_size={algo.group_size} outputs each); use a multiple of {mb}.")
    return p


def _lr_problems(node, where: str) -> list[str]:
    lr, min_lr = node.get("lr"), node.get("min_lr")
    if lr is not None and min_lr is not None and min_lr > lr:
        return [f"{where}.min_lr={min_lr} must not exceed {where}.lr={lr} (the schedule decays from lr to min_lr)."]
    return []


def _reward_problems(rew, where: str, template: str | None) -> list[str]:
    from r1mega.rewards.compose import term_problems

    p = term_problems(rew, template, where)
    if rew.default_source is not None and rew.default_source not in rew.sources:
        p.append(f"{where}.default_source={rew.default_source!r} is not a key of {where}.sources "
                 f"({', '.join(map(str, rew.sources)) or 'none'}); rows of other sources would find no reward terms.")
    return p


def _stage_overlays(cfg, st, where: str) -> tuple[list[str], dict]:
    """An RL stage's `algorithm`/`optim`/`reward` overlays merged onto the top-level groups (as the stage
    runs them), range-checked where the stage sets a field; returns (problems, merged groups)."""
    from omegaconf import OmegaConf

    p, merged = [], {}
    for group in ("algorithm", "optim", "reward"):
        top, overlay = cfg.get(group), st.get(group)
        if top is None:
            continue
        try:
            merged[group] = OmegaConf.merge(top, overlay) if overlay else top
        except Exception as e:  # an unknown key or a wrong type in the overlay
            msg = str(getattr(e, "msg", None) or e).strip().splitlines()[0]
            p.append(f"{where}.{group}: {msg}")
            continue
        for key in (overlay or {}):
            head = f"{where}.{group}.{key}"
            p += [m for m in range_problems(merged[group], f"{where}.{group}")
                  if m.startswith(head) and m[len(head)] in "=.["]
    return p, merged


def _cross_problems(cfg) -> list[str]:
    """Rules between fields of the composed main config (no-ops on the planner's config)."""
    p = []
    data, algo, r = cfg.get("data"), cfg.get("algorithm"), cfg.get("recipe")
    ar = data.arithmetic if data is not None else None
    if ar is not None and 3 * ar.num_heldout > (ar.max_operand + 1) ** 2:
        p.append(f"data.arithmetic.num_heldout={ar.num_heldout} x 3 (eval, RL and pretraining splits) exceeds the "
                 f"{(ar.max_operand + 1) ** 2} pairs of data.arithmetic.max_operand={ar.max_operand}.")
    if cfg.get("optim") is not None:
        p += _lr_problems(cfg.optim, "optim")
    template = r.get("template") if r is not None else None
    if cfg.get("reward") is not None:
        p += _reward_problems(cfg.reward, "reward", template)
    plat = cfg.get("platform")
    if plat is not None:
        p += _preset_problems("platform.cluster", "cluster", plat.get("cluster"))
    rollout = cfg.get("rollout")
    if r is not None and rollout is not None and rollout.dtype == "fp8":
        p.append("rollout.dtype='fp8' is a planner estimate only; vLLM serves float32, bfloat16 or float16.")
    if r is None:
        return p
    if algo is not None and r.get("prompts_per_rollout") is not None:  # recipe=r1_zero
        p += _grpo_problems(algo, "algorithm", r, "recipe") + _router_replay_problems(algo, "algorithm", cfg)
    for stage in ("rl_reasoning", "rl_all"):  # recipe=r1
        st = r.get(stage)
        if st is None:
            continue
        where = f"recipe.{stage}"
        q, merged = _stage_overlays(cfg, st, where)
        p += q
        if not q and "algorithm" in merged:
            at = f"{where}.algorithm" if st.algorithm else "algorithm"
            p += _grpo_problems(merged["algorithm"], at, st, where) + _router_replay_problems(merged["algorithm"], at, cfg)
        if not q and "optim" in merged and st.optim:
            p += _lr_problems(merged["optim"], f"{where}.optim")
        if not q and "reward" in merged and st.reward:
            p += _reward_problems(merged["reward"], f"{where}.reward", template)
        p += _preset_problems(f"{where}.reward_model.model", "model", st.reward_model.model)
    for name in ("pretrain", "sft", "cold_start.sft", "rejection_sft.sft", "teacher.cold_start.sft"):
        node = r
        for part in name.split("."):
            node = node.get(part) if node is not None else None
        if node is not None:
            p += _lr_problems(node, f"recipe.{name}")
    teacher = r.get("teacher")
    if teacher is not None:
        p += _preset_problems("recipe.teacher.model", "model", teacher.model)
        p += _preset_problems("recipe.teacher.parallel", "parallel", teacher.parallel)
    return p


def _model_problems(m) -> list[str]:
    p = []
    if m.arch not in ARCHS:
        p.append(f"model.arch={m.arch!r} is not one of {', '.join(ARCHS)}.")
    for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
        if getattr(m, f) <= 0:
            p.append(f"model.{f}={getattr(m, f)} must be positive.")
    if m.multi_latent_attention and m.arch != "deepseek_v3":
        p.append(f"model.multi_latent_attention is only defined for arch deepseek_v3, not {m.arch!r}.")
    p += _rope_problems(m)
    if getattr(m, "qk_layernorm", False) and m.multi_latent_attention:
        p.append("model.qk_layernorm is for GQA attention (qwen3); MLA always normalises its latents, set it false.")
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


def _rope_problems(m) -> list[str]:
    """Rope scaling megatron-core applies: YaRN in MLA only, llama3 in GQA only with its fixed
    original length (RotaryEmbedding._apply_scaling: low/high frequency factors 1 and 4, 8,192)."""
    if m.rope_type == "yarn" and not m.multi_latent_attention:
        return ["model.rope_type=yarn needs model.multi_latent_attention=true (megatron-core's GPT rope has no YaRN "
                "for GQA attention here)."]
    if m.rope_type == "llama3":
        if m.multi_latent_attention:
            return ["model.rope_type=llama3 is for GQA attention; MLA supports rope or yarn."]
        if m.original_max_position_embeddings != 8192:
            return [f"model.original_max_position_embeddings={m.original_max_position_embeddings} with "
                    f"model.rope_type=llama3 must be 8192 (megatron-core's llama3 rope scaling fixes it)."]
    return []


def _hf_problems(cfg) -> list[str]:
    """`model=hf`: its directory must be readable and mappable (every refused key, by name); a preset
    with `recipe.base=<HF directory>` must agree with that directory's config.json field by field."""
    from r1mega.config import hf

    model, recipe = cfg.model, getattr(cfg, "recipe", None)
    base = getattr(recipe, "base", "embedded") if recipe is not None else "embedded"
    try:
        if hf.uses_hf(model):
            path = hf.model_dir_of(model, cfg)
            if path is None:
                return ["model=hf needs model.hf_dir=<Hugging Face directory> (or recipe.base=<directory>)."]
            hf.fields_of_dir(path)
        elif base not in ("embedded", "random") and os.path.isfile(os.path.join(str(base), "config.json")):
            problem = hf.mismatch_problem(model, base)
            return [problem] if problem else []
    except hf.HFConfigError as e:
        return e.problems
    return []


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

    from r1mega.data.jsonl import DataError, read_sft_rows
    from r1mega.data.prompts import load_rows

    p = []
    data = getattr(cfg, "data", None)
    if data is not None and data.source not in ("arithmetic", "jsonl"):
        p.append(f"data.source={data.source!r} is not one of arithmetic, jsonl.")
    recipe = getattr(cfg, "recipe", None)  # the planner's config has no recipe
    if data is not None and data.source == "jsonl":
        for key, split in (("train_file", "train"), ("eval_file", "eval")):
            name = data.get(key)
            path = None if name is None else (Path(name) if Path(name).is_absolute() else data_dir(data) / name)
            if path is None or not path.is_file():
                p.append(f"data.{key}={name!r} is not a file (looked in {path or data_dir(data)}).")
            else:  # every row, as the run will load it: one line with file, line and field
                try:
                    load_rows(data, split)
                except DataError as e:
                    p.append(f"data.{key}: {e}")
    # SFT files of the multi-stage recipes ({problem, response} or {problem, reasoning, summary} rows).
    for name in ("cold_start.data", "rejection_sft.mix.non_reasoning_data", "teacher.cold_start.data"):
        node = recipe
        for part in name.split("."):
            node = getattr(node, part, None) if node is not None else None
        if node is not None:
            try:
                read_sft_rows(node)
            except DataError as e:
                p.append(f"recipe.{name}: {e}")
    base = getattr(recipe, "base", "embedded")
    if base != "embedded" and not (base == "random" and getattr(recipe, "name", None) == "distill") \
            and not (Path(base) / "config.json").is_file():
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


def _rl_problems(r, where: str, algo, rollout, model, sp_pad: int) -> list[str]:
    """Lengths and step units of one GRPO run (`recipe`, or a stage `recipe.rl_reasoning`); `sp_pad`:
    the multiple a sequence-parallel microbatch is padded to (TP size with SP, else 1)."""
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
                 f"r1mega.data.packing.pack refuses a longer sample); raise {where}.train_max_tokens or shorten "
                 f"the responses.")
    if r.train_max_tokens % sp_pad:
        p.append(f"{where}.train_max_tokens={r.train_max_tokens} must be a multiple of {sp_pad} (parallel."
                 f"tensor_model_parallel_size: sequence-parallel microbatches are padded to it).")
    rm = getattr(r, "reward_model", None)
    if rm is not None and rm.checkpoint and rm.max_tokens < total:
        p.append(f"{head} exceeds {where}.reward_model.max_tokens={rm.max_tokens} (tokens per reward-model "
                 f"microbatch; a longer prompt + response stops the run); raise it to at least {total}.")
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


def _share_prompts_problems(r, where: str, algo, cfg) -> list[str]:
    """`share_prompts` lays a group's prompt out once; the layers that read positions or the packed row
    must handle that layout (`r1mega.data.packing.pack_shared_prompts`)."""
    if not getattr(r, "share_prompts", False):
        return []
    at, why = f"{where}.share_prompts=true", []
    if cfg.platform.transformer_engine:
        why.append("platform.transformer_engine=true (TE's packed attention has no shared-prompt mask)")
    if cfg.model.multi_latent_attention:
        why.append(f"model={cfg.model.name} (MLA computes its rotary embedding by packed index)")
    if cfg.parallel.context_parallel_size > 1:
        why.append(f"parallel.context_parallel_size={cfg.parallel.context_parallel_size}")
    if algo is not None and algo.mtp_loss_coef > 0 and cfg.model.mtp_num_layers:
        why.append(f"{where if where != 'recipe' else 'algorithm'}.mtp_loss_coef={algo.mtp_loss_coef} (the MTP "
                   f"loss rolls labels along the packed row)")
    if algo is not None and algo.router_replay == "r3":
        why.append("algorithm.router_replay=r3 (the engine's routes are laid out per whole sequence)")
    return [f"{at} is not supported with {'; '.join(why)}."] if why else []


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
    algo, par = getattr(cfg, "algorithm", None), getattr(cfg, "parallel", None)
    sp_pad = par.tensor_model_parallel_size if par is not None and par.sequence_parallel else 1
    if hasattr(r, "prompts_per_rollout"):  # recipe=r1_zero (an RLRecipeConfig)
        p += _rl_problems(r, "recipe", algo, rollout, model, sp_pad) + _share_prompts_problems(r, "recipe", algo, cfg)
    for stage in ("rl_reasoning", "rl_all"):  # recipe=r1's GRPO stages, their algorithm merged for the stage
        st = getattr(r, stage, None)
        if st is not None:
            st_algo = OmegaConf.merge(algo, st.algorithm) if algo is not None and OmegaConf.is_config(algo) else algo
            p += _rl_problems(st, f"recipe.{stage}", st_algo, rollout, model, sp_pad)
            p += _share_prompts_problems(st, f"recipe.{stage}", st_algo, cfg)
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
    """Raise `ConfigError` listing every rule `cfg` breaks; return None when it can run.

    First every field against its range (`RANGES`) and the rules across fields; the layout, length
    and input rules assume in-range values, so they only run when those hold."""
    if _schema_of(cfg) is not None:  # a composed config (the planner's search passes SimpleNamespaces)
        problems = _hf_problems(cfg)  # first: reading model=hf's fields would raise
        if problems:
            raise ConfigError(problems)
        problems = range_problems(cfg)
        if not problems:
            problems = _cross_problems(cfg)
        if problems:
            raise ConfigError(problems)
    problems = _model_problems(cfg.model) + _mtp_problems(cfg)
    if not problems:
        problems = _parallel_problems(cfg.model, cfg.parallel, world_size_of(cfg.parallel))
    problems += _platform_problems(cfg.model, cfg.parallel, cfg.platform)
    problems += _input_problems(cfg)
    problems += _length_problems(cfg)
    if problems:
        raise ConfigError(problems)


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines; keep the message and the full key."""
    cause = exc
    while cause.__cause__ is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__
    msg = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    key = getattr(cause, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg
