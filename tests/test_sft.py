"""SFT on packed sequences (fp32, CPU, spawned gloo processes):
- packing is invisible: each sequence's loss in a packed microbatch equals its loss alone, and the
  gradient of a packed step equals the unpacked step's and the token-weighted sum of per-sequence gradients;
- with EP2 (DP2: each rank trains on half of the step's samples) the step matches one process;
- SFT on a tiny model drives the training loss down (R1-form rows through the chat rendering).

The equality tests run with lr=0 (the weights stay put, so every gradient is taken at the same point)
and, for the MoE model, without the sequence aux loss and the expert-bias update: megatron computes the
"sequence" aux loss over a packed row, and pad tokens count towards the expert load, so those two
legitimately depend on how samples are packed.
"""
from __future__ import annotations

import re

import pytest
import torch

from tests.distributed import run_distributed

TOL = 1e-5
MODELS = ["tiny_moe", "tiny_dense"]
EQUALITY = ["optim.lr=0", "optim.clip_grad=1e9"]  # clip_grad > 0 makes megatron report the grad norm
NO_PACKING_DEPENDENT_MOE = ["model.moe_aux_loss_coeff=0", "model.moe_router_bias_update_rate=0"]


def _cfg(model: str, parallel: str, extra: list[str]):
    from r1mega.config import compose

    return compose([f"model={model}", f"parallel={parallel}", *extra,
                    *(NO_PACKING_DEPENDENT_MOE if model == "tiny_moe" else [])])


def _samples(vocab: int, n: int = 6) -> list[dict]:
    """Random sequences of 17..32 tokens (any two exceed 32, so max_tokens=32 puts each alone)."""
    from r1mega.trainer.sft import sft_sample

    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        length = 17 + (5 * i) % 15
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        out.append(sft_sample(ids[:5 + i % 3], ids[5 + i % 3:-1], eos_id=0))
    return out


def _grads(engine) -> dict[str, torch.Tensor]:
    return {n: p.main_grad.detach().clone() for n, p in engine.named_parameters()}


def _per_sequence_nll(engine, packed) -> list[float]:
    """Mean NLL of each sequence of `packed` (forward only), in sample-index order."""
    from r1mega.algorithms import vocab_parallel_logprobs
    from r1mega.data.packing import unpack

    def loss_fn(logits, batch):
        logp, _ = vocab_parallel_logprobs(logits, batch["target"])
        return logits.sum() * 0.0, torch.tensor(1), {"logp": logp.detach(), "mask": batch["loss_mask"]}

    out = {}
    for place, m in zip(packed.placement, engine.forward_backward(packed.microbatches, loss_fn, forward_only=True)):
        for (i, _, _), lp, mask in zip(place, unpack(m["logp"], place), unpack(m["mask"], place)):
            out[i] = (-(lp * mask).sum() / mask.sum()).item()
    return [out[i] for i in sorted(out)]


def _single(model: str, init_dir: str) -> dict:
    from r1mega.checkpoint.distributed import save_model
    from r1mega.data.packing import pack
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine
    from r1mega.trainer.sft import sft_step

    cfg = _cfg(model, "single", EQUALITY)
    if not __import__("torch").distributed.is_initialized():
        init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg)
    if model == "tiny_moe":  # the EP2 run starts from these weights (expert init depends on the layout)
        save_model(engine.model, init_dir)
    samples = _samples(cfg.model.vocab_size)
    out = {
        "packed_nll": _per_sequence_nll(engine, pack(samples, 1024)),
        "alone_nll": [_per_sequence_nll(engine, pack([s], len(s["tokens"])))[0] for s in samples],
        "microbatches": len(pack(samples, 1024).microbatches),
    }
    out["packed"] = sft_step(engine, samples, max_tokens=1024)
    out["packed_grads"] = _grads(engine)
    out["unpacked"] = sft_step(engine, samples, max_tokens=32)
    out["unpacked_grads"] = _grads(engine)
    out["unpacked_microbatches"] = len(pack(samples, 32).microbatches)
    out["alone"], weighted, total = [], None, 0.0
    for s in samples:
        out["alone"].append(sft_step(engine, [s], max_tokens=1024))
        n = float(s["loss_mask"].sum())
        g = _grads(engine)
        weighted = {k: n * v for k, v in g.items()} if weighted is None else {k: weighted[k] + n * v for k, v in g.items()}
        total += n
    out["weighted_grads"] = {k: v / total for k, v in weighted.items()}
    out["moved"] = max((p.main_grad.abs().max().item() for _, p in engine.named_parameters()))
    if model == "tiny_moe":
        out["infer"] = _infer_side_effects(engine, pack(samples, 1024).microbatches)
        out["colocation"] = _colocation_round_trip(engine, MegatronEngine(cfg, trainable=False))
    return out


