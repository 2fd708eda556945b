"""Pre-flight planner: will this model, layout and engine fit this cluster, and how long is an RL step?

    from r1mega.plan import compose_plan, plan
    result = plan(compose_plan(["model=deepseek_v3_671b", "cluster=h100_80gb", "num_gpus=256",
                                "parallel=dsv3_256xh100", "rollout=dsv3_tp32"]))
    result["verdict"], result["train_memory"]["total_gb"], result["weight_sync"]["estimate_s"]

Everything is arithmetic on the config (no model is built), so a 671B plan takes well under a second.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

from omegaconf import OmegaConf

from r1mega.config import CONF_DIR, ConfigError, validate
from r1mega.config.validate import range_problems
from r1mega.plan.estimate import evaluate, layout_of, rollout_of, rollout_problems
from r1mega.plan.memory import facts
from r1mega.plan.schema import register_plan_configs
from r1mega.plan.search import best_rollout, search

CHOICES = {"recompute": ("none", "selective", "full"), "recompute_method": ("uniform", "block"), "layout": ("given", "best"),
           "rollout_layout": ("given", "best"), "output": ("table", "json", "wandb")}


def compose_plan(overrides: list[str] | None = None):
    """Compose conf/plan.yaml, size the layout to `num_gpus`, and validate it like the main app does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_plan_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="plan", overrides=list(overrides or []))
    # Every field against its range first (r1mega.config.validate.RANGES: PlannerConfig, PlanConfig,
    # ClusterConfig and the main app's groups); num_gpus=0 must not fall back to the default below.
    problems = range_problems(cfg)
    problems += [f"search_recompute has {r!r}, not one of {', '.join(CHOICES['recompute'])}."
                 for r in cfg.search_recompute if r not in CHOICES["recompute"]]
    if not problems and cfg.prompt_length >= cfg.seq_length:
        problems.append(f"prompt_length={cfg.prompt_length} must be below seq_length={cfg.seq_length}.")
    if problems:
        raise ConfigError(problems)
    cfg.num_gpus = cfg.num_gpus or cfg.parallel.world_size or cfg.cluster.gpus_per_node
    cfg.parallel.world_size = cfg.num_gpus  # the layout is judged on the GPUs planned for
    if cfg.rollout_layout == "given" and cfg.rl:
        problems += rollout_problems(cfg.model, rollout_of(cfg.rollout), cfg.num_gpus)
    if cfg.layout == "best":  # the searched layout replaces parallel=, so only the model is checked here
        cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
        cfg.parallel.num_layers_in_first_pipeline_stage = cfg.parallel.num_layers_in_last_pipeline_stage = None
    try:
        validate(cfg)
    except ConfigError as e:
        problems = e.problems + problems
    if problems:
        raise ConfigError(problems)
    return cfg


def _ns(x):
    if isinstance(x, dict):
        return SimpleNamespace(**{k: _ns(v) for k, v in x.items() if k != "defaults"})
    return x


def plan(cfg) -> dict:
    """All estimates for the configured (or best) layout, plus the ranked feasible layouts."""
    c = _ns(OmegaConf.to_container(cfg, resolve=True))
    m, cl, world = c.model, c.cluster, c.num_gpus
    f = facts(m)
    rol = rollout_of(c.rollout) if c.rl else None
    if c.rl and c.rollout_layout == "best":
        rol = best_rollout(m, f, c, cl, world, c.rollout.dtype, c.rollout.gpu_memory_utilization) or rol
    ranked = search(m, f, c, cl, world, rol)
    lay = layout_of(c.parallel, world, c.recompute, m.num_layers)
    if c.layout == "best" and ranked:
        lay = ranked[0]["_layout"]
    out = evaluate(m, f, lay, rol, c, cl)
    out.update(
        model={"name": m.name, "total_params": f.total, "active_params": f.active,
               "active_matmul_params": f.active_matmul},
        cluster=cl.name, num_gpus=world, layout_source=c.layout, rollout_source=c.rollout_layout,
        search=[{k: r[k] for k in ("layout", "rollout_layout", "step_s")} | {
            "train_gb": r["train_memory"]["total_gb"], "host_gb_per_node": r["train_memory"]["host_per_node_gb"],
            "train_s": r["train_time"]["train_s"],
            "concurrent_seqs_per_engine": (r["rollout_memory"] or {}).get("concurrent_seqs_per_engine"),
        } for r in ranked[: c.top_k]],
        feasible_layouts=len(ranked),
    )
    return _clean(out)


def _clean(x):
    """JSON-safe: infinities become None, private keys go."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items() if not k.startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def flat(result: dict, prefix: str = "plan") -> dict:
    """The same numbers as one level of `a/b/c` keys, ready for `wandb.log` or `wandb.config.update`."""
    out = {}
    for k, v in result.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            out.update(flat(v, key))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                out.update(flat(item, f"{key}/{i}"))
        elif isinstance(v, list):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out


__all__ = ["compose_plan", "flat", "plan"]
