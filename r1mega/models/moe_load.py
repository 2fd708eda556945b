"""MoE load balance as a metric: tokens routed to each expert, per layer, via router forward hooks."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def record_expert_load(chunks):
    """Within the block, `loads[name]` accumulates `[num_experts]` token counts for each router on
    this rank (EP ranks see every expert's routing decision for their own tokens)."""
    from megatron.core.transformer.moe.router import TopKRouter

    loads: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, _inputs, output):
            counts = output[1].sum(0).to(torch.float64).detach()
            loads[name] = loads[name] + counts if name in loads else counts
        return record

    handles = [m.register_forward_hook(hook(n)) for c in chunks for n, m in c.named_modules() if isinstance(m, TopKRouter)]
    try:
        yield loads
    finally:
        for h in handles:
            h.remove()


def load_balance(loads: dict[str, torch.Tensor]) -> dict[str, float]:
    """max/mean expert load per layer (1.0 = perfectly balanced) and the worst layer's."""
    ratios = {name: (c.max() / c.mean().clamp(min=1e-9)).item() for name, c in loads.items() if c.sum() > 0}
    if not ratios:
        return {}
    return {"moe/load_max_over_mean": max(ratios.values()),
            **{f"moe/load_max_over_mean/{_layer(n)}": v for n, v in ratios.items()}}


def _layer(name: str) -> str:
    parts = name.split(".")
    return f"layer{parts[parts.index('layers') + 1]}" if "layers" in parts else name