def _infer_side_effects(engine, microbatches) -> dict:
    """What a forward-only pass of a trainable MoE policy leaves behind: whether its logits carried an
    autograd graph, and whether the routers counted its tokens for the aux-loss-free bias update."""
    routers = [m for c in engine.model for m in c.modules() if getattr(m, "local_tokens_per_expert", None) is not None]
    before = [r.local_tokens_per_expert.clone() for r in routers]
    graphs = engine.infer(microbatches, lambda logits, batch: logits.requires_grad)
    return {"graphs": graphs, "routers": len(routers),
            "counted": any(not torch.equal(b, r.local_tokens_per_expert) for b, r in zip(before, routers))}


def _colocation_round_trip(policy, ref) -> dict:
    """The GRPO step's offload hooks over one colocation cycle (recorded in order) on a trained policy
    (grads and optimizer state; the weights stay for the sync), and the reference's weights through
    `offload` / `onload`: what each held before and after, and where the weights were in between."""
    from functools import partial

    from r1mega.rollout.colocate import Colocation

    calls: list[str] = []

    class Rollout:  # the engine's side of the protocol
        def sleep(self, level):
            calls.append(f"sleep{level}")

        def wake_up(self, tags):
            calls.append(f"wake_{'+'.join(tags)}")

    class Sync:
        def sync(self, chunks, engine):
            calls.append("sync")
            during["grads_freed"] = all(b.grad_data.untyped_storage().size() == 0 for c in policy.model for b in c.buffers)

    def hook(name, fn):
        return lambda: (calls.append(name), fn())

    def state(engine):
        opts = getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]) if engine.optimizer else []
        return {"weights": [p.detach().clone() for _, p in engine.named_parameters()],
                "grads": [p.main_grad.detach().clone() for _, p in engine.named_parameters()] if opts else [],
                "optimizer": [v.clone() for o in opts for st in o.optimizer.state.values() for v in st.values()
                              if torch.is_tensor(v)]}

    during: dict = {}
    colocation = Colocation(Rollout(), Sync(), offload=hook("offload", partial(policy.offload, weights=False)),
                            onload=hook("onload", policy.onload))
    before = state(policy)
    colocation.to_training()
    colocation.to_rollout(policy.model)
    colocation.to_training()
    out = {"calls": calls, "during": during, "policy": (before, state(policy))}
    ptrs = [p.untyped_storage().data_ptr() for _, p in ref.named_parameters()]
    ref_before = state(ref)
    ref.offload()
    during["ref_moved"] = all(p.untyped_storage().data_ptr() != q for (_, p), q in zip(ref.named_parameters(), ptrs))
    during["ref_host"] = [p.detach().clone() for _, p in ref.named_parameters()]
    ref.onload()
    out["ref"] = (ref_before, state(ref))
    return out


def _ep2(model: str, init_dir: str) -> dict:
    """EP2 = DP2 here: each rank packs and trains on half of the samples; expert grads keyed by global index."""
    from megatron.core import parallel_state as ps

    from r1mega.checkpoint.distributed import load_model
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine
    from r1mega.trainer.sft import sft_step

    # all-reduced gradients (the distributed optimizer leaves each rank only its shard reduced)
    cfg = _cfg(model, "ep2", [*EQUALITY, "parallel.use_distributed_optimizer=false"])
    init_distributed(cfg.parallel, cfg.platform)
    engine = MegatronEngine(cfg)
    load_model(engine.model, init_dir)
    metrics = sft_step(engine, _samples(cfg.model.vocab_size), max_tokens=1024)
    local = cfg.model.num_experts // ps.get_expert_model_parallel_world_size()
    offset = ps.get_expert_model_parallel_rank() * local
    grads = {re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{offset + int(m.group(1))}.", n): g
             for n, g in _grads(engine).items()}
    return {"metrics": metrics, "grads": grads, "dp": ps.get_data_parallel_world_size(), "tokens": metrics["tokens"]}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    init = tmp_path_factory.mktemp("sft_init")
    (results,) = run_distributed(_singles, 1, str(init))
    return {"init": str(init), **results}


def _singles(init_dir: str) -> dict:  # one process for both models: spawning costs more than the tests
    return {model: _single(model, f"{init_dir}/{model}") for model in MODELS}


