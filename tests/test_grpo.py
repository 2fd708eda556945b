"""GRPO advantages and objective against hand-computed values (arithmetic in the comments)."""
from __future__ import annotations

import math

import pytest
import torch

from r1mega.algorithms import (GRPOConfig, group_advantages, grpo_loss, loss_normalizer, reduce_stats,
                               zero_variance_groups)
from r1mega.config import CONF_DIR

F64 = torch.float64


def close(actual, expected, tol=1e-9):
    assert torch.allclose(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), atol=tol, rtol=0), (
        actual, expected)


# Two groups of G = 4. Group 0: rewards 1 0 0 1, mean 0.5, deviations +-0.5, sum of squares 1.
# Sample std (divisor G-1 = 3): sqrt(1/3) = 0.5773502692. Group 1: all 1 -> zero variance.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)


def test_advantages_sample_std():
    a = 0.8660254038  # 0.5 / 0.5773502692; the population std (0.5) would give exactly 1
    close(group_advantages(REWARDS, 4, eps=0.0), [a, -a, -a, a, 0, 0, 0, 0])


def test_advantages_eps_in_denominator():
    a = 0.7381705194  # 0.5 / (0.5773502692 + 0.1) = 0.5 / 0.6773502692
    close(group_advantages(REWARDS, 4, eps=0.1), [a, -a, -a, a, 0, 0, 0, 0])


def test_advantages_without_std_dr_grpo():
    close(group_advantages(REWARDS, 4, std_normalize=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_zero_variance_group_is_exactly_zero():
    # mean(0.1, 0.1, 0.1) rounds away from 0.1 in float; without the guard A = tiny / (tiny + eps) != 0.
    r = torch.tensor([0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.7, 0.2, 0.7])
    for std_normalize in (True, False):
        adv = group_advantages(r, 3, eps=0.0, std_normalize=std_normalize)
        assert not adv.isnan().any()
        assert (adv[:6] == 0).all() and (adv[6:] != 0).all()
    assert zero_variance_groups(r, 3).tolist() == [True, True, False]
    assert zero_variance_groups(REWARDS, 4).tolist() == [False, True]
    with pytest.raises(ValueError):
        group_advantages(r, 2)


# Two outputs (one per group), T = 3. Output 0: A = +1, ratios 1.0, 1.5, 0.5. Output 1: A = -2,
# ratios 0.5, 1.2 and a padding token (mask 0) with ratio 5. Asymmetric clip: eps_low 0.2, eps_high 0.28.
#   out 0: min(1*1, 1*1) = 1;  min(1.5, 1.28) = 1.28 (clipped high);  min(0.5, 0.8) = 0.5 (A > 0: no clip)
#   out 1: min(-1.0, -2*0.8 = -1.6) = -1.6 (clipped low);  min(-2.4, -2.4) = -2.4
# Per-token loss (beta = 0) = -surrogate: out 0: -1, -1.28, -0.5 (sum -2.78); out 1: 1.6, 2.4 (sum 4.0).
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.2, 5.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
ADV = torch.tensor([1.0, -2.0], dtype=F64)
OLD = torch.full((2, 3), -1.0, dtype=F64)
ASYM = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.0)


@pytest.mark.parametrize(
    "loss_agg, norm_length, expected",
    [
        ("token_mean", None, 0.244),  # (-2.78 + 4.0) / 5 tokens
        ("seq_mean_token_mean", None, 0.5366666667),  # (-2.78/3 + 4.0/2) / 2 = (-0.9266667 + 2) / 2
        ("seq_mean_token_sum_norm", 4, 0.1525),  # (-2.78/4 + 4.0/4) / 2 = (-0.695 + 1) / 2
        ("seq_mean_token_sum_norm", None, 0.2033333333),  # divisor = padded length 3: (1.22/3) / 2
    ],
)
def test_aggregation_and_asymmetric_clip(loss_agg, norm_length, expected):
    cfg = GRPOConfig(**ASYM, loss_agg=loss_agg, norm_length=norm_length)
    loss, stats = grpo_loss(OLD + RATIOS.log(), OLD, ADV, MASK, cfg)
    m = reduce_stats([stats])
    close(loss, expected)
    close(m["clip_frac_high"], 0.2)  # out 0 token 1 (ratio 1.5 > 1.28, A > 0): 1 of 5 tokens
    close(m["clip_frac_low"], 0.2)  # out 1 token 0 (ratio 0.5 < 0.8, A < 0): 1 of 5 tokens
    close(m["ratio_mean"], 0.94)  # (1 + 1.5 + 0.5 + 0.5 + 1.2) / 5; the padding's 5.0 is ignored
    close(m["ratio_max"], 1.5)


def test_dual_clip():
    # c = 3. Out 0 (A = +1), ratios 4, 1: min(4, 1.28) = 1.28; 1 -> loss -1.28, -1 (dual clip is for A < 0 only).
    # Out 1 (A = -2), ratios 4, 2: min(-8, -2.56) = -8 -> max(-8, 3*-2 = -6) = -6; min(-4, -2.56) = -4
    # -> max(-4, -6) = -4. Loss tokens 6, 4. token_mean = (-1.28 - 1 + 6 + 4) / 4 = 1.93 (9.72/4 = 2.43 without).
    ratios = torch.tensor([[4.0, 1.0], [4.0, 2.0]], dtype=F64)
    old, mask = torch.zeros(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64)
    for c, expected, frac in ((3.0, 1.93, 0.25), (None, 2.43, 0.0)):
        cfg = GRPOConfig(**ASYM, dual_clip_c=c, loss_agg="token_mean")
        loss, stats = grpo_loss(ratios.log(), old, ADV, mask, cfg)
        close(loss, expected)
        close(reduce_stats([stats])["dual_clip_frac"], frac)


def test_k3_kl():
    # rho = 1 and A = 0, so only beta * KL remains. log(pi_ref/pi) = 0, ln 2, -ln 2:
    # k3 = 1 - 0 - 1 = 0;  2 - 0.6931471806 - 1 = 0.3068528194;  0.5 + 0.6931471806 - 1 = 0.1931471806.
    # Mean = 0.5 / 3 = 0.1666666667; beta = 0.1 -> loss 0.0166666667 (KL is a penalty: it adds).
    logp = torch.full((1, 3), -2.0, dtype=F64)
    ref = logp + torch.tensor([[0.0, math.log(2), -math.log(2)]], dtype=F64)
    cfg = GRPOConfig(kl_coef=0.1, loss_agg="token_mean")
    loss, stats = grpo_loss(logp, logp, torch.zeros(1, dtype=F64), torch.ones(1, 3, dtype=F64), cfg, ref_logp=ref)
    m = reduce_stats([stats])
    close(loss, 0.0166666667)
    close(m["ref_kl"], 0.1666666667)
    close(m["approx_kl"], 0.0)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, torch.zeros(1, dtype=F64), torch.ones(1, 3, dtype=F64), cfg)


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_gradcheck(loss_agg):
    # Ratios away from the clip edges and from c (kinks); KL and dual clip on.
    ratios = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.1, 3.5]], dtype=F64)
    logp = (OLD + ratios.log()).requires_grad_()
    ref = OLD + 0.3
    cfg = GRPOConfig(**{**ASYM, "kl_coef": 0.05}, dual_clip_c=3.0, loss_agg=loss_agg, norm_length=5)
    mask = torch.ones(2, 3, dtype=F64)
    assert torch.autograd.gradcheck(lambda lp: grpo_loss(lp, OLD, ADV, mask, cfg, ref_logp=ref)[0], (logp,))


