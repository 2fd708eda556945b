"""One layout in, every number out: memory, time, weight sync, and the verdict naming the first limit hit."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from r1mega.plan.memory import GB, rollout_memory, train_memory
from r1mega.plan.timing import rollout_time, train_time, weight_sync


@dataclass(frozen=True)
class Layout:
    """Training layout, megatron-core's fields under short names."""

    world: int
    layers: int = 0  # the model's, to print the stage split
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    cp: int = 1
    vpp: Optional[int] = None
    first: Optional[int] = None
    last: Optional[int] = None
    sp: bool = False
    dist_opt: bool = True
    recompute: str = "selective"

    def __str__(self) -> str:
        s = f"TP{self.tp} PP{self.pp} EP{self.ep} DP{self.world // (self.tp * self.pp * self.cp)}"
        if self.cp > 1:
            s += f" CP{self.cp}"
        if self.vpp:
            s += f" VPP{self.vpp}"
        if self.first is not None or self.last is not None:
            s += f" [{stage_split(self)}]"
        return s + f" recompute={self.recompute}"

    def as_parallel(self):
        """The megatron-core ParallelConfig fields, for r1mega's validator."""
        from types import SimpleNamespace

        return SimpleNamespace(
            world_size=self.world, tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp, num_layers_in_first_pipeline_stage=self.first,
            num_layers_in_last_pipeline_stage=self.last, context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep, expert_tensor_parallel_size=self.etp,
            sequence_parallel=self.sp, use_distributed_optimizer=self.dist_opt,
        )


@dataclass(frozen=True)
class Rollout:
    tp: int
    dp: int = 1
    ep: bool = False
    dtype: str = "bfloat16"
    util: float = 0.6

    def __str__(self) -> str:
        return f"vLLM TP{self.tp}" + (f" DP{self.dp}" if self.dp > 1 else "") + (" EP" if self.ep else "")


def stage_split(lay: Layout) -> str:
    """`3+4x14+2`: layers of the first stage, of each middle one, of the last."""
    mid = lay.pp - (lay.first is not None) - (lay.last is not None)
    each = (lay.layers - (lay.first or 0) - (lay.last or 0)) // max(1, mid)
    parts = [str(lay.first)] if lay.first is not None else []
    parts.append(f"{each}x{mid}")
    return "+".join(parts + ([str(lay.last)] if lay.last is not None else []))


def layout_of(par, world: int, recompute: str, layers: int) -> Layout:
    return Layout(
        world=world, layers=layers, tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
        ep=par.expert_model_parallel_size, etp=par.expert_tensor_parallel_size, cp=par.context_parallel_size,
        vpp=par.virtual_pipeline_model_parallel_size, first=par.num_layers_in_first_pipeline_stage,
        last=par.num_layers_in_last_pipeline_stage, sp=par.sequence_parallel,
        dist_opt=par.use_distributed_optimizer, recompute=recompute,
    )


def rollout_of(r) -> Rollout:
    return Rollout(tp=r.tensor_parallel_size, dp=r.data_parallel_size, ep=r.expert_parallel, dtype=r.dtype,
                   util=r.gpu_memory_utilization)


def rollout_problems(m, r: Rollout, world: int) -> list[str]:
    p = []
    if world % (r.tp * r.dp):
        p.append(f"rollout.tensor_parallel_size x data_parallel_size = {r.tp}x{r.dp} does not divide num_gpus={world}.")
    if m.num_attention_heads % r.tp:
        p.append(f"rollout.tensor_parallel_size={r.tp} does not divide model.num_attention_heads={m.num_attention_heads}.")
    return p


def verdict(c, cl, tm: dict, rm: Optional[dict], rt: Optional[dict]) -> dict:
    """Limits in the order a launch would hit them; the first one that fails names the verdict."""
    gpu = cl.gpu_memory_gb
    host = cl.host_memory_gb * c.host_memory_fraction
    parts = {k[:-3]: tm[k] for k in ("weights_gb", "grads_gb", "optimizer_gb", "activations_gb")}
    big = max(parts, key=parts.get)
    checks = [("training memory", tm["total_gb"], gpu, f"stage {tm['stage']} needs {tm['total_gb']:.1f} GB of "
               f"{gpu:.0f} GB ({big} alone {parts[big]:.1f} GB)")]
    if rm is not None:
        checks += [
            ("rollout weights", rm["weights_gb"] + rm["activation_reserve_gb"], rm["budget_gb"],
             f"vLLM at TP{rm['tp']} needs {rm['weights_gb']:.1f} GB weights + {rm['activation_reserve_gb']:.0f} GB "
             f"activations in its {rm['budget_gb']:.1f} GB budget"),
            # One sequence lives on one attention-DP rank, whose cache is one GPU's (MLA latents are
            # replicated over TP; other KV heads are split over TP, so each rank holds every token).
            ("rollout KV cache", c.seq_length, rm["kv_tokens_per_gpu"],
             f"KV cache holds {rm['kv_tokens_per_gpu']} tokens per attention-DP rank, one sequence needs {c.seq_length}"),
            ("rollout memory", rm["total_gb"], gpu,
             f"engine budget {rm['budget_gb']:.1f} GB + resident training states {rm['train_states_resident_gb']:.1f} GB"),
        ]
    checks.append(("host memory", tm["host_per_node_gb"], host,
                   f"offload needs {tm['host_per_node_gb']:.0f} GB per node of {host:.0f} GB usable"))
    for name, need, have, why in checks:
        if need > have:
            return {"fits": False, "limit": name, "reason": why}
    return {"fits": True, "limit": None, "reason": "all limits hold"}


def evaluate(m, f, lay: Layout, rol: Optional[Rollout], c, cl) -> dict:
    """Every estimate for one training layout and one engine layout (rol None: no rollout, e.g. pretraining)."""
    c = _with(c, recompute=lay.recompute)
    tm = train_memory(m, f, lay, c, cl)
    tt = train_time(m, f, lay, tm, c, cl)
    rm = rt = sync = None
    step = tt["train_s"]
    if c.rl and rol is not None:
        rm = rollout_memory(m, f, rol, c, cl, tm["states_gb"])
        rt = rollout_time(m, f, rol, rm, c, cl, lay.world)
        sync = weight_sync(f, rol, rm, tm["params"], c, cl, lay.world)
        step += rt["rollout_s"] + tt["ref_old_forward_s"] + sync["estimate_s"] + tt["offload_swap_s"]
    v = verdict(c, cl, tm, rm, rt)
    return {
        "layout": str(lay), "parallel": asdict(lay), "rollout_layout": str(rol) if rol else None,
        "train_memory": tm, "train_time": tt, "rollout_memory": rm, "rollout_time": rt,
        "weight_sync": sync, "step_s": step, "verdict": v,
    }


def _with(c, **kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(c), **kw})
