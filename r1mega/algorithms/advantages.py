"""Group-relative advantages (R1 paper eq. 3) and the batch filters that act on groups.

Rewards arrive flat, `[num_groups * G]`, with the G outputs of one prompt contiguous.
"""
from __future__ import annotations

import torch


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} (need G >= 2)")
    return rewards.reshape(-1, group_size)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[num_groups]` bool: groups whose rewards are all equal. They carry no learning signal;
    dynamic sampling (DAPO) drops them and refills the batch with fresh prompts."""
    r = _groups(rewards, group_size)
    return r.amax(1) == r.amin(1)


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, std_normalize: bool = True
) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) per group, `[num_groups * G]`, one value per output
    (the loss broadcasts it to every token of that output).

    std is the sample standard deviation (Bessel-corrected, divisor G - 1), as torch.std, verl and
    TRL compute it. `std_normalize=False` keeps only the centring (Dr.GRPO). A group whose rewards
    are all equal gets exactly 0: float rounding of its mean would otherwise leave +-tiny/(tiny+eps).
    """
    r = _groups(rewards, group_size).double()  # exact mean/std for large G; cast back below
    adv = r - r.mean(1, keepdim=True)
    if std_normalize:
        adv = adv / (r.std(1, keepdim=True) + eps)
    adv = torch.where(zero_variance_groups(rewards, group_size)[:, None], 0.0, adv)
    return adv.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)
