"""Bucketed weight sync megatron-core → rollout engine.

The plan (HF names, shapes, buckets) is computed once from the configs; every step streams the
model's HF tensors (TP shards gathered with fused layouts undone, experts gathered across EP,
layers broadcast from their PP stage: the checkpoint mapping's tables and order, `export_plan`),
in the engine dtype, grouped into buckets of at most `bucket_mb` (a tensor larger than a bucket
travels alone). All ranks run the collectives; only ranks holding an engine load anything.

Memory: peak extra memory per rank ≤ bucket + largest HF tensor (tests/test_rollout_sync.py
measures it). Each HF tensor is allocated once, in the engine dtype, and every rank's block is
broadcast straight into it (gloo's all_gather would stage a second full copy, and gathering a fused
megatron tensor before splitting it holds the whole fused tensor); a block that is not contiguous in
the HF tensor (row-parallel splits) goes through a staging buffer of at most `stage_bytes`. Tensors
that need no communication or conversion are handed over as views of the parameters.

Multi-token prediction layers (HF `model.layers.{num_layers + k}.*`) are not sent: vLLM's
DeepSeek-V3 `load_weights` drops them (`get_spec_layer_idx_from_weight_name`; only a separate MTP
draft model for speculative decoding reads them, and the rollout engine runs none), and they are
the largest layer plus copies of the embedding and output head."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from r1mega.checkpoint import hf_mapping
from r1mega.checkpoint.hf_mapping import PlanEntry, export_plan
from r1mega.rollout.engine import RolloutEngine

Bucket = list[tuple[str, torch.Tensor]]


def engine_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def plan_buckets(plan: list[PlanEntry], bucket_bytes: int, dtypes: dict[str, torch.dtype]) -> list[list[PlanEntry]]:
    """Consecutive plan entries grouped so each group holds ≤ bucket_bytes (or one larger tensor)."""
    buckets: list[list[PlanEntry]] = [[]]
    size = 0
    for e in plan:
        nbytes = _nbytes(e, dtypes)
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(e)
        size += nbytes
    return [b for b in buckets if b]


def target_dtypes(model_cfg, plan: list[PlanEntry], dtype: torch.dtype) -> dict[str, torch.dtype]:
    """HF name → dtype sent to the engine: `dtype`, except tensors megatron keeps in fp32 whatever the
    params dtype (the router's expert bias), which stay fp32."""
    kept = {n for item in hf_mapping._items(model_cfg) if item.rule.fp32 for n in item.hf_names()}
    return {e.hf_name: torch.float32 if e.hf_name in kept else dtype for e in plan}


def _mtp_prefixes(m) -> tuple[str, ...]:
    """HF name prefixes of the MTP layers, which the sync skips (see the module docstring)."""
    return tuple(f"model.layers.{m.num_layers + k}." for k in range(m.mtp_num_layers or 0))


def _nbytes(e: PlanEntry, dtypes: dict[str, torch.dtype]) -> int:
    return torch.Size(e.shape).numel() * dtypes[e.hf_name].itemsize


class WeightSync:
    """Built once per run on every rank; `sync(chunks, engine)` after every optimizer step."""

    def __init__(self, model_cfg, parallel_cfg, rollout_cfg, bucket_bytes: int | None = None):
        self.model_cfg = model_cfg
        self.dtype = engine_dtype(rollout_cfg.dtype)
        self.bucket_bytes = bucket_bytes or int(rollout_cfg.sync_bucket_mb * 2**20)
        self.plan = [e for e in export_plan(model_cfg, parallel_cfg) if not e.hf_name.startswith(_mtp_prefixes(model_cfg))]
        self.dtypes = target_dtypes(model_cfg, self.plan, self.dtype)
        self.buckets = plan_buckets(self.plan, self.bucket_bytes, self.dtypes)
        self.total_bytes = sum(_nbytes(e, self.dtypes) for e in self.plan)
        self.largest_bytes = max(_nbytes(e, self.dtypes) for e in self.plan)
        # Staging for non-contiguous blocks: part of the slack the bound leaves next to the bucket.
        self.stage_bytes = max(1, min(self.bucket_bytes, self.largest_bytes) // 2)

    def iter_buckets(self, chunks) -> Iterator[Bucket]:
        """Collective: every rank must consume this to the end. The consumer should drop (or clear)
        each bucket before asking for the next."""
        stream = _stream_hf_tensors(chunks, self.model_cfg, self.dtypes, self.stage_bytes)
        for entries in self.buckets:
            bucket: Bucket = []
            for e in entries:
                name, t = next(stream)
                if name != e.hf_name or tuple(t.shape) != tuple(e.shape):
                    raise RuntimeError(f"sync plan expects {e.hf_name} {e.shape}, mapping gave {name} {tuple(t.shape)}")
                bucket.append((name, t))
                del t
            yield bucket
            del bucket
        if next(stream, None) is not None:
            raise RuntimeError("mapping yielded more tensors than its export plan")

    @torch.no_grad()
    def sync(self, chunks, engine: RolloutEngine | None) -> None:
        """Push the current megatron weights into `engine` (None on ranks without one)."""
        buckets = self.iter_buckets(chunks)
        if engine is None:
            for bucket in buckets:
                bucket.clear()
        else:
            # One lazy update: vLLM must see a fused layer's parts in one reload (see VLLMEngine).
            engine.update_weights(_drain(buckets))


def peak_extra_bytes(fn) -> int:
    """Peak bytes held by torch's CPU allocator while `fn()` runs, above what it held when `fn` started:
    every tensor counts (gather buffers, gloo's staging buffers, concatenations, casts, bucket contents).
    For tests and benchmarks (slow: it runs `fn` under the profiler).

    torch's CPU allocator keeps a process-wide count of live bytes; it updates it on every thread only
    with c10's `caffe2_report_cpu_memory_usage` flag (otherwise only on threads the profiler watches, and
    gloo frees its work buffers on its own threads). The profiler's allocation events carry that count."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    _count_cpu_memory_on_all_threads()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        marker = torch.empty(1, dtype=torch.uint8)  # first event: the baseline
        fn()
        del marker
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            events.append((node.start_time_ns, node.typed[1].alloc_size, node.typed[1].total_allocated))
        stack.extend(node.children)
    _, size, total = min(events)
    return max(t for _, _, t in events) - (total - size) - size  # not counting the marker itself


def _count_cpu_memory_on_all_threads() -> None:
    import ctypes
    from pathlib import Path

    lib = next((Path(torch.__file__).parent / "lib").glob("libc10.*"))
    ctypes.c_bool.in_dll(ctypes.CDLL(str(lib)), "FLAGS_caffe2_report_cpu_memory_usage").value = True


def _drain(buckets: Iterator[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
    for bucket in buckets:
        bucket.reverse()
        while bucket:
            yield bucket.pop()  # the consumer keeps what it still needs; we hold nothing


# ---- Streaming HF tensors with bounded memory ---------------------------------------------------
# The order, names, owners and layouts are the checkpoint mapping's (hf_mapping: `_items`, `_owner`,
# `_local_tensors`, `_tp`, `LAYOUTS`); `iter_hf_tensors` yields the same tensors (tested) but gathers
# whole fused megatron tensors with all_gather, which needs several times the largest tensor.


def _stream_hf_tensors(chunks, m, dtypes: dict[str, torch.dtype], stage_bytes: int):
    """Collective over the world, like `hf_mapping.iter_hf_tensors`: (HF name, full tensor in the
    engine dtype) in plan order on every rank. Holds nothing between tensors but one staging buffer."""
    from megatron.core import parallel_state as ps

    hm = hf_mapping
    config = getattr(chunks[0], "module", chunks[0]).config
    local = hm._local_tensors(chunks, m)
    stages = hm._layer_stages(config)
    device = next(getattr(chunks[0], "module", chunks[0]).parameters()).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    me = (ps.get_pipeline_model_parallel_rank(), ps.get_expert_model_parallel_rank())
    coords = [me] * world
    if world > 1:
        dist.all_gather_object(coords, me)
    stage = _Stage(stage_bytes, device)
    for item in hm._items(m):
        if item.layer is not None and item.layer >= m.num_layers:
            continue  # MTP: not sent (WeightSync's plan skips it on every rank alike)
        owner, ep = hm._owner(item, stages, config)
        everywhere = config.pipeline_model_parallel_size == 1 and (ep is None or config.expert_model_parallel_size == 1)
        src = None if everywhere else next(r for r, (p, e) in enumerate(coords) if p == owner and (ep is None or e == ep))
        shard = local.get(item)
        tp_rank, tp_size, group = hm._tp(item) if shard is not None else (0, 1, None)
        if shard is None or item.rule.tp is None or tp_size == 1:  # nothing to gather
            tp_rank, tp_size, group = 0, 1, None
        for i, (name, shape) in enumerate(zip(item.hf_names(), item.hf_shapes(m))):
            mine = None if shard is None else _local_block(shard.detach(), item, i, tp_size, m)
            if everywhere and tp_size == 1 and mine.is_contiguous():
                out = mine.to(dtypes[name])  # a view of the parameter when the dtype is the engine's
            else:
                out = torch.empty(shape, dtype=dtypes[name], device=mine.device if mine is not None else device)
                for r in range(tp_size if shard is not None else 0):
                    block = _hf_block(out, item, r, tp_size, m)
                    if r == tp_rank:
                        block.copy_(mine)
                    if group is not None:
                        stage.broadcast(block, dist.get_global_rank(group, r), group)
                    del block  # a view: it would keep `out` alive into the next tensor
                if src is not None:
                    stage.broadcast(out, src, None)
            del mine
            yield name, out
            del out


class _Stage:
    """One communication buffer reused by every broadcast of a sync. Collectives go through it, not
    into the yielded tensors: a gloo worker thread can drop its reference to a finished collective's
    tensor after the next tensor is allocated, so a tensor the consumer has released would briefly
    stay alive. Also what makes non-contiguous blocks (row-parallel splits) communicable."""

    def __init__(self, nbytes: int, device):
        self.nbytes, self.device, self.buf = nbytes, device, None

    def broadcast(self, t: torch.Tensor, src: int, group) -> None:
        """t ← t on global rank `src`, in pieces of ≤ nbytes along dim 0 (at least one row)."""
        flat = t.view(-1) if t.is_contiguous() else t
        row = flat[0].numel() * flat.element_size() if flat.dim() > 1 else flat.element_size()
        step = max(1, self.nbytes // row)
        need = min(step, flat.shape[0]) * row
        if self.buf is None or self.buf.numel() < need:
            self.buf = None
            self.buf = torch.empty(max(need, min(self.nbytes, flat.numel() * flat.element_size())), dtype=torch.uint8, device=self.device)
        sending = dist.get_rank() == src
        for a in range(0, flat.shape[0], step):
            piece = flat[a : a + step]
            buf = self.buf[: piece.numel() * piece.element_size()].view(piece.dtype).view(piece.shape)
            if sending:
                buf.copy_(piece)
            dist.broadcast(buf, src, group=group)
            if not sending:
                piece.copy_(buf)


def _local_block(shard: torch.Tensor, item, i: int, tp_size: int, m) -> torch.Tensor:
    """This rank's part of HF tensor `i` of `item`, as a view of its megatron shard."""
    if item.rule.layout == "qkv":  # per query group: [q rows, k rows, v rows]
        groups = (m.num_query_groups or m.num_attention_heads) // tp_size
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        per_group = shard.reshape(groups, -1, *shard.shape[1:])
        q_rows = per_group.shape[1] - 2 * head_dim
        start, rows = [(0, q_rows), (q_rows, head_dim), (q_rows + head_dim, head_dim)][i]
        return per_group[:, start : start + rows]
    return shard.chunk(hf_mapping.LAYOUTS[item.rule.layout].tp_parts, item.rule.tp or 0)[i]


def _hf_block(out: torch.Tensor, item, r: int, tp_size: int, m) -> torch.Tensor:
    """TP rank r's block of the HF tensor `out`, shaped like `_local_block` on that rank."""
    if item.rule.layout == "qkv":
        groups = m.num_query_groups or m.num_attention_heads
        return out.reshape(groups, -1, *out.shape[1:]).chunk(tp_size, 0)[r]
    return out.chunk(tp_size, item.rule.tp or 0)[r]
