"""Rollout correction (r1mega.algorithms.correction): importance weights for the engine-trainer
log-prob gap against hand-computed values, the weighted GRPO loss, the `rollout_corr/*` metrics, the
config rules, and one real GRPO step with `old_logp_source=engine` (arithmetic in the comments)."""
from __future__ import annotations

import math

import pytest
import torch

from r1mega.algorithms import GRPOConfig, grpo_loss
from r1mega.algorithms.correction import (RolloutCorrectionConfig, reduce_correction_stats, rollout_correction_stats,
                                          rollout_is_weight, weights_and_kept)

F64 = torch.float64


def close(actual, expected, tol=1e-9):
    assert torch.allclose(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), atol=tol, rtol=0), (
        actual, expected)


# Two sequences, T = 4. Ratios r = pi_old / pi_engine on the response tokens:
#   seq 0: 3, 0.6, 1 (and a padding position with ratio 10, mask 0);  seq 1: 1.5, 0.25 (two padding positions).
# Product per sequence: 1.8 and 0.375; geometric mean: 1.8^(1/3) = 1.2164 and 0.375^(1/2) = 0.6124.
RATIOS = torch.tensor([[3.0, 0.6, 1.0, 10.0], [1.5, 0.25, 10.0, 10.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=F64)
ENGINE = torch.full((2, 4), -2.0, dtype=F64)
OLD = ENGINE + RATIOS.log()


def cfg(mode, **kw):
    return RolloutCorrectionConfig(mode=mode, **kw)


@pytest.mark.parametrize("mode, kw, weights", [
    # TIS, C = 2: the 3 is capped at 2 (cap hit), the rest pass unchanged.
    ("tis", {}, [[2.0, 0.6, 1.0, 0], [1.5, 0.25, 0, 0]]),
    # TIS, C = 4: no cap hit, w = r.
    ("tis", {"tis_cap": 4.0}, [[3.0, 0.6, 1.0, 0], [1.5, 0.25, 0, 0]]),
    # MIS per token, keep r in [0.5, 2]: 3 and 0.25 dropped, the others keep w = r.
    ("mis_token", {}, [[0, 0.6, 1.0, 0], [1.5, 0, 0, 0]]),
    # MIS per sequence, [0.5, 2]: seq 0's product 1.8 kept (all its tokens weigh 1.8), seq 1's 0.375 dropped.
    ("mis_sequence", {}, [[1.8, 1.8, 1.8, 0], [0, 0, 0, 0]]),
    # ... at [0.8, 1.25] seq 0's product 1.8 is out as well.
    ("mis_sequence", {"mis_low": 0.8, "mis_high": 1.25}, [[0, 0, 0, 0], [0, 0, 0, 0]]),
    # Geometric mean, [0.8, 1.25]: seq 0's 1.2164 kept with w = 1, seq 1's 0.6124 dropped.
    ("geo_mis", {"mis_low": 0.8, "mis_high": 1.25}, [[1, 1, 1, 0], [0, 0, 0, 0]]),
    # ... at [0.5, 2] both kept.
    ("geo_mis", {}, [[1, 1, 1, 0], [1, 1, 0, 0]]),
])
def test_weights(mode, kw, weights):
    w = rollout_is_weight(OLD, ENGINE, MASK, cfg(mode, **kw))
    close(w, weights)
    assert w.dtype == OLD.dtype and not w.requires_grad


def test_no_weight_without_correction_and_raw_ratio_reported():
    assert rollout_is_weight(OLD, ENGINE, MASK, cfg("none")) is None
    w, kept = weights_and_kept(OLD, ENGINE, MASK, cfg("none"))
    close(w, RATIOS * MASK)
    assert kept.tolist() == (MASK > 0).tolist()


# Metrics on the example, 5 response tokens; sum of log r = ln(3 x 0.6 x 1 x 1.5 x 0.25) = ln 0.675.
K1 = -math.log(0.675) / 5  # mean(engine_logp - old_logp) = 0.3930425881 / 5 = 0.0786085176
K3 = (6.35 - 5 - math.log(0.675)) / 5  # mean(r - 1 - ln r): sum r = 6.35 -> (1.35 + 0.3930425881) / 5 = 0.3486085176
GAP = 0.4  # |ln r| > ln 2: ln 3 = 1.10 and ln 0.25 = -1.39; not ln 0.6 = -0.51, 0, ln 1.5 = 0.41


@pytest.mark.parametrize("mode, kw, w_mean, w_max, masked", [
    ("none", {}, 6.35 / 5, 3.0, 0.0),  # raw ratios; the padding's 10 is not a maximum
    ("tis", {}, 5.35 / 5, 2.0, 0.0),  # 2 + 0.6 + 1 + 1.5 + 0.25 = 5.35
    ("mis_token", {}, 3.1 / 3, 1.5, 0.4),  # kept 0.6, 1, 1.5; 2 of 5 dropped
    ("mis_sequence", {}, 1.8, 1.8, 0.4),  # seq 0 kept (3 tokens of 1.8), seq 1's 2 tokens dropped
    ("geo_mis", {"mis_low": 0.8, "mis_high": 1.25}, 1.0, 1.0, 0.4),
])
def test_metrics(mode, kw, w_mean, w_max, masked):
    c = cfg(mode, **kw)
    one = reduce_correction_stats([rollout_correction_stats(OLD, ENGINE, MASK, c)])
    # Per-sequence batches (as microbatches or DP ranks hold them) reduce to the same token means.
    split = reduce_correction_stats([rollout_correction_stats(OLD[i:i + 1], ENGINE[i:i + 1], MASK[i:i + 1], c)
                                     for i in range(2)])
    for m in (one, split):
        close(m["rollout_corr/kl_k1"], K1)
        close(m["rollout_corr/kl_k3"], K3)
        close(m["rollout_corr/frac_gap_gt_ln2"], GAP)
        close(m["rollout_corr/is_weight_mean"], w_mean)
        close(m["rollout_corr/is_weight_max"], w_max)
        close(m["rollout_corr/masked_frac"], masked)


def test_metrics_without_tokens_or_kept_tokens():
    assert reduce_correction_stats([]) == {}
    assert reduce_correction_stats([rollout_correction_stats(OLD, ENGINE, torch.zeros_like(MASK), cfg("tis"))]) == {}
    m = reduce_correction_stats([rollout_correction_stats(OLD, ENGINE, MASK, cfg("mis_sequence", mis_high=1.25))])
    assert m["rollout_corr/masked_frac"] == 1.0 and "rollout_corr/is_weight_mean" not in m


def test_overflowing_sequence_ratio_is_dropped_not_nan():
    # 4,000 tokens of ratio e: the product e^4000 overflows float64; the log-space test drops it.
    old, eng, mask = torch.ones(1, 4000, dtype=F64), torch.zeros(1, 4000, dtype=F64), torch.ones(1, 4000, dtype=F64)
    assert rollout_is_weight(old, eng, mask, cfg("mis_sequence")).abs().sum() == 0
    assert math.isfinite(reduce_correction_stats([rollout_correction_stats(old, eng, mask, cfg("mis_sequence"))])
                         ["rollout_corr/kl_k1"])


# grpo_loss with is_weight, 2 x 3 (tests/test_grpo.py's example). Ratios pi/pi_old 1, 1.5, 0.5 (A = +1) and
# 0.5, 1.2, pad (A = -2); eps_low 0.2, eps_high 0.28. Clipped surrogate: 1, 1.28, 0.5 | -1.6, -2.4.
# Weights 2, 0.5, 0 | 1, 0.25, (pad 7): weighted 2, 0.64, 0 | -1.6, -0.6; per-token loss -2, -0.64, 0 | 1.6, 0.6.
#   token_mean: (-2.64 + 2.2) / 5 = -0.088 (the weight-0 token still counts among the 5)
#   seq_mean_token_mean: (-2.64/3 + 2.2/2) / 2 = (-0.88 + 1.1) / 2 = 0.11
LOSS_RATIOS = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.2, 5.0]], dtype=F64)
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
ADV = torch.tensor([1.0, -2.0], dtype=F64)
LOSS_OLD = torch.full((2, 3), -1.0, dtype=F64)
W = torch.tensor([[2.0, 0.5, 0.0], [1.0, 0.25, 7.0]], dtype=F64)
ASYM = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0)


