"""Run a function in N fresh gloo processes (spawned, like torchrun would) and collect results."""
from __future__ import annotations

import os
import warnings
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from r1mega.parallel.state import free_port


def _entry(rank: int, fn, world_size: int, port: int, args: tuple, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHDYNAMO_DISABLE="1",
    )
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # library deprecation noise from every child drowns the failure
    try:
        result = fn(*args)
    finally:
        from r1mega.parallel.state import destroy_distributed

        destroy_distributed()
    torch.save(result, Path(out_dir) / f"{rank}.pt")


def run_distributed(fn, world_size: int, *args) -> list:
    """`fn(*args)` on ranks 0..world_size-1 (each its own process); returns each rank's return value.
    `fn` must be importable (module level) and should call `init_distributed` itself."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _entry, args=(fn, world_size, free_port(), args, out_dir), nprocs=world_size, start_method="spawn"
        )
        return [torch.load(Path(out_dir) / f"{r}.pt", weights_only=False) for r in range(world_size)]
