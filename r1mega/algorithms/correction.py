"""Rollout correction: importance weights for the gap between the policy that sampled (the rollout
engine, vLLM) and the trainer's old policy (megatron, same weights, other kernels and precision).

Both log-probs are of the sampled tokens at temperature 1: `engine_logp` as vLLM reports them,
`old_logp` recomputed by the trainer before the update. Per token the ratio is

    r_t = pi_old(y_t) / pi_engine(y_t) = exp(old_logp_t - engine_logp_t)

and the policy-gradient term of token t is multiplied by a detached weight w_t (`grpo_loss`'s
`is_weight`; the KL term is not weighted). `RolloutCorrectionConfig.mode` chooses w:

- `none`: w = 1 (the ratios are still measured, `rollout_correction_stats`).
- `tis`, truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
  brings you off-policy RL training"; verl `rollout_is: token`, slime's TIS): w_t = min(r_t, C),
  C = `tis_cap` (2 as in verl and slime).
- `mis_token`, masked importance sampling per token (Liu, Li et al. 2025, "When speed kills
  stability: demystifying RL collapse from the training-inference mismatch"; verl's token-level
  rejection sampling): w_t = r_t where mis_low <= r_t <= mis_high, else 0 (the token is dropped).
- `mis_sequence`, the same per sequence: rho = prod_t r_t = exp(sum_t log r_t) over the sequence's
  response tokens; every token gets w = rho when mis_low <= rho <= mis_high, else 0 (the whole
  sequence is dropped). Kept sequences carry rho, so the kept gradient stays importance-weighted.
- `geo_mis`, geometric-mean masking (Liu, Li et al.'s "Geo-RS"; verl `rollout_rs: geometric`):
  g = exp(mean_t log r_t) over the sequence's response tokens; the sequence is dropped when g leaves
  [mis_low, mis_high], kept with w = 1 otherwise (g is a length-normalised outlier test, not an
  unbiased weight). The geometric mean of ratios of ~1 +- 1e-3 stays close to 1: use bounds close to
  1 here (verl's docs: upper 1.0002 to 1.001), not the per-token defaults 0.5 / 2.

The modes do not combine (no mode applies TIS inside kept sequences): each is the published
estimator as is; a combination would be the product of two of these weights.

Dropped tokens add 0 to the surrogate but stay in the loss normaliser (the mini-batch's count of
response tokens or outputs, fixed before the log-probs exist), so masking shrinks the step instead
of rescaling the kept tokens; verl instead removes them from its denominator.

With `algorithm.old_logp_source=engine` the trainer skips its old-policy pass and the PPO ratio is
taken against the engine's log-probs (verl's "bypass" mode, the engine as the behaviour policy):
then r = 1, every weight is 1 and none of this changes the loss.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from r1mega.config.algorithm import CORRECTION_MODES, RolloutCorrectionConfig

OLD_LOGP_SOURCES = ("trainer", "engine")
# exp() of a sequence's summed log-ratio overflows for long sequences; bounds as verl's safety clamp.
_MAX_LOG_RATIO = 20.0
LN2 = math.log(2.0)


def log_ratio(old_logp: torch.Tensor, engine_logp: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """`[B, T]` log r = old_logp - engine_logp on response tokens, 0 elsewhere."""
    mask = response_mask.to(old_logp.device) > 0
    return torch.where(mask, old_logp.detach().double() - engine_logp.detach().to(old_logp.device).double(), 0.0)


def _sequence_log_ratio(lr: torch.Tensor, mask: torch.Tensor, geometric: bool) -> torch.Tensor:
    """`[B, 1]` sum (or mean, `geometric`) of the log-ratios of each sequence's response tokens."""
    total = lr.sum(-1, keepdim=True)
    return total / mask.sum(-1, keepdim=True).clamp(min=1) if geometric else total