@pytest.mark.parametrize("loss_agg, expected", [("token_mean", -0.088), ("seq_mean_token_mean", 0.11)])
def test_grpo_loss_with_is_weight(loss_agg, expected):
    logp = (LOSS_OLD + LOSS_RATIOS.log()).requires_grad_()
    loss, _ = grpo_loss(logp, LOSS_OLD, ADV, LOSS_MASK, GRPOConfig(**ASYM, loss_agg=loss_agg), is_weight=W)
    close(loss, expected)
    if loss_agg == "token_mean":
        # d/d logp_t = -w_t A rho_t / 5 where unclipped; 0 where clipped (tokens 1 and 3) or w = 0 (token 2).
        loss.backward()
        close(logp.grad, [[-2.0 / 5, 0.0, 0.0], [0.0, 2.0 * 1.2 * 0.25 / 5, 0.0]], tol=1e-12)


def test_is_weight_does_not_scale_the_kl_term():
    # rho = 1, all weights 0: only beta * k3 is left. log(pi_ref/pi) = 0, ln 2, -ln 2 on one output:
    # k3 = 0, 0.3068528194, 0.1931471806 (sum 0.5); token_mean over 3 tokens x beta 0.1 = 0.0166666667.
    logp = torch.full((1, 3), -2.0, dtype=F64)
    ref = logp + torch.tensor([[0.0, math.log(2), -math.log(2)]], dtype=F64)
    c = GRPOConfig(kl_coef=0.1, loss_agg="token_mean")
    loss, _ = grpo_loss(logp, logp, torch.ones(1, dtype=F64), torch.ones(1, 3, dtype=F64), c, ref_logp=ref,
                        is_weight=torch.zeros(1, 3, dtype=F64))
    close(loss, 0.0166666667)


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_unit_weights_change_nothing(loss_agg):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g, dtype=F64) * 3
    logp = (old + 0.3 * torch.randn(4, 5, generator=g, dtype=F64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=F64)
    adv, ref = torch.tensor([0.9, -0.3, 1.7, -2.0], dtype=F64), old + 0.2
    c = GRPOConfig(kl_coef=0.05, dual_clip_c=3.0, loss_agg=loss_agg)
    plain, s0 = grpo_loss(logp, old, adv, mask, c, ref_logp=ref)
    ones, s1 = grpo_loss(logp, old, adv, mask, c, ref_logp=ref, is_weight=torch.ones(4, 5, dtype=F64))
    assert plain.item() == ones.item() and s0.keys() == s1.keys()
    g0, g1 = (torch.autograd.grad(x, logp)[0] for x in (plain, ones))
    assert torch.equal(g0, g1)
    # old_logp_source=engine: old_logp is engine_logp, so every mode's weight is exactly 1.
    for mode in ("tis", "mis_token", "mis_sequence", "geo_mis"):
        assert torch.equal(rollout_is_weight(old, old, mask, cfg(mode)), mask)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.rollout_correction.mode=is"], "algorithm.rollout_correction.mode='is' is not one of none, tis,"),
    (["algorithm.rollout_correction.tis_cap=1"], "algorithm.rollout_correction.tis_cap=1.0 must be above 1"),
    (["algorithm.rollout_correction.mis_low=1.2"], "algorithm.rollout_correction.mis_low=1.2 must be in (0, 1)"),
    (["algorithm.rollout_correction.mis_high=1"], "algorithm.rollout_correction.mis_high=1.0 must be above 1"),
    (["algorithm.old_logp_source=vllm"], "algorithm.old_logp_source='vllm' is not one of trainer, engine."),
    (["algorithm.rollout_correction.mode=tis", "recipe.temperature=0.7"],
     "algorithm.rollout_correction.mode=tis needs recipe.temperature=1.0, not 0.7"),
    (["algorithm.old_logp_source=engine", "recipe.temperature=0.7"],
     "algorithm.old_logp_source=engine needs recipe.temperature=1.0, not 0.7"),
])
def test_config_rules(overrides, message):
    from r1mega.config import ConfigError, compose

    with pytest.raises(ConfigError) as e:
        compose(["recipe=r1_zero", *overrides])
    assert any(message in p for p in e.value.problems), e.value.problems


