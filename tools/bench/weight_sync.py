"""Weight sync megatron-core → vLLM: seconds, GB/s against this machine's memcpy, and peak extra memory.

    python tools/bench/weight_sync.py                                  # dsv3_proxy: DeepSeek-V3's structure, 95 MB synced
    python tools/bench/weight_sync.py model=tiny_dense                 # Qwen2 shape scaled to ~80 MB
    python tools/bench/weight_sync.py model=dsv3_proxy model.num_layers=8 --bucket-mb 4

Positional arguments are config overrides (`r1mega.config.compose`). The default model is `dsv3_proxy`
(MLA at DeepSeek-V3's ranks, 256 experts in its MoE layer; its MTP layer is not synced: vLLM drops it),
so the sync moves DeepSeek-V3's tensor mix: 821 tensors, 768 of them small expert tensors (64 KB),
next to 4.7 MB q_b projections.
`tiny_dense`/`tiny_moe` without any `model.*` override are scaled up (DEFAULT_SCALE) so that the model
is tens of MB. One run prints, for the same
model: model bytes; sync seconds and GB/s into a real in-process vLLM (CPU) engine and into a null
sink (the sync alone: gather, unshard, cast, bucketing; the tensors are dropped); the memcpy GB/s of
this machine measured in the same run (`torch.clone` of a buffer of the model's size) and the ratios;
the peak extra memory of a sync (torch CPU allocator, via the profiler's allocation events) against
the bucket size and the bound bucket + largest tensor. Sync timings are the median of `--repeats`
after one warm-up sync. Written to run under torchrun too (engine on rank 0, every rank prints its
own peak memory), but a 2-rank run has not completed here yet (timed out on an overloaded machine);
the 2-rank memory bound is asserted by tests/test_rollout_sync.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# tiny_dense (Qwen2 shape) at ~80 MB fp32; tiny_moe (DeepSeek-V3 shape, MLA dims fixed by vLLM's CPU MLA) ~70 MB.
DEFAULT_SCALE = {
    "tiny_dense": ["model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
                   "model.num_query_groups=2", "model.ffn_hidden_size=2048", "model.vocab_size=4096"],
    "tiny_moe": ["model.num_layers=6", "model.hidden_size=512", "model.num_attention_heads=8",
                 "model.ffn_hidden_size=1024", "model.moe_ffn_hidden_size=256", "model.num_experts=16",
                 "model.moe_shared_expert_intermediate_size=256", "model.vocab_size=4096"],
}


def _memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst = src.clone()
        times.append(time.perf_counter() - start)
        del dst
    return nbytes / statistics.median(times[1:]) / 1e9


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocations, vLLM's first reload
    times = []
    for _ in range(repeats):
        _barrier()
        start = time.perf_counter()
        fn()
        _barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write_hf_dir(chunks, model_cfg, out: Path, rank: int) -> None:
    """The HF directory vLLM starts from: config + tokenizer + the model's current weights (rank 0 writes;
    every rank joins the collective export)."""
    from r1mega.checkpoint.hf_io import write_hf
    from r1mega.checkpoint.hf_mapping import hf_config, iter_hf_tensors
    from tests.hf_fixtures import EOS_ID, tiny_tokenizer

    config = dict(hf_config(model_cfg), bos_token_id=0, eos_token_id=EOS_ID)
    tensors = iter_hf_tensors(chunks, model_cfg, dst=0)
    if rank == 0:
        for _ in write_hf(out, tensors, config):
            pass
        tiny_tokenizer(model_cfg.vocab_size).save_pretrained(out)
    else:
        for _ in tensors:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=tiny_moe model.num_layers=8")
    parser.add_argument("--bucket-mb", type=float, default=None, help="sync bucket (default: rollout.sync_bucket_mb)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-engine", action="store_true", help="only the null sink (no vLLM)")
    args = parser.parse_args()

    from r1mega.config import compose
    from r1mega.parallel.state import destroy_distributed, init_distributed
    from r1mega.rollout.sync import WeightSync, peak_extra_bytes
    from r1mega.trainer.engine import MegatronEngine

    overrides = list(args.overrides)
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "dsv3_proxy")
    if not any(o.startswith("model.") for o in overrides):
        overrides += DEFAULT_SCALE.get(model, [])
    cfg = compose([f"model={model}", "rollout=vllm_cpu"] + [o for o in overrides if not o.startswith("model=")])
    if "RANK" not in os.environ:  # a single process: any free port (29500 may be taken by another run)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    launch = init_distributed(cfg.parallel, cfg.platform)
    rank, world = launch.rank, launch.world_size
    trainer = MegatronEngine(cfg, trainable=False)
    bucket = int(args.bucket_mb * 2**20) if args.bucket_mb else None
    sync = WeightSync(cfg.model, cfg.parallel, cfg.rollout, bucket_bytes=bucket)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    say(f"model: {cfg.model.name} {' '.join(o for o in overrides if o.startswith('model.'))}")
    say(f"layout: world {world}, {cfg.parallel.name}; engine dtype {cfg.rollout.dtype}; torch threads {torch.get_num_threads()}")
    say(f"model bytes: {sync.total_bytes / 1e6:.1f} MB in {len(sync.plan)} tensors; largest tensor "
        f"{sync.largest_bytes / 1e6:.2f} MB; bucket {sync.bucket_bytes / 1e6:.2f} MB ({len(sync.buckets)} buckets)")

    memcpy = _memcpy_gbps(sync.total_bytes, args.repeats)
    say(f"memcpy: {memcpy:.2f} GB/s (torch clone of a {sync.total_bytes / 1e6:.1f} MB buffer, median of {args.repeats})")

    gb = sync.total_bytes / 1e9
    null_s = _timed(lambda: sync.sync(trainer.model, None), args.repeats)
    say(f"sync -> null sink: {null_s:.4f} s, {gb / null_s:.2f} GB/s, ratio to memcpy {gb / null_s / memcpy:.2f}")

    peak = peak_extra_bytes(lambda: sync.sync(trainer.model, None))
    bound = sync.bucket_bytes + sync.largest_bytes
    line = (f"peak extra memory (null sink), rank {rank}: {peak / 1e6:.2f} MB = {peak / sync.bucket_bytes:.2f} x bucket; "
            f"bound bucket + largest = {bound / 1e6:.2f} MB: {'OK' if peak <= bound else 'EXCEEDED'}")
    for r in range(world):  # every rank's own line, in rank order
        _barrier()
        if r == rank:
            print(line, flush=True)

    if not args.no_engine:
        from r1mega.rollout.vllm_engine import VLLMEngine

        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = Path(tmp) / "hf"
            _write_hf_dir(trainer.model, cfg.model, hf_dir, rank)
            _barrier()
            engine = VLLMEngine(hf_dir, cfg.rollout) if rank == 0 else None
            vllm_s = _timed(lambda: sync.sync(trainer.model, engine), args.repeats)
            ratio = gb / vllm_s / memcpy
            say(f"sync -> vLLM engine: {vllm_s:.4f} s, {gb / vllm_s:.2f} GB/s, ratio to memcpy {ratio:.2f} (goal >= 0.5)")
            peak_engine = peak_extra_bytes(lambda: sync.sync(trainer.model, engine))
            say(f"peak extra memory (vLLM engine, rank 0, sync + vLLM's reload buffers): {peak_engine / 1e6:.2f} MB "
                f"= {peak_engine / sync.bucket_bytes:.2f} x bucket")
            if engine is not None:
                engine.shutdown()
    say(json.dumps({"model_bytes": sync.total_bytes, "memcpy_gbps": round(memcpy, 3), "null_sync_s": round(null_s, 5),
                    "vllm_sync_s": None if args.no_engine else round(vllm_s, 5), "bucket_bytes": sync.bucket_bytes,
                    "peak_extra_bytes": peak, "largest_bytes": sync.largest_bytes}))
    _barrier()
    destroy_distributed()
    os._exit(0)  # vLLM's in-process engine leaves threads behind


if __name__ == "__main__":
    main()