def test_analytic_gradient_token_mean():
    # d loss / d logp_t = -A rho_t / n where unclipped, 0 where clipped (A*rho outside the trust region).
    logp = (OLD + RATIOS.log()).requires_grad_()
    grpo_loss(logp, OLD, ADV, MASK, GRPOConfig(**ASYM, loss_agg="token_mean"))[0].backward()
    close(logp.grad, [[-1.0 / 5, 0.0, -0.5 / 5], [0.0, 2.0 * 1.2 / 5, 0.0]], tol=1e-12)


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_on_policy_without_kl_is_policy_gradient(loss_agg):
    # rho = 1, beta = 0: the gradient is that of -agg(A * logp) (REINFORCE with the group baseline).
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 5, generator=g, dtype=F64) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=F64)
    adv = torch.tensor([0.9, -0.3, 1.7, -2.0], dtype=F64)
    cfg = GRPOConfig(kl_coef=0.0, loss_agg=loss_agg)
    (grad,) = torch.autograd.grad(grpo_loss(logp, logp.detach(), adv, mask, cfg)[0], logp)
    pg = adv[:, None] * logp * mask
    reference = {
        "token_mean": -pg.sum() / mask.sum(),
        "seq_mean_token_mean": -(pg.sum(1) / mask.sum(1)).mean(),
        "seq_mean_token_sum_norm": -(pg.sum(1) / 5).mean(),
    }[loss_agg]
    (expected,) = torch.autograd.grad(reference, logp)
    close(grad, expected, tol=1e-12)


def test_overlong_filtered_outputs_do_not_count():
    # The GRPO step's fields (prompt of 2 tokens, 3 response tokens: prediction positions 1..3). With
    # algorithm.overlong_filter the truncated output 1 has no loss token, is not in the normaliser, and
    # the loss is output 0's alone, -2.78/3 = -0.9266666667 (not halved by an empty output).
    from r1mega.trainer.grpo import Sample

    samples = [Sample(0, [5, 6], [7, 8, 9], [-1.0] * 3, truncated, {}) for truncated in (False, True)]
    assert [s.fields(overlong_filter=False)["resp_mask"].tolist() for s in samples] == [[0, 1, 1, 1, 0]] * 2
    mask = torch.stack([s.fields(overlong_filter=True)["resp_mask"][1:4] for s in samples]).double()
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0]]
    cfg = GRPOConfig(**ASYM)
    normalizer = loss_normalizer(mask, cfg.loss_agg)
    assert normalizer == 1.0
    loss, _ = grpo_loss(OLD + RATIOS.log(), OLD, ADV, mask, cfg, normalizer=normalizer)
    close(loss, -0.9266666667)


def test_config_composes_from_yaml():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="algorithm/grpo", overrides=["algorithm.clip_eps_high=0.28"])
    algo = OmegaConf.to_object(cfg.algorithm)
    assert isinstance(algo, GRPOConfig)
    assert algo == GRPOConfig(clip_eps_high=0.28)  # the YAML restates the dataclass defaults
    assert (algo.kl_coef, algo.ref_update_optimizer_steps, algo.loss_agg) == (0.001, 400, "seq_mean_token_mean")
