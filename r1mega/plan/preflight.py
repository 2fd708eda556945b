"""The planner as a pre-flight check of every run (`python -m r1mega`, `--cfg job` included).

Before anything is built, the planner estimates the per-device memory of the run's model, training
layout, lengths and batch, phase by phase (the embedded base's pretraining, SFT stages, GRPO runs),
and the run is refused when one phase exceeds the device: on GPU the `conf/cluster/<platform.cluster>`
GPU (and the colocated vLLM engine's weights and KV cache, and host memory for offload, as
`python -m r1mega.plan` judges them); on CPU the host's total memory divided among the local
processes (training states, activations, the reference copy, and on rank 0 the vLLM engine's
weights plus `rollout.kv_cache_space_gb`). `platform.memory_check=false` skips it.

Arithmetic only: no torch model, no megatron, no vLLM; a 671B check takes well under a second.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

from omegaconf import OmegaConf

# The planner's recompute names for parallel.recompute_granularity (r1mega/models/build.py passes it,
# with recompute_method and recompute_num_layers, to megatron-core's TransformerConfig).
RECOMPUTE = {None: "none", "selective": "selective", "full": "full"}
CPU_RESERVED_GB = 1.0  # Python, torch, vLLM and megatron imports, allocator slack, per process
GB = 1e9


def recompute_of(par) -> dict:
    """The planner's recompute fields for a layout's `parallel.recompute_*` (selective: megatron's
    default modules, core attention; full: its method and chunk size)."""
    g = getattr(par, "recompute_granularity", None)
    out = {"recompute": RECOMPUTE[g], "search_recompute": [RECOMPUTE[g]]}
    if g == "full":
        out.update(recompute_method=par.recompute_method, recompute_num_layers=int(par.recompute_num_layers))
    return out


@dataclass
class Check:
    fits: bool
    phase: str = ""
    device: str = ""
    need_gb: float = 0.0
    have_gb: float = 0.0
    reason: str = ""
    breakdown: list[str] = field(default_factory=list)
    nearest: list[str] = field(default_factory=list)
    head: str = ""  # replaces the memory sentence (the rollout KV-cache rule)

    def lines(self) -> list[str]:
        head = self.head or (
            f"r1mega: does not fit: {self.phase} needs {self.need_gb:,.1f} GB per device, {self.device} has "
            f"{self.have_gb:,.1f} GB ({self.reason}); set platform.memory_check=false to run anyway.")
        return [head, *(f"  {b}" for b in self.breakdown), *(f"  {n}" for n in self.nearest)]


def _planner_defaults() -> dict:
    from r1mega.plan.schema import PlannerConfig

    return OmegaConf.to_container(OmegaConf.structured(PlannerConfig), resolve=True)


def phases(cfg) -> list[tuple[str, dict]]:
    """(name, planner fields) for every phase of the run that holds a model in training."""
    r = cfg.recipe
    out = []

    from r1mega.config.steps import longest_response

    def rl(name, node, algo):
        resp = longest_response(node, algo)
        seq = max(int(node.train_max_tokens), int(node.max_prompt_tokens) + resp)
        out.append((name, dict(rl=True, seq_length=seq, prompt_length=int(node.max_prompt_tokens),
                               global_batch_size=int(node.prompts_per_rollout) * int(algo.group_size),
                               optimizer_steps_per_rl_step=int(algo.num_mini_batches),
                               ref_on_gpu=bool(algo.kl_coef) and not getattr(node, "offload_reference", False),
                               offload_train_states_in_rollout=bool(getattr(node, "offload_train_state", True)),
                               _kl=bool(algo.kl_coef))))

    def sft(name, node):
        if node is not None:
            out.append((name, dict(rl=False, seq_length=node.max_tokens, prompt_length=1, global_batch_size=node.batch_size)))

    if hasattr(r, "prompts_per_rollout"):
        rl("recipe", r, cfg.algorithm)
    sft("recipe.cold_start.sft", getattr(getattr(r, "cold_start", None), "sft", None))
    for stage in ("rl_reasoning", "rl_all"):
        st = getattr(r, stage, None)
        if st is not None:
            rl(f"recipe.{stage}", st, OmegaConf.merge(cfg.algorithm, st.algorithm))
    sft("recipe.rejection_sft.sft", getattr(getattr(r, "rejection_sft", None), "sft", None))
    sft("recipe.sft", getattr(r, "sft", None))
    pre = getattr(r, "pretrain", None)
    if pre is not None and getattr(r, "base", None) == "embedded":
        out.append(("recipe.pretrain", dict(rl=False, seq_length=pre.max_tokens, prompt_length=1,
                                             global_batch_size=pre.batch_size)))
    return out


def _cluster(cfg, local: int, host_bytes: float | None):
    """The device the check assumes: the platform's GPU preset, or this host's memory per process."""
    from r1mega.config import CONF_DIR
    from r1mega.plan.schema import ClusterConfig

    if cfg.platform.device == "cpu":
        if host_bytes is None:
            import psutil

            host_bytes = psutil.virtual_memory().total
        per = host_bytes / GB / local
        return SimpleNamespace(name="cpu", gpu_memory_gb=per, bf16_tflops=1.0, fp8_tflops=1.0, hbm_tbps=0.1,
                               nvlink_gbps=10.0, network_gbps=10.0, pcie_gbps=10.0, gpus_per_node=local,
                               host_memory_gb=host_bytes / GB), f"this host ({host_bytes / GB:,.1f} GB / {local} local process(es))"
    name = cfg.platform.cluster
    if not name:
        return None, ""
    raw = OmegaConf.load(CONF_DIR / "cluster" / f"{name}.yaml")
    raw.pop("defaults", None)
    node = OmegaConf.merge(OmegaConf.structured(ClusterConfig), raw)
    node = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "defaults"}
    return SimpleNamespace(**node), f"a {name} GPU (platform.cluster)"


def _bytes(cfg, on_cpu: bool) -> dict:
    fp32 = cfg.model.params_dtype == "fp32"
    b = {}
    if fp32:  # fp32 params: no separate master copy; Adam m + v; fp32 activations and logits
        b.update(param_bytes=4.0, grad_bytes=4.0, optimizer_bytes=8.0, activation_bytes=4.0, logits_bytes=8.0)
    if on_cpu:
        b.update(reserved_gb=CPU_RESERVED_GB, offload_train_states_in_rollout=False, host_memory_fraction=1.0)
    return b


def check(cfg, local_processes: int | None = None, host_bytes: float | None = None) -> Check:
    """The first phase that does not fit (with the planner's breakdown and layouts that fit), or fits=True."""
    from r1mega.config import world_size_of
    from r1mega.plan.estimate import layout_of, rollout_of
    from r1mega.plan.memory import facts
    from r1mega.plan.search import best_rollout, search

    if not cfg.platform.memory_check or getattr(cfg.recipe, "name", "none") == "none":
        return Check(True)
    on_cpu = cfg.platform.device == "cpu"
    world = world_size_of(cfg.parallel)
    local = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE") or (world if on_cpu else 1))
    cl, device = _cluster(cfg, max(local, 1), host_bytes)
    if cl is None:
        return Check(True)
    m = SimpleNamespace(**OmegaConf.to_container(cfg.model, resolve=True))
    f = facts(m)
    rec = recompute_of(cfg.parallel)
    lay = layout_of(cfg.parallel, world, rec["recompute"], m.num_layers)
    base = {**_planner_defaults(), **_bytes(cfg, on_cpu), **rec}
    rol = rollout_of(cfg.rollout)
    all_phases = phases(cfg)
    if not on_cpu and any(fields["rl"] for _, fields in all_phases):
        kv = _kv_check(m, f, rol, SimpleNamespace(**base), cl, cfg, device)
        if not kv.fits:
            return kv
    for name, fields in all_phases:
        kl = fields.pop("_kl", True)
        c = SimpleNamespace(**{**base, **fields})
        if on_cpu:
            res = _cpu(m, f, lay, c, cl, cfg, name, device, kl)
        else:
            res = _gpu(m, f, lay, rol, c, cl, name, device)
        if not res.fits:
            res.nearest = _nearest(m, f, c, cl, world, rol, on_cpu, cfg, kl, search, best_rollout)
            return res
    return Check(True)


def _kv_check(m, f, rol, c, cl, cfg, device) -> Check:
    """The colocated engine's KV cache must hold one `rollout.max_model_len` sequence on each
    attention-DP rank: vLLM refuses to start otherwise, on the cluster, after the job has queued."""
    from r1mega.plan.memory import rollout_memory

    rm = rollout_memory(m, f, rol, c, cl, 0.0)
    need = int(cfg.rollout.max_model_len)
    if rm["kv_tokens_per_gpu"] >= need:
        return Check(True)
    util = cfg.rollout.gpu_memory_utilization
    min_util = (rm["weights_gb"] + rm["activation_reserve_gb"] + need * rm["kv_bytes_per_token"] / GB) / cl.gpu_memory_gb
    head = (f"r1mega: does not fit: the vLLM engine (rollout={cfg.rollout.name}: {rol}) at rollout.gpu_memory_utilization="
            f"{util} of {device} has a {rm['budget_gb']:.1f} GB budget: {rm['weights_gb']:.1f} GB weights + "
            f"{rm['activation_reserve_gb']:.0f} GB activations leave a KV cache of {rm['kv_tokens_per_gpu']:,} tokens per "
            f"attention-DP rank, fewer than one rollout.max_model_len={need:,}-token sequence (vLLM would refuse to "
            f"start); raise rollout.gpu_memory_utilization to at least {math.ceil(min_util * 100) / 100:.2f}, or pick a "
            f"rollout layout with fewer weights per GPU (a larger rollout.tensor_parallel_size); set "
            f"platform.memory_check=false to run anyway.")
    return Check(False, "rollout", device, rm["budget_gb"], util * cl.gpu_memory_gb, "rollout KV cache", head=head)


def _engine_gb(f, cfg) -> float:
    wbytes = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "fp8": 1.0}.get(cfg.rollout.dtype, 4.0)
    return f.total * wbytes / cfg.rollout.tensor_parallel_size / GB + cfg.rollout.kv_cache_space_gb


