"""The environment of the tests that run `python -m r1mega` in a subprocess."""
from __future__ import annotations

import os


def cli_env() -> dict:
    return {**os.environ, "TORCHDYNAMO_DISABLE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
