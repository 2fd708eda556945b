"""Model weights as megatron-core distributed checkpoints: saved under one parallel layout and
loadable under any other (dist_checkpointing reshards TP/PP/EP on load)."""
from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing


def model_sharded_state_dict(chunks) -> dict:
    sd = {}
    for i, c in enumerate(chunks):
        module = getattr(c, "module", c)
        sd[f"model{i}" if len(chunks) > 1 else "model"] = module.sharded_state_dict()
    return sd


def save_model(chunks, path: str | Path) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(path))


def load_model(chunks, path: str | Path) -> None:
    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), str(path))
    for i, c in enumerate(chunks):
        module = getattr(c, "module", c)
        module.load_state_dict(loaded[f"model{i}" if len(chunks) > 1 else "model"], strict=True)
