"""Crash-safe training checkpoints: megatron-core dist_checkpointing of model + optimizer (loadable
under any TP/PP/EP layout), per-rank RNG states, and the trainer's plain-dict state.

Layout of `root`: `step_<N>/` (complete checkpoints), `latest` (a file holding the newest complete
step), `tmp-<N>-<pid>/` (a save in progress; never read). A save writes into tmp, fsyncs, renames
to `step_<N>` and then atomically replaces `latest`, so a kill at any moment leaves `latest`
naming a complete checkpoint. What a killed save leaves behind (`tmp-*`, `latest.tmp-*`, a renamed
`step_<N>` newer than `latest`) is removed by the next save or load (`clean_leftovers`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from r1mega.checkpoint.atomic import fsync, fsync_tree
from r1mega.checkpoint.distributed import load_model_state, model_sharded_state_dict
from r1mega.parallel.state import barrier, broadcast_object

# Reshardable over TP/PP/EP as well as DP (the default `dp_reshardable` is DP-only, and the format
# megatron picks otherwise fails: `ShardedTensor.flattened_range is not supported`).
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
STATE_FILE = "trainer_state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _sharded_state_dict(chunks, optimizer, is_loading: bool) -> dict:
    sd = model_sharded_state_dict(chunks)
    if optimizer is not None:
        kw = {"metadata": OPTIM_METADATA} if _is_distributed_optimizer(optimizer) else {}
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, **kw)
    return sd


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def init_optimizer_state(optimizer) -> bool:
    """Create the state torch Adam creates lazily in its first `step()` (step 0, zero moments, as
    adam.py's `_init_group` does), for every param that has none yet, so that an optimizer can be
    saved before its first step (else `DistributedOptimizer.state_dict` fails with
    `assert len(steps) == 1`, and a plain megatron optimizer saves no moments that its load then
    misses). The next step gives exactly the update of a fresh optimizer. Returns whether any state
    was created. Other optimizers (TE/Apex FusedAdam on GPU) are left as they are."""
    created = False
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt = getattr(inner, "optimizer", None)
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                if opt.state[p]:
                    continue
                state = opt.state[p]
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                created = True
    return created


def _zero_step_if_missing(optimizer, loaded: dict) -> None:
    """megatron's non-distributed optimizers save torch Adam's shared step only `if step:`
    (optimizer.py:845, 1033), so a step of 0 (a save before the first step) is dropped and the load
    fails in torch's `Adam.__setstate__` with `KeyError: 'step'`. Put the 0 back."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    dicts = [loaded] if len(inners) == 1 else [loaded[k] for k in sorted(loaded)]
    for inner, sd in zip(inners, dicts):
        if isinstance(inner, DistributedOptimizer) or not isinstance(inner.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        state = (sd["optimizer"] if "optimizer" in sd else sd)["state"]
        if state and "common_step" not in state:
            state["common_step"] = torch.tensor(0.0)


def rng_state() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def latest_step(self) -> int | None:
        try:
            return int((self.root / "latest").read_text())
        except FileNotFoundError:
            return None

    def path(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def clean_leftovers(self, saving: int | None = None) -> list[Path]:
        """Remove what killed saves left: `tmp-<step>-<pid>/` and `latest.tmp-<pid>` of a process
        that is gone (or is this one: its save raised), and, when about to save step `saving`, a
        `step_<saving>/` newer than `latest` (renamed by a save killed before it moved `latest`; the
        run resumed from `latest` and redoes that step). Never the checkpoint `latest` names, nor a
        live process's save in progress. Rank 0 only (the caller's job); returns what it removed."""
        latest = self.latest_step()
        removed = []
        for p in [*self.root.glob("tmp-*"), *self.root.glob("latest.tmp-*")]:
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p)
        orphan = None if saving is None else self.path(saving)
        if orphan is not None and orphan.exists() and (latest is None or saving > latest):
            shutil.rmtree(orphan)
            removed.append(orphan)
        return removed

    def save(self, step: int, chunks, optimizer=None, state: dict | None = None) -> Path:
        """Collective. `state`: plain JSON-able dicts (data-loader position, trainer and recipe state)."""
        final = self.path(step)
        if _rank() == 0 and self.root.exists():
            self.clean_leftovers(saving=step)
        barrier()
        if final.exists():
            raise FileExistsError(f"{final} exists")
        tmp = self.root / broadcast_object(f"tmp-{step}-{os.getpid()}")  # rank 0's pid names it for every rank
        if _rank() == 0:
            tmp.mkdir(parents=True)
        barrier()
        if optimizer is not None:
            init_optimizer_state(optimizer)  # a save before the first step
        dist_checkpointing.save(_sharded_state_dict(chunks, optimizer, is_loading=False), str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{_rank()}.pt")
        if _rank() == 0:
            # `step` wins over a stale one in `state` (e.g. the state returned by the last load).
            (tmp / STATE_FILE).write_text(json.dumps({**(state or {}), "step": step}))
        barrier()
        if _rank() == 0:
            fsync_tree(tmp)
            os.rename(tmp, final)
            pointer = self.root / f"latest.tmp-{os.getpid()}"
            pointer.write_text(str(step))
            fsync(pointer)
            os.replace(pointer, self.root / "latest")
            fsync(self.root)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        steps = sorted(int(p.name[5:]) for p in self.root.glob("step_*") if p.name[5:].isdigit())
        latest = self.latest_step()
        for s in steps[: -self.keep_last]:
            if s != latest:
                shutil.rmtree(self.path(s))

    def load(self, chunks, optimizer=None, step: int | None = None) -> dict:
        """Collective. Loads `step` (default: latest) into `chunks`/`optimizer`, restores this rank's
        RNG state when the checkpoint has one for it; returns the saved trainer state (with `step`)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.root}")
        path = self.path(step)
        if _rank() == 0:
            self.clean_leftovers()
        if optimizer is not None:
            init_optimizer_state(optimizer)  # overwritten by the load; no dummy step on the weights
        loaded = dist_checkpointing.load(_sharded_state_dict(chunks, optimizer, is_loading=True), str(path))
        load_model_state(chunks, loaded)
        if optimizer is not None:
            _zero_step_if_missing(optimizer, loaded["optimizer"])
            optimizer.load_state_dict(loaded["optimizer"])
        rng = path / "rng" / f"rank_{_rank()}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng, weights_only=False))
        return json.loads((path / STATE_FILE).read_text())
