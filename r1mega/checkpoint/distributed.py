"""Model weights as megatron-core distributed checkpoints: saved under one parallel layout and
loadable under any other (dist_checkpointing reshards TP/PP/EP on load)."""
from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing


def keyed_modules(chunks):
    """(checkpoint key, unwrapped module) per model chunk; DDP wrappers hold the module in `.module`."""
    for i, c in enumerate(chunks):
        yield (f"model{i}" if len(chunks) > 1 else "model"), getattr(c, "module", c)


def model_sharded_state_dict(chunks) -> dict:
    return {key: module.sharded_state_dict() for key, module in keyed_modules(chunks)}


def load_model_state(chunks, loaded: dict) -> None:
    """Copy the model entries of a loaded dist checkpoint into `chunks`."""
    for key, module in keyed_modules(chunks):
        module.load_state_dict(loaded[key], strict=True)


def save_model(chunks, path: str | Path) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(path))


def load_model(chunks, path: str | Path) -> None:
    load_model_state(chunks, dist_checkpointing.load(model_sharded_state_dict(chunks), str(path)))