def _cpu_need(tm: dict, f, cfg, c, kl: bool) -> tuple[float, list[str]]:
    engine = _engine_gb(f, cfg) if c.rl else 0.0
    ref = tm["weights_gb"] if (c.rl and kl) else 0.0  # the reference engine stays in memory on CPU
    need = tm["total_gb"] - tm["ref_model_gb"] + ref + engine
    rows = [f"{k:<44s}{v:>12,.1f} GB" for k, v in (
        ("weights", tm["weights_gb"]), ("gradients", tm["grads_gb"]), ("optimizer", tm["optimizer_gb"]),
        (f"activations ({tm['in_flight_microbatches']:.0f} microbatch(es) in flight)", tm["activations_gb"]),
        ("reference model", ref), ("vLLM engine (rank 0): weights + KV", engine), ("reserved", tm["reserved_gb"]),
        ("total", need))]
    return need, rows


def _cpu(m, f, lay, c, cl, cfg, name, device, kl) -> Check:
    from r1mega.plan.memory import train_memory

    tm = train_memory(m, f, lay, c, cl)
    need, rows = _cpu_need(tm, f, cfg, c, kl)
    head = [f"{name} on {lay} ({f.total / 1e9:,.2f}B params, {c.seq_length:,}-token microbatches), stage {tm['stage']}:"]
    if need <= cl.gpu_memory_gb:
        return Check(True)
    return Check(False, name, device, need, cl.gpu_memory_gb, "training states + activations + engine", head + rows)


