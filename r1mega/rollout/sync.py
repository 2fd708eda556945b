"""Bucketed weight sync megatron-core → rollout engine.

The plan (HF names, shapes, buckets) is computed once from the configs (`hf_mapping.export_plan`);
every step streams the model's HF tensors with the checkpoint mapping's export stream
(`hf_mapping.iter_hf_tensors`: TP shards gathered with fused layouts undone, experts gathered across
EP, layers broadcast from their PP stage), in the engine dtype, grouped into buckets of at most
`bucket_mb` (a tensor larger than a bucket travels alone). All ranks run the collectives; only ranks
holding an engine load anything.

Memory: peak extra memory per rank ≤ bucket + largest HF tensor (tests/test_rollout_sync.py
measures it): the stream holds one HF tensor and a communication buffer of `stage_bytes`, which
this module sizes to half the smaller of bucket and largest tensor. Tensors that need no
communication or conversion are handed over as views of the parameters.

Multi-token prediction layers (HF `model.layers.{num_layers + k}.*`) are not sent: vLLM's
DeepSeek-V3 `load_weights` drops them (`get_spec_layer_idx_from_weight_name`; only a separate MTP
draft model for speculative decoding reads them, and the rollout engine runs none), and they are
the largest layer plus copies of the embedding and output head."""
from __future__ import annotations

from typing import Iterator

import torch

from r1mega.checkpoint.hf_mapping import PlanEntry, export_plan, iter_hf_tensors
from r1mega.rollout.engine import RolloutEngine

Bucket = list[tuple[str, torch.Tensor]]


def engine_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def plan_buckets(plan: list[PlanEntry], bucket_bytes: int) -> list[list[PlanEntry]]:
    """Consecutive plan entries grouped so each group holds ≤ bucket_bytes (or one larger tensor)."""
    buckets: list[list[PlanEntry]] = [[]]
    size = 0
    for e in plan:
        nbytes = _nbytes(e)
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(e)
        size += nbytes
    return [b for b in buckets if b]


def _nbytes(e: PlanEntry) -> int:
    return torch.Size(e.shape).numel() * e.dtype.itemsize


class WeightSync:
    """Built once per run on every rank; `sync(chunks, engine)` after every optimizer step."""

    def __init__(self, model_cfg, parallel_cfg, rollout_cfg, bucket_bytes: int | None = None):
        self.model_cfg = model_cfg
        self.dtype = engine_dtype(rollout_cfg.dtype)
        self.bucket_bytes = bucket_bytes or int(rollout_cfg.sync_bucket_mb * 2**20)
        # MTP layers are not sent (see the module docstring).
        self.plan = export_plan(model_cfg, parallel_cfg, dtype=self.dtype, mtp=False)
        self.buckets = plan_buckets(self.plan, self.bucket_bytes)
        self.total_bytes = sum(_nbytes(e) for e in self.plan)
        self.largest_bytes = max(_nbytes(e) for e in self.plan)
        # The stream's communication buffer: part of the slack the bound leaves next to the bucket.
        self.stage_bytes = max(1, min(self.bucket_bytes, self.largest_bytes) // 2)

    def iter_buckets(self, chunks) -> Iterator[Bucket]:
        """Collective: every rank must consume this to the end. The consumer should drop (or clear)
        each bucket before asking for the next."""
        stream = iter_hf_tensors(chunks, self.model_cfg, dtype=self.dtype, mtp=False, buffer_bytes=self.stage_bytes)
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
