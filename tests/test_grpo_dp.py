"""Data parallelism divides the GRPO step (fp32, CPU, spawned gloo processes; tiny_moe, the DeepSeek-V3
architecture):
- the update at DP2 equals the update in one process, and each DP rank trains about half the tokens;
- for every loss aggregation, a mini-batch's gradient does not depend on how it is divided: packed or
  one sample per (padded) microbatch, 1, 2 or 4 microbatches, DP1 or DP2.

Samples are fixed (no rollout engine): the step's `_collect` is replaced by a scripted rollout of 4
groups. As in tests/test_sft.py, the MoE sequence aux loss and the expert-bias update are off: megatron
computes them per packed row (pad tokens count), so they legitimately depend on the packing.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
BASE = ["model=tiny_moe", "model.moe_aux_loss_coeff=0", "model.moe_router_bias_update_rate=0", "algorithm.group_size=4",
        "recipe=r1_zero", "recipe.max_response_tokens=24", "optim.clip_grad=1e9"]


def _samples(vocab: int):
    from r1mega.trainer.grpo import Sample

    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(16):  # 4 groups of 4; prompts 6..9 tokens, responses 12..23: 18..30 (any two > 30)
        p, r = 6 + i % 4, 12 + (7 * i) % 12
        ids = torch.randint(1, vocab, (p + r,), generator=g).tolist()
        reward = float((i * 5) % 3 == 0)
        out.append(Sample(i // 4, ids[:p], ids[p:], (-torch.rand(r, generator=g)).tolist(), i % 7 == 3,
                          {"total": reward, "accuracy": reward}))
    return out


def _trainer(overrides: list[str]):
    from r1mega.config import compose
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine
    from r1mega.trainer.grpo import GRPOTrainer, Sample

    cfg = compose([*BASE, *overrides])
    init_distributed(cfg.parallel, cfg.platform)
    policy, ref = MegatronEngine(cfg), MegatronEngine(cfg, trainable=False)
    trainer = GRPOTrainer(cfg, policy, ref, None, None, None)
    trainer.refresh_reference(0)
    samples = _samples(cfg.model.vocab_size)
    trainer._collect = lambda step: [Sample(**vars(s)) for s in samples]  # noqa: E731
    return trainer


def _update(overrides: list[str]) -> dict:
    """Two optimizer steps (2 mini-batches) of a real GRPO step; the weights after it."""
    # Adam moves a weight by about lr x g / (|g| + eps): with eps 1e-8, gradients of ~1e-8 turn fp32
    # summation-order noise (~1e-8) into differences of a sizeable fraction of lr; eps 1e-6 bounds them.
    trainer = _trainer(["algorithm.num_mini_batches=2", "optim.lr=1e-4", "optim.adam_eps=1e-6", *overrides])
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    m = trainer.step(0)
    after = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    # Back in the rollout phase the gradient buffers are freed (recipe.offload_train_state).
    freed = all(b.grad_data.untyped_storage().size() == 0 for c in trainer.policy.model for b in c.buffers)
    return {"before": before, "after": after, "metrics": m, "grads_freed": freed}


# DeepSeek-V3's path: MoE with an MTP layer, its loss on in RL (off by default).
MTP = ["model.mtp_num_layers=1", "algorithm.mtp_loss_coef=0.3"]


@pytest.mark.parametrize("extra", [[], MTP], ids=["moe", "moe_mtp_loss"])
def test_grpo_update_at_dp2_equals_one_process(extra):
    (one,) = run_distributed(_update, 1, extra)
    two = run_distributed(_update, 2, extra)
    for r in two:
        for n, p in r["before"].items():
            assert torch.equal(p, one["before"][n]), f"{n}: initial weights differ"
        moved = max((one["after"][n] - p).abs().max().item() for n, p in one["before"].items())
        assert moved > 1e-4  # the update did something (Adam: about lr per step)
        for n, p in r["after"].items():
            assert (p - one["after"][n]).abs().max().item() <= 1e-5, n
    assert one["grads_freed"] and all(r["grads_freed"] for r in two)
    local = [r["metrics"]["dp/local_response_tokens"] for r in two]
    assert sum(local) == one["metrics"]["dp/local_response_tokens"]  # every token on exactly one rank
    assert all(0.35 <= t / sum(local) <= 0.65 for t in local), local
    # loss/total sums per-token terms of size ~1 that cancel to ~1e-3: fp32 leaves ~1e-7 of them.
    for key in ("loss/total", "loss/ratio_max", "loss/entropy", "loss/adv_std", "logprob_gap/mean"):
        assert two[0]["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-6), key
    # ratio_max is a true max over every microbatch of every rank, not a weighted mean of maxima.
    assert one["metrics"]["loss/ratio_max"] >= 1.0
    if extra:
        mtp = [n for n in one["before"] if n.startswith("mtp.")]
        assert mtp and max((one["after"][n] - one["before"][n]).abs().max().item() for n in mtp) > 1e-5
        assert two[0]["metrics"]["loss/mtp"] == pytest.approx(one["metrics"]["loss/mtp"], rel=1e-5)


def _grads(overrides: list[str]) -> dict:
    """The gradient of one mini-batch (lr 0) for each aggregation and microbatch layout, per layout."""
    from r1mega.parallel.state import data_parallel

    # Without the distributed optimizer every rank holds the whole all-reduced gradient to compare.
    trainer = _trainer(["algorithm.num_mini_batches=1", "optim.lr=0", "parallel.use_distributed_optimizer=false", *overrides])
    trainer.colocation.to_training()  # reload the state offloaded for the (skipped) rollout
    samples = trainer._collect(0)
    rewards = torch.tensor([s.scores["total"] for s in samples])
    from r1mega.algorithms import group_advantages

    for s, a in zip(samples, group_advantages(rewards, 4).tolist()):
        s.advantage = a
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    out, computed = {}, {}
    for agg in AGGS:
        trainer.algo.loss_agg = agg
        trainer.loss_cfg = trainer.algo.__class__(**{**vars(trainer.algo), "norm_length": 24})
        # padded: one sample per microbatch; packed into 1 (whole mini-batch), 2 or 4 microbatches;
        # full_logits: the LM head at every position, not only where a response token is predicted.
        for layout, max_tokens in (("padded", longest), ("packed1", 4096), ("packed2", 220), ("packed4", 110),
                                   ("full_logits", 220)):
            trainer.cfg.recipe.train_max_tokens = max_tokens
            mb = trainer._pack(samples)
            if layout == "full_logits":
                for m in mb.microbatches:
                    m["logit_index"] = None
            trainer._logprobs(trainer.policy, [mb], "old_logp")
            trainer._logprobs(trainer.ref, [mb], "ref_logp")
            trainer._update(mb)
            grads = {n: p.main_grad.detach().clone() for n, p in trainer.policy.named_parameters()}
            out[(agg, layout)] = (len(mb.microbatches), grads)
            # Positions without logits hold log-prob 0: exactly the prompt and padding positions.
            computed[layout] = sum(int((m["old_logp"] != 0).sum()) for m in mb.microbatches)
    return {"grads": out, "dp": data_parallel()[1], "computed": computed,
            "response_positions": sum(len(s.response_ids) for s in trainer._collect(0))}


def test_minibatch_gradient_does_not_depend_on_division():
    # With an MTP layer (DeepSeek-V3's model; its loss off, so the passes compute logits at the response
    # positions alone, `PolicyGPTModel`'s logit_index) and against logits at every position.
    (one,) = run_distributed(_grads, 1, MTP[:1])
    two = run_distributed(_grads, 2, MTP[:1])
    counts = {layout: n for (agg, layout), (n, _) in one["grads"].items() if agg == "token_mean"}
    assert counts["packed1"] == 1 and counts["packed2"] == 2 and counts["packed4"] == 4 and counts["padded"] == 16
    for r in (one, *two):  # this rank's share: a response position has a log-prob, nothing else does
        assert r["computed"]["packed2"] < r["computed"]["full_logits"]
    assert one["computed"]["packed2"] == one["response_positions"]
    for agg in AGGS:
        ref = one["grads"][(agg, "padded")][1]
        assert max(g.abs().max().item() for g in ref.values()) > 1e-4
        for result in (one, *two):
            for (a, layout), (_, grads) in result["grads"].items():
                if a != agg:
                    continue
                for n, g in grads.items():
                    assert (g - ref[n]).abs().max().item() <= 1e-6, (agg, layout, result["dp"], n)


def _update_r3(overrides: list[str]) -> dict:
    """A GRPO step with R3 routing replay of scripted engine routes (sample j: its own k experts per
    token), held by rank 0 as the CPU engine's would be; which samples' routes each rank received."""
    from functools import partial

    from r1mega.models.build import build_model
    from r1mega.models.router_replay import route_shape
    from r1mega.trainer import engine as trainer_engine

    real = trainer_engine.MegatronEngine
    trainer_engine.MegatronEngine = lambda cfg, **kw: real(cfg, build_fn=partial(build_model, routing_replay=True), **kw)
    try:
        trainer = _trainer(["algorithm.router_replay=r3", "algorithm.num_mini_batches=2", "optim.lr=1e-4",
                            "optim.adam_eps=1e-6", *overrides])
    finally:
        trainer_engine.MegatronEngine = real
    layers, k, experts = route_shape(trainer.policy.model)
    scripted = trainer._collect(0)
    for j, s in enumerate(scripted):
        s.uid = (0, 0, j)
    trainer._collect = lambda step: [type(s)(**vars(s)) for s in scripted]  # noqa: E731
    import torch.distributed as dist

    routes = {}
    for j, s in enumerate(scripted):
        block = torch.arange(k) + (j * k) % experts
        routes[j] = block.expand(len(s.prompt_ids) + len(s.response_ids) - 1, layers, k).to(torch.uint8).clone()
    alone = not dist.is_initialized() or dist.get_world_size() == 1
    if alone or dist.get_rank() == 0:
        trainer._held_routes = {(0, 0, j): r for j, r in routes.items()}
    received, deliver = [], trainer._deliver_routes

    def spy(parts):
        deliver(parts)
        received.extend(s.uid[2] for part in parts for s in part if s.routes is not None)

    trainer._deliver_routes = spy
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.step(0)
    after = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    effect = None
    if alone:  # the old-policy pass really replays: without the routes its log-probs differ
        mb = trainer._pack([type(s)(**{**vars(s), "routes": routes[j]}) for j, s in enumerate(scripted)])
        with trainer._old_policy_routes([mb]):
            trainer._logprobs(trainer.policy, [mb], "replayed")
        trainer._logprobs(trainer.policy, [mb], "own")
        effect = max((m["replayed"] - m["own"]).abs().max().item() for m in mb.microbatches)
    return {"before": before, "after": after, "received": sorted(received), "effect": effect}


def test_r3_routes_go_only_to_the_rank_that_trains_them_and_dp2_equals_one_process():
    (one,) = run_distributed(_update_r3, 1, [])
    two = run_distributed(_update_r3, 2, [])
    assert one["received"] == list(range(16)) and one["effect"] > 1e-3, one["effect"]
    shares = [set(r["received"]) for r in two]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(16)) and all(shares), shares
    for r in two:
        for n, p in r["after"].items():
            assert (p - one["after"][n]).abs().max().item() <= 1e-5, n


def _update_shortcut(args) -> dict:
    """A GRPO step with or without the on-policy shortcut (no old-policy pass for the first mini-batch)."""
    shortcut, overrides = args
    from functools import partial

    from r1mega.models.build import build_model
    from r1mega.trainer import engine as trainer_engine

    real = trainer_engine.MegatronEngine
    trainer_engine.MegatronEngine = lambda cfg, **kw: real(cfg, build_fn=partial(build_model, routing_replay=True), **kw)
    try:
        trainer = _trainer(["optim.lr=1e-4", "optim.adam_eps=1e-6", *overrides])
    finally:
        trainer_engine.MegatronEngine = real
    trainer.on_policy_shortcut = shortcut
    m = trainer.step(0)
    return {"after": {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}, "metrics": m}


@pytest.mark.parametrize("overrides", [["algorithm.num_mini_batches=2", "algorithm.router_replay=r2"],
                                       ["algorithm.num_mini_batches=1"]], ids=["two_minibatches_r2", "one_minibatch"])
def test_on_policy_minibatch_skips_the_old_policy_pass_and_updates_identically(overrides):
    (fast,) = run_distributed(_update_shortcut, 1, (True, overrides))
    (full,) = run_distributed(_update_shortcut, 1, (False, overrides))
    for n, p in fast["after"].items():
        assert (p - full["after"][n]).abs().max().item() <= 1e-6, n
    for key in ("loss/total", "loss/ratio_max", "loss/ratio_mean", "logprob_gap/mean"):
        assert fast["metrics"][key] == pytest.approx(full["metrics"][key], rel=1e-6, abs=1e-7), key
    assert ("time/old_logp" in fast["metrics"]) == (overrides[0] != "algorithm.num_mini_batches=1")
    assert "moe/load_max_over_mean" in fast["metrics"]


def _shared_prompt_passes(overrides: list[str]) -> dict:
    """Reference log-probs and the update's gradient (lr 0) of a mini-batch of 4 groups x 4 outputs of
    one prompt each, packed whole and with each group's prompt laid out once (`recipe.share_prompts`)."""
    from r1mega.algorithms import group_advantages
    from r1mega.trainer.grpo import Sample
    from r1mega.trainer.records import _trainer_logprobs

    trainer = _trainer(["model=tiny_dense", "algorithm.num_mini_batches=1", "optim.lr=0",
                        "parallel.use_distributed_optimizer=false", *overrides])
    trainer.cfg.recipe.train_max_tokens = 120  # several microbatches
    trainer.loss_cfg = trainer.algo.__class__(**{**vars(trainer.algo), "norm_length": 24})
    trainer.colocation.to_training()
    g = torch.Generator().manual_seed(5)
    samples = []
    for grp in range(4):
        prompt = torch.randint(1, trainer.cfg.model.vocab_size, (5 + 2 * grp,), generator=g).tolist()
        for j in range(4):
            r = 6 + (5 * grp + 3 * j) % 13
            response = torch.randint(1, trainer.cfg.model.vocab_size, (r,), generator=g).tolist()
            reward = float((grp + j) % 3 == 0)
            samples.append(Sample(grp, prompt, response, (-torch.rand(r, generator=g)).tolist(), j == 3,
                                  {"total": reward, "accuracy": reward}))
    for s, a in zip(samples, group_advantages(torch.tensor([s.scores["total"] for s in samples]), 4).tolist()):
        s.advantage = a
    out = {}
    for share in (False, True):
        trainer.cfg.recipe.share_prompts = share
        mb = trainer._pack(samples)
        trainer._logprobs(trainer.ref, [mb], "ref_logp")
        ref = {k: v.clone() for k, v in _trainer_logprobs(samples, [samples], [mb]).items()}  # old_logp's reader
        for m in mb.microbatches:
            m["old_logp"] = m["ref_logp"]
        trainer._update(mb)
        out[share] = {"grads": {n: p.main_grad.detach().clone() for n, p in trainer.policy.named_parameters()},
                      "ref_logp": _trainer_logprobs(samples, [samples], [mb]), "tokens": mb.real_tokens}
        assert all(torch.equal(out[share]["ref_logp"][k], v) for k, v in ref.items())
    return out


def test_shared_prompts_give_the_same_logprobs_and_gradient_with_fewer_tokens():
    # At DP2 (each rank packs its groups; the gradients are all-reduced); DP2 against one process is
    # test_minibatch_gradient_does_not_depend_on_division's.
    two = run_distributed(_shared_prompt_passes, 2, [])
    assert max(g.abs().max().item() for g in two[0][False]["grads"].values()) > 1e-4
    assert sorted(k for r in two for k in r[False]["ref_logp"]) == list(range(16))  # each sample on one rank
    # 4 groups x 3 repeats of prompts of 5, 7, 9, 11 tokens, less the last token each: 3 x (4 + 6 + 8 + 10) fewer
    assert sum(r[False]["tokens"] - r[True]["tokens"] for r in two) == 3 * (4 + 6 + 8 + 10)
    for r in two:
        whole, shared = r[False], r[True]
        assert sorted(shared["ref_logp"]) == sorted(whole["ref_logp"])
        for k, v in shared["ref_logp"].items():
            assert (v - whole["ref_logp"][k]).abs().max().item() <= 1e-5, k
        for n, g in shared["grads"].items():
            assert (g - whole["grads"][n]).abs().max().item() <= 1e-6, n