def _close_grads(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= TOL, f"{what}: {name} differs by {diff:.2e}"


@pytest.mark.parametrize("model", MODELS)
def test_packed_equals_unpacked(single, model):
    r = single[model]
    assert r["microbatches"] == 1 and r["unpacked_microbatches"] == len(r["alone"]) == 6
    for i, (packed, alone, step) in enumerate(zip(r["packed_nll"], r["alone_nll"], r["alone"])):
        assert abs(packed - alone) <= TOL, f"{model} sequence {i}: packed {packed} vs alone {alone}"
        assert abs(step["loss"] - alone) <= TOL  # sft_step's loss of one sample is that sample's loss
    # The step loss is the token mean over all sequences, whatever the packing.
    assert abs(r["packed"]["loss"] - r["unpacked"]["loss"]) <= TOL
    assert abs(r["packed"]["grad_norm"] - r["unpacked"]["grad_norm"]) <= TOL * r["packed"]["grad_norm"]
    assert r["packed"]["packing_efficiency"] == 1.0 and r["unpacked"]["packing_efficiency"] < 1.0
    assert r["moved"] > 1e-4  # gradients are not trivially zero
    _close_grads(r["packed_grads"], r["unpacked_grads"], f"{model} packed vs unpacked")
    _close_grads(r["packed_grads"], r["weighted_grads"], f"{model} packed vs token-weighted per-sequence")


def test_infer_keeps_no_graph_and_no_router_counts(single):
    """The old-policy pass runs on the trainable policy: no activations kept for a backward, and its
    tokens stay out of the expert-bias counts (megatron counts only under grad, as in training)."""
    assert single["tiny_moe"]["infer"] == {"graphs": [False], "routers": 3, "counted": False}


def test_offload_hooks_run_in_colocation_order_and_round_trip_state(single):
    r = single["tiny_moe"]["colocation"]
    assert r["calls"] == ["sleep1", "onload", "offload", "wake_weights", "sync", "wake_kv_cache", "sleep1", "onload"]
    assert r["during"]["grads_freed"] and r["during"]["ref_moved"]  # the ref's weights were in host copies
    before, after = r["policy"]
    assert len(before["optimizer"]) > 0 and any(g.abs().max() > 0 for g in before["grads"])
    assert all(torch.equal(a, b) for a, b in zip(before["weights"], after["weights"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before["optimizer"], after["optimizer"], strict=True))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in after["grads"])  # gradients come back zeroed
    before, after = r["ref"]
    for a, host, b in zip(before["weights"], r["during"]["ref_host"], after["weights"], strict=True):
        assert torch.equal(a, host) and torch.equal(a, b)


def test_ep2_data_parallel_matches_one_process(single):
    ref = single["tiny_moe"]
    ranks = run_distributed(_ep2, 2, "tiny_moe", str(__import__("pathlib").Path(single["init"]) / "tiny_moe"))
    assert all(r["dp"] == 2 for r in ranks)
    assert sum(r["tokens"] for r in ranks) == ref["packed"]["tokens"]  # each rank had its half
    grads = {}
    for r in ranks:
        assert abs(r["metrics"]["loss"] - ref["packed"]["loss"]) <= TOL, (r["metrics"]["loss"], ref["packed"]["loss"])
        assert abs(r["metrics"]["grad_norm"] - ref["packed"]["grad_norm"]) <= TOL * ref["packed"]["grad_norm"]
        grads.update(r["grads"])
    _close_grads(grads, ref["packed_grads"], "EP2 vs one process")


def _train(rows: list[dict], steps: int) -> dict:
    from r1mega.data import arithmetic
    from r1mega.config.schema import ArithmeticConfig
    from r1mega.data.tokenizer import train_tokenizer
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine
    from r1mega.trainer.sft import SFTConfig, rows_to_samples, train_sft, with_schedule

    cfg = _cfg("tiny_dense", "single", [])
    init_distributed(cfg.parallel, cfg.platform)
    docs = arithmetic.pretraining_corpus(ArithmeticConfig(), 300, seed=0)
    tok = train_tokenizer([p + c for p, c in docs], cfg.model.vocab_size)
    sft = SFTConfig(steps=steps, epochs=100, batch_size=8, max_tokens=256, seed=0, lr=3e-3, warmup_steps=2)
    samples, dropped = rows_to_samples(rows + [{"problem": "x" * 2000, "response": "y"}], tok, "r1", sft.max_tokens)
    engine = MegatronEngine(with_schedule(cfg, sft, len(samples)))

    class Log:
        def __init__(self):
            self.rows = []

        def log(self, step, m):
            self.rows.append((step, m))

    log, hooked = Log(), []
    summary = train_sft(engine, samples, sft, logger=log, on_step=lambda step, m: hooked.append(step))
    return {"summary": summary, "log": log.rows, "hooked": hooked, "dropped": dropped,
            "decoded": tok.decode(samples[0]["tokens"].tolist())}


def test_sft_drives_loss_down():
    rows = [{"id": f"r{a}", "problem": f"What is {a} + {2 * a % 7}?", "reasoning": f"{a} + {2 * a % 7} = {a + 2 * a % 7}",
             "summary": f"The answer is \\boxed{{{a + 2 * a % 7}}}."} for a in range(16)]
    (r,) = run_distributed(_train, 1, rows, 40)
    s, log = r["summary"], r["log"]
    assert r["dropped"] == 1  # the overlong row
    assert r["decoded"] == "<|User|>What is 0 + 0?<|Assistant|><think>\n0 + 0 = 0\n</think>\nThe answer is \\boxed{0}.<|endoftext|>"
    assert [step for step, _ in log] == list(range(1, 41)) == r["hooked"]
    for key in ("loss", "grad_norm", "lr", "packing_efficiency", "tokens", "epoch", "throughput/train_tokens_per_s"):
        assert key in log[0][1], key
    assert log[0][1]["lr"] < log[3][1]["lr"]  # warmup
    assert s["steps"] == 40 and s["epochs"] == 20
    first = sum(m["loss"] for _, m in log[:3]) / 3
    last = sum(m["loss"] for _, m in log[-3:]) / 3
    assert last < 0.5 * first, (first, last)