def _gpu(m, f, lay, rol, c, cl, name, device) -> Check:
    from r1mega.plan.estimate import evaluate

    r = evaluate(m, f, lay, rol if c.rl else None, c, cl)
    v, tm, rm = r["verdict"], r["train_memory"], r["rollout_memory"]
    if v["fits"]:
        return Check(True)
    rows = [f"{name} on {lay}, {c.seq_length:,}-token microbatches; training memory per GPU, stage {tm['stage']} "
            f"({tm['layers']} layers):"]
    rows += [f"{k:<44s}{tm[k + '_gb']:>12,.1f} GB" for k in ("weights", "grads", "optimizer", "fp8_copies", "activations",
                                                          "ref_model", "reserved", "total")]
    if rm:
        rows.append(f"vLLM ({rol}): weights {rm['weights_gb']:.1f} GB, KV cache {rm['kv_cache_gb']:.1f} GB = "
                    f"{rm['kv_tokens_per_gpu']:,} tokens per attention-DP rank, one sequence needs {c.seq_length:,}")
    need = tm["total_gb"] if v["limit"] == "training memory" else (rm or {}).get("total_gb", tm["total_gb"])
    return Check(False, name, device, need, cl.gpu_memory_gb, f"{v['limit']}: {v['reason']}", rows)


def _nearest(m, f, c, cl, world, rol, on_cpu, cfg, kl, search, best_rollout) -> list[str]:
    """Layouts of the same device count that fit, fastest first (the planner's search)."""
    from r1mega.plan.memory import train_memory
    from r1mega.plan.search import training_candidates

    def fitting(recomputes, rollout):
        cc = SimpleNamespace(**{**vars(c), "search_recompute": list(recomputes)})
        if on_cpu:
            out = []
            for lay in training_candidates(m, world, cl, tuple(recomputes)):
                need, _ = _cpu_need(train_memory(m, f, lay, SimpleNamespace(**{**vars(cc), "recompute": lay.recompute}), cl),
                                    f, cfg, cc, kl)
                if need <= cl.gpu_memory_gb:
                    out.append((need, str(lay), None))
            return [f"{lay}: {need:,.1f} GB" for need, lay, _ in sorted(out)[:3]]
        ranked = search(m, f, cc, cl, world, rollout if cc.rl else None)
        return [f"{r['layout']} + {r['rollout_layout'] or 'no engine'}: {r['train_memory']['total_gb']:,.1f} GB, "
                f"step {r['step_s']:,.0f} s" for r in ranked[:3]]

    found = fitting((c.recompute,), rol)
    if not found and not on_cpu and c.rl:
        better = best_rollout(m, f, c, cl, world, rol.dtype, rol.util)
        if better is not None:
            rol = better
            found = fitting((c.recompute,), rol)
    if found:
        return [f"layouts of {world} device(s) that fit (python -m r1mega.plan for more):", *found]
    lines = [f"no layout of {world} device(s) fits with recompute={c.recompute} (parallel.recompute_granularity)."]
    others = tuple(r for r in ("selective", "full") if r != c.recompute)
    if not on_cpu and others:
        rec = fitting(others, rol)
        if rec:
            lines += ["with more activation recompute they would (full: parallel.recompute_method=uniform, "
                      "recompute_num_layers=1):", *rec]
    return lines


__all__ = ["Check", "RECOMPUTE", "check", "phases"]