def weights_and_kept(old_logp: torch.Tensor, engine_logp: torch.Tensor, response_mask: torch.Tensor,
                     cfg: RolloutCorrectionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[B, T]` weight w, `[B, T]` bool: response token not dropped) for `cfg.mode`; with `none`,
    w = r (the raw ratio, reported, not applied). Outside the response mask w = 0 and kept = False.
    Float64, detached."""
    if cfg.mode not in CORRECTION_MODES:
        raise ValueError(f"rollout_correction.mode={cfg.mode!r}; expected one of {CORRECTION_MODES}")
    mask = response_mask.to(old_logp.device) > 0
    lr = log_ratio(old_logp, engine_logp, mask)
    lo, hi = math.log(cfg.mis_low), math.log(cfg.mis_high)
    if cfg.mode in ("none", "tis", "mis_token"):
        w = lr.exp()
        kept = mask.clone()
        if cfg.mode == "tis":
            w = w.clamp(max=cfg.tis_cap)
        elif cfg.mode == "mis_token":
            kept &= (lr >= lo) & (lr <= hi)
    else:  # one value per sequence, broadcast to its tokens
        seq = _sequence_log_ratio(lr, mask, geometric=cfg.mode == "geo_mis")
        kept = mask & (seq >= lo) & (seq <= hi)
        w = seq.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp() if cfg.mode == "mis_sequence" else torch.ones_like(seq)
        w = w.expand_as(lr)
    return torch.where(kept, w, 0.0), kept


def rollout_is_weight(old_logp: torch.Tensor, engine_logp: torch.Tensor, response_mask: torch.Tensor,
                      cfg: RolloutCorrectionConfig) -> Optional[torch.Tensor]:
    """The detached `[B, T]` weight `grpo_loss` multiplies the policy-gradient term by (0 for dropped
    tokens), in `old_logp`'s dtype; None when `cfg.mode` is `none`."""
    if cfg.mode == "none":
        return None
    return weights_and_kept(old_logp, engine_logp, response_mask, cfg)[0].to(old_logp.dtype)


# Sums over response tokens that `reduce_correction_stats` turns into the `rollout_corr/*` metrics.
_SUMS = ("kl_k1", "kl_k3", "gap_gt_ln2", "weight", "kept", "tokens")


def rollout_correction_stats(old_logp: torch.Tensor, engine_logp: torch.Tensor, response_mask: torch.Tensor,
                             cfg: RolloutCorrectionConfig) -> dict[str, torch.Tensor]:
    """This batch's (`[B, T]`, one sequence per row) sums for the gap metrics, over response tokens:
    k1 = engine_logp - old_logp and k3 = r - 1 - log r (both estimate KL(engine || trainer) on the
    engine's samples), |log r| > ln 2, the weight of `weights_and_kept` (raw r with mode `none`) over
    kept tokens, kept and all tokens; and `weight_max` over kept tokens."""
    mask = response_mask.to(old_logp.device) > 0
    lr = log_ratio(old_logp, engine_logp, mask)
    w, kept = weights_and_kept(old_logp, engine_logp, mask, cfg)
    f = mask.double()
    return {
        "kl_k1": (-lr * f).sum(),
        "kl_k3": ((lr.exp() - 1 - lr) * f).sum(),
        "gap_gt_ln2": ((lr.abs() > LN2).double() * f).sum(),
        "weight": (w * kept).sum(),
        "kept": kept.double().sum(),
        "tokens": f.sum(),
        "weight_max": w.masked_fill(~kept, float("-inf")).max() if w.numel() else w.new_tensor(float("-inf")),
    }


def reduce_correction_stats(stats: list[dict[str, torch.Tensor]], group=None) -> dict[str, float]:
    """`rollout_corr/*` metrics from the `rollout_correction_stats` of many batches, summed (max) over
    the ranks of process group `group` too when it is given (a collective: every rank of `group`
    calls it). Token means: `kl_k1`, `kl_k3`, `frac_gap_gt_ln2` over response tokens, `masked_frac`
    (dropped / response tokens); `is_weight_mean` / `is_weight_max` over kept tokens. Empty when no
    batch has a response token."""
    sums = torch.tensor([[float(s[k]) for k in _SUMS] for s in stats], dtype=torch.float64).sum(0) if stats \
        else torch.zeros(len(_SUMS), dtype=torch.float64)
    top = torch.tensor(max((float(s["weight_max"]) for s in stats), default=float("-inf")), dtype=torch.float64)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(sums, group=group)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    s = dict(zip(_SUMS, sums.tolist()))
    if s["tokens"] <= 0:
        return {}
    out = {"rollout_corr/kl_k1": s["kl_k1"] / s["tokens"], "rollout_corr/kl_k3": s["kl_k3"] / s["tokens"],
           "rollout_corr/frac_gap_gt_ln2": s["gap_gt_ln2"] / s["tokens"],
           "rollout_corr/masked_frac": (s["tokens"] - s["kept"]) / s["tokens"]}
    if s["kept"] > 0:
        out["rollout_corr/is_weight_mean"] = s["weight"] / s["kept"]
        out["rollout_corr/is_weight_max"] = top.item()
    return out
