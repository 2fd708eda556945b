"""DeepSeek-V3's released FP8 weights: float8_e4m3fn with one fp32 `weight_scale_inv` per 128×128 block."""
from __future__ import annotations

import torch

BLOCK = 128
SCALE_SUFFIX = "_scale_inv"  # `...weight` → `...weight_scale_inv`


def _expand(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return scale.repeat_interleave(BLOCK, 0)[: shape[0]].repeat_interleave(BLOCK, 1)[:, : shape[1]]


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """weight · scale_inv block-wise (DeepSeek's `weight_dequant`), in fp32 then cast to `dtype`."""
    return (weight.float() * _expand(scale_inv.float(), weight.shape)).to(dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, scale_inv) with each block's max magnitude at the fp8 maximum."""
    m, n = weight.shape
    rows, cols = -(-m // BLOCK), -(-n // BLOCK)
    padded = torch.zeros(rows * BLOCK, cols * BLOCK, dtype=torch.float32)
    padded[:m, :n] = weight.float()
    amax = padded.view(rows, BLOCK, cols, BLOCK).abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    return (weight.float() / _expand(scale_inv, weight.shape)).to(torch.float8_e4m3fn), scale_inv
