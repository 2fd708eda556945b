"""The GRPO objective (R1 paper eq. 1-2) with the variants its users rely on (DAPO, Dr.GRPO, dual clip)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore

LOSS_AGG = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


@dataclass
class GRPOConfig:
    """Every knob of the GRPO update; defaults are the R1 paper's where it gives one."""

    group_size: int = 16  # G outputs per prompt (R1-Zero: 16)
    clip_eps_low: float = 0.2  # rho >= 1 - eps_low ...
    clip_eps_high: float = 0.2  # ... rho <= 1 + eps_high; DAPO clip-higher: 0.28
    dual_clip_c: Optional[float] = None  # for A < 0 the objective is at least c * A (verl: 3.0); None = off
    kl_coef: float = 0.001  # beta (R1 paper)
    ref_update_interval: Optional[int] = 400  # steps between ref <- policy (R1 paper); None = fixed ref
    loss_agg: str = "seq_mean_token_mean"  # one of LOSS_AGG; paper: mean over tokens, then over outputs
    norm_length: Optional[int] = None  # Dr.GRPO's constant divisor (max response length); None = padded length
    std_normalize: bool = True  # divide advantages by the group std; False = Dr.GRPO
    adv_eps: float = 1e-6  # added to the group std
    ppo_epochs: int = 1  # passes over each rollout batch (R1 paper: one inner epoch)
    num_mini_batches: int = 16  # optimizer steps per rollout batch (R1 paper: 8,192 outputs in 16)
    dynamic_sampling: bool = False  # drop zero-variance groups and refill (DAPO)
    overlong_filter: bool = False  # zero loss weight for truncated outputs (DAPO)


def register_configs() -> None:
    ConfigStore.instance().store(group="algorithm", name="grpo_schema", node=GRPOConfig)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm_length: Optional[int]) -> torch.Tensor:
    """Reduce `[B, T]` to a scalar. Sequence means run over outputs with at least one token, so
    outputs removed by overlong filtering do not dilute the rest."""
    if mode == "token_mean":
        return _masked_mean(per_token, mask)
    token_sum = (per_token * mask).sum(-1)
    if mode == "seq_mean_token_mean":
        per_seq = token_sum / mask.sum(-1).clamp(min=1)
    elif mode == "seq_mean_token_sum_norm":
        per_seq = token_sum / (norm_length or mask.size(-1))
    else:
        raise ValueError(f"loss_agg={mode!r}; expected one of {LOSS_AGG}")
    return _masked_mean(per_seq, (mask.sum(-1) > 0).to(per_seq.dtype))


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: GRPOConfig,
    ref_logp: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss to minimise, -(clipped surrogate - beta * KL), and detached metrics.

    `logp`, `old_logp`, `ref_logp`, `entropy`, `response_mask`: `[B, T]`; `advantages`: `[B]`, one
    per output (eq. 3), applied to each of its tokens. Only `logp` carries gradient. `ref_logp` is
    required when `cfg.kl_coef` is not 0.
    """
    mask = response_mask.to(logp.dtype)
    adv = advantages.detach().to(logp.dtype).unsqueeze(-1)
    ratio = (logp - old_logp.detach()).exp()
    clipped = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    dual = torch.zeros_like(mask, dtype=torch.bool)
    if cfg.dual_clip_c is not None:
        # A < 0 and rho far above 1: the min picks -|A| rho, unbounded; cap its magnitude at c|A|.
        dual = (adv < 0) & (surrogate < cfg.dual_clip_c * adv)
        surrogate = torch.where(dual, cfg.dual_clip_c * adv, surrogate)
    per_token = -surrogate

    kl = None
    if ref_logp is not None:
        log_ref_ratio = ref_logp.detach() - logp  # k3 (eq. 2): pi_ref/pi - log(pi_ref/pi) - 1 >= 0
        kl = log_ref_ratio.exp() - log_ref_ratio - 1
        per_token = per_token + cfg.kl_coef * kl
    elif cfg.kl_coef != 0:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logp")
    loss = _aggregate(per_token, mask, cfg.loss_agg, cfg.norm_length)

    with torch.no_grad():
        seq_valid = mask.sum(-1) > 0
        seq_adv = advantages.detach()[seq_valid].to(torch.float64)
        metrics = {
            "clip_frac_low": _masked_mean(((ratio < 1 - cfg.clip_eps_low) & (adv < 0)).to(mask.dtype), mask),
            "clip_frac_high": _masked_mean(((ratio > 1 + cfg.clip_eps_high) & (adv > 0)).to(mask.dtype), mask),
            "dual_clip_frac": _masked_mean(dual.to(mask.dtype), mask),
            # KL(pi_old || pi) by k3 on the rollout's tokens: how far this update moved the policy.
            "approx_kl": _masked_mean(ratio - 1 - ratio.log(), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "ratio_max": ratio.masked_fill(mask == 0, float("-inf")).max(),
            "adv_mean": seq_adv.mean() if seq_adv.numel() else seq_adv.new_zeros(()),
            "adv_std": seq_adv.std(correction=0) if seq_adv.numel() else seq_adv.new_zeros(()),
        }
        if kl is not None:
            metrics["ref_kl"] = _masked_mean(kl, mask)
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy.to(mask.dtype), mask)
    return loss, {k: v.detach() for k, v in metrics.items()}
