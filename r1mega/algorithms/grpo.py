"""The GRPO objective (R1 paper eq. 1-2) with the variants its users rely on (DAPO, Dr.GRPO, dual clip)."""
from __future__ import annotations

from typing import Optional

import torch

from r1mega.config.algorithm import LOSS_AGG, GRPOConfig


def loss_normalizer(response_mask: torch.Tensor, mode: str) -> float:
    """This batch's contribution to the loss normaliser of `mode`: response tokens (`token_mean`) or
    outputs with at least one response token (the sequence means). `response_mask`: `[B, T]`. Sum it
    over the whole mini-batch (every microbatch, every data-parallel rank) for `grpo_loss`."""
    if mode not in LOSS_AGG:
        raise ValueError(f"loss_agg={mode!r}; expected one of {LOSS_AGG}")
    if mode == "token_mean":
        return float(response_mask.sum())
    return float((response_mask.sum(-1) > 0).sum())


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm_length: Optional[int],
               normalizer: float) -> torch.Tensor:
    """Sum `[B, T]` over this batch's tokens (token_mean) or per-output values (sequence means), divided
    by the mini-batch's global `normalizer`. Outputs with no response token (overlong-filtered) add 0
    and are not counted, so they do not dilute the rest."""
    token_sum = (per_token * mask).sum(-1)
    if mode == "token_mean":
        total = token_sum.sum()
    elif mode == "seq_mean_token_mean":
        total = (token_sum / mask.sum(-1).clamp(min=1)).sum()
    elif mode == "seq_mean_token_sum_norm":
        total = (token_sum / (norm_length or mask.size(-1))).sum()
    else:
        raise ValueError(f"loss_agg={mode!r}; expected one of {LOSS_AGG}")
    return total / max(normalizer, 1.0)


# Per-token quantities `grpo_loss` reports as sums over response tokens (means after `reduce_stats`).
TOKEN_STATS = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "ratio_mean", "ref_kl", "entropy")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: GRPOConfig,
    normalizer: Optional[float] = None,
    ref_logp: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    is_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This batch's share of the loss to minimise, -(clipped surrogate - beta * KL), and its stats.

    `logp`, `old_logp`, `ref_logp`, `entropy`, `response_mask`: `[B, T]`; `advantages`: `[B]`, one
    per output (eq. 3), applied to each of its tokens. Only `logp` carries gradient. `ref_logp` is
    required when `cfg.kl_coef` is not 0. `is_weight` (`[B, T]`, detached; None = 1): the rollout
    correction's importance weight (`r1mega.algorithms.correction.rollout_is_weight`), multiplying each
    token's clipped surrogate, not its KL term; a token of weight 0 adds no surrogate but stays in the
    normaliser.

    `normalizer`: the mini-batch's global count (`loss_normalizer` summed over every microbatch and
    data-parallel rank of the optimizer step), so that the shares of all microbatches and ranks add up
    to the mini-batch loss whatever the packing; None = this batch is the whole mini-batch.

    Stats (detached): for each name in `TOKEN_STATS` its sum over response tokens, `tokens` (their
    count), and `ratio_max`; `reduce_stats` turns those of many batches and ranks into means and a max.
    """
    mask = response_mask.to(logp.dtype)
    if normalizer is None:
        normalizer = loss_normalizer(mask, cfg.loss_agg)
    adv = advantages.detach().to(logp.dtype).unsqueeze(-1)
    ratio = (logp - old_logp.detach()).exp()
    clipped = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    dual = torch.zeros_like(mask, dtype=torch.bool)
    if cfg.dual_clip_c is not None:
        # A < 0 and rho far above 1: the min picks -|A| rho, unbounded; cap its magnitude at c|A|.
        dual = (adv < 0) & (surrogate < cfg.dual_clip_c * adv)
        surrogate = torch.where(dual, cfg.dual_clip_c * adv, surrogate)
    if is_weight is not None:
        surrogate = surrogate * is_weight.detach().to(surrogate)
    per_token = -surrogate

    kl = None
    if ref_logp is not None:
        log_ref_ratio = ref_logp.detach() - logp  # k3 (eq. 2): pi_ref/pi - log(pi_ref/pi) - 1 >= 0
        kl = log_ref_ratio.exp() - log_ref_ratio - 1
        per_token = per_token + cfg.kl_coef * kl
    elif cfg.kl_coef != 0:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logp")
    loss = _aggregate(per_token, mask, cfg.loss_agg, cfg.norm_length, normalizer)

    with torch.no_grad():
        per_token_stats = {
            "clip_frac_low": (ratio < 1 - cfg.clip_eps_low) & (adv < 0),
            "clip_frac_high": (ratio > 1 + cfg.clip_eps_high) & (adv > 0),
            "dual_clip_frac": dual,
            # KL(pi_old || pi) by k3 on the rollout's tokens: how far this update moved the policy.
            "approx_kl": ratio - 1 - ratio.log(),
            "ratio_mean": ratio,
            "ref_kl": kl,
            "entropy": entropy,
        }
        stats = {k: (v.to(mask.dtype) * mask).sum() for k, v in per_token_stats.items() if v is not None}
        stats["tokens"] = mask.sum()
        stats["ratio_max"] = ratio.masked_fill(mask == 0, float("-inf")).max() if mask.numel() else mask.new_tensor(float("-inf"))
    return loss, {k: v.detach() for k, v in stats.items()}


def reduce_stats(stats: list[dict[str, torch.Tensor]], group=None) -> dict[str, float]:
    """Token means of `TOKEN_STATS` and the max ratio over the `grpo_loss` stats of many batches,
    summed (max) over the ranks of process group `group` too when it is given (a collective: every
    rank of `group` calls it, with or without stats of its own)."""
    names = list(TOKEN_STATS)
    rows = [[float(s.get(k, 0.0)) for k in names] + [float(k in s) for k in names] + [float(s["tokens"])] for s in stats]
    sums = torch.tensor(rows, dtype=torch.float64).sum(0) if rows else torch.zeros(2 * len(names) + 1, dtype=torch.float64)
    top = torch.tensor(max((float(s["ratio_max"]) for s in stats), default=float("-inf")), dtype=torch.float64)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(sums, group=group)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    tokens = sums[-1].item()
    out = {k: sums[i].item() / tokens for i, k in enumerate(names) if sums[len(names) + i] > 0 and tokens > 0}
    if tokens > 0:
        out["ratio_max"] = top.item()
    return out
