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


def model_mismatches(chunks, path: str | Path) -> tuple[list[str], list[tuple[str, tuple, tuple]]]:
    """(keys of `chunks`' tensors the checkpoint at `path` lacks, [(key, saved global shape, model's)]
    where the shapes differ), read from the checkpoint's metadata alone (`load_tensors_metadata`);
    both empty when `load_model` can read it. Extra saved entries (optimizer state) do not count."""
    from megatron.core.dist_checkpointing import load_tensors_metadata
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = load_tensors_metadata(str(path))
    want = {t.key: tuple(t.global_shape) for t in nested_values(model_sharded_state_dict(chunks))
            if isinstance(t, ShardedTensor)}
    missing = [k for k in want if k not in saved]
    shapes = [(k, tuple(saved[k].global_shape), shape) for k, shape in want.items()
              if k in saved and tuple(saved[k].global_shape) != shape]
    return missing, shapes


def load_model(chunks, path: str | Path) -> None:
    load_model_state(chunks, dist_checkpointing.load(model_sharded_state_dict(chunks), str(path)))
