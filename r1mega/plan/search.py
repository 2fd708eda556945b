"""Enumerate the layouts megatron-core and vLLM accept for a GPU count, keep those that fit, rank by step time."""
from __future__ import annotations

import math
from functools import lru_cache
from types import SimpleNamespace

from r1mega.config.validate import validate
from r1mega.plan.estimate import Layout, Rollout, evaluate, rollout_problems
from r1mega.plan.memory import rollout_memory
from r1mega.plan.timing import rollout_time


@lru_cache(maxsize=None)
def split_layers(layers: int, pp: int):
    """(first, last) stage sizes with the smallest largest stage, then the most even split; None if impossible."""
    if layers % pp == 0:
        return (None, None)
    best = None
    top = math.ceil(layers / pp) + 1
    for first in [None, *range(1, top + 1)]:
        for last in [None, *range(1, top + 1)]:
            mid_layers = layers - (first or 0) - (last or 0)
            mid_stages = pp - (first is not None) - (last is not None)
            if mid_stages < 1 or mid_layers < mid_stages or mid_layers % mid_stages:
                continue
            sizes = [x for x in (first, last) if x is not None] + [mid_layers // mid_stages] * mid_stages
            key = (max(sizes), sum(s * s for s in sizes), last or 0)  # ties: lighter last stage (it holds the loss)
            if best is None or key < best[0]:
                best = (key, (first, last))
    return best[1] if best else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def training_candidates(m, world: int, cl, recomputes) -> list[Layout]:
    heads, out = m.num_attention_heads, []
    plat = SimpleNamespace(device="cuda", backend="nccl", transformer_engine=True)
    for tp in (t for t in (1, 2, 4, 8, 16) if t <= cl.gpus_per_node and world % t == 0 and heads % t == 0):
        for pp in (p for p in _divisors(world // tp) if p <= m.num_layers):
            split = split_layers(m.num_layers, pp)
            if split is None:
                continue
            eps = [e for e in _divisors(m.num_experts) if world % (e * pp) == 0] if m.num_experts else [1]
            for ep in eps:
                lay = Layout(world=world, layers=m.num_layers, tp=tp, pp=pp, ep=ep, first=split[0], last=split[1], sp=tp > 1)
                try:
                    validate(SimpleNamespace(model=m, parallel=lay.as_parallel(), platform=plat))
                except ValueError:
                    continue
                out += [Layout(**{**lay.__dict__, "recompute": r}) for r in recomputes]
    return out


def best_rollout(m, f, c, cl, world: int, dtype: str, util: float):
    """The engine layout (TP, experts over TP) with the fastest rollout that fits; None when none does."""
    best, sizes = None, (1, 2, 4, 8, 16, 32, 64, 128, 256)
    # MoE engines may also run attention data-parallel with experts over TP x DP (vLLM DP + EP).
    shapes = [(t, d) for t in sizes for d in (sizes if m.num_experts else (1,)) if t * d <= world]
    for tp, dp in shapes:
        rol = Rollout(tp=tp, dp=dp, ep=bool(m.num_experts), dtype=dtype, util=util)
        if rollout_problems(m, rol, world):
            continue
        rm = rollout_memory(m, f, rol, c, cl, 0.0)
        if rm["kv_tokens_per_gpu"] < c.seq_length:  # one sequence's KV on one attention-DP rank
            continue
        t = rollout_time(m, f, rol, rm, c, cl, world)["rollout_s"]
        if best is None or t < best[0]:
            best = (t, rol)
    return best[1] if best else None


def search(m, f, c, cl, world: int, rol) -> list[dict]:
    """All feasible training layouts for `world` GPUs with engine layout `rol`, fastest first."""
    results = []
    for lay in training_candidates(m, world, cl, tuple(c.search_recompute)):
        r = evaluate(m, f, lay, rol, c, cl)
        if r["verdict"]["fits"]:
            results.append(dict(r, _layout=lay))
    results.sort(key=lambda r: r["step_s"])
    return results