# ---- one real GRPO step (tiny_moe, CPU, scripted samples as in tests/test_grpo_dp.py) ---------------------

def _two_steps() -> list[dict]:
    """Step 0: rollout_correction.mode=tis against the trainer's old log-probs; step 1: the same with
    old_logp_source=engine (no old-policy pass). Each step's metrics gain the `is_weight` tensors that
    reached `grpo_loss`."""
    import r1mega.trainer.grpo as trainer_module
    from r1mega.config import compose
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine
    from r1mega.trainer.grpo import GRPOTrainer, Sample

    cfg = compose(["model=tiny_moe", "recipe=r1_zero", "algorithm.group_size=4", "algorithm.num_mini_batches=2",
                   "algorithm.kl_coef=0", "algorithm.rollout_correction.mode=tis", "recipe.max_response_tokens=16"])
    init_distributed(cfg.parallel, cfg.platform)
    trainer = GRPOTrainer(cfg, MegatronEngine(cfg), None, None, None, None)
    g = torch.Generator().manual_seed(3)
    samples = []
    for i in range(8):  # 2 groups of 4; engine log-probs near the random model's (~ -ln vocab)
        p, r = 5 + i % 3, 6 + (5 * i) % 10
        ids = torch.randint(1, cfg.model.vocab_size, (p + r,), generator=g).tolist()
        logp = (-math.log(cfg.model.vocab_size) + 0.5 * torch.randn(r, generator=g)).tolist()
        samples.append(Sample(i // 4, ids[:p], ids[p:], logp, False, {"total": float(i % 2), "accuracy": float(i % 2)}))
    trainer._collect = lambda step: [Sample(**vars(s)) for s in samples]  # noqa: E731
    weights, loss = [], trainer_module.grpo_loss
    trainer_module.grpo_loss = lambda *a, **kw: (weights.append((kw["is_weight"], a[3])), loss(*a, **kw))[1]
    out = [trainer.step(0)]
    out[0]["weights"], weights[:] = list(weights), []
    trainer.algo.old_logp_source = "engine"
    out.append(trainer.step(1))
    out[1]["weights"] = list(weights)
    return out


def test_grpo_step_with_tis_and_with_engine_old_logp():
    from tests.distributed import run_distributed

    (steps,) = run_distributed(_two_steps, 1)
    trainer_src, engine_src = steps
    names = ("kl_k1", "kl_k3", "frac_gap_gt_ln2", "is_weight_mean", "is_weight_max", "masked_frac")
    for name in names:
        assert math.isfinite(trainer_src[f"rollout_corr/{name}"]), name
    assert 0 < trainer_src["rollout_corr/is_weight_max"] <= 2.0  # TIS cap
    assert trainer_src["rollout_corr/masked_frac"] == 0.0 and trainer_src["rollout_corr/kl_k3"] >= 0
    assert trainer_src["time/old_logp"] > 0 and "logprob_gap/mean" in trainer_src
    # The weights reach the loss: TIS, capped at 2, not all 1; with old_logp = engine_logp exactly 1.
    w = torch.cat([x[m > 0] for x, m in trainer_src["weights"]])
    assert w.max() <= 2.0 and (w == 2.0).any() and (w < 1).any()
    assert all(torch.equal(x, m) for x, m in engine_src["weights"])
    # engine as pi_old: no old-policy pass, nothing to compare, the ratio of the first update is pi/pi_engine.
    assert "time/old_logp" not in engine_src and not any(k.startswith("rollout_corr/") for k in engine_src)
    assert "logprob_gap/mean" not in engine_src
    for m in (trainer_src, engine_src):
        assert math.isfinite(m["loss/total"]) and m["optimizer_steps"] == 2
        assert m["moe/load_max_over_mean"] >= 1.0  # recorded in the updates when the old-policy pass is skipped
