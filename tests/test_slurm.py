"""The Slurm launcher renders one torchrun per node with a shared rendezvous (dry run, no Slurm)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_launcher_dry_run_renders_torchrun_per_node(tmp_path):
    env = {
        **os.environ,
        "R1MEGA_DRY_RUN": "1", "R1MEGA_RECIPE": "r1_zero", "R1MEGA_HOSTS": "gpu-a01\ngpu-a02\ngpu-a03",
        "SLURM_JOB_NODELIST": "gpu-a[01-03]", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_ID": "77",
        "SLURM_GPUS_ON_NODE": "8", "R1MEGA_CONTAINER": "nvcr.io/nvidia/pytorch:25.09-py3",
        "R1MEGA_LOG_DIR": str(tmp_path),
    }
    out = subprocess.run(
        ["bash", str(ROOT / "slurm/r1_zero.sbatch"), "model=deepseek_v3_671b", "rollout.temperature=1.0"],
        env=env, capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.splitlines()
    nodes = [line for line in out if line.startswith("[gpu-a")]
    assert [n.split()[0] for n in nodes] == ["[gpu-a01]", "[gpu-a02]", "[gpu-a03]"]
    for line in nodes:
        assert "torchrun --nnodes=3 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=gpu-a01:29500 --rdzv-id=77" in line
        assert line.endswith("-m r1mega recipe=r1_zero platform=gpu parallel.world_size=24 model=deepseek_v3_671b rollout.temperature=1.0")
    srun = out[-1]
    assert srun.startswith("srun --nodes=3 --ntasks-per-node=1") and "--container-image=nvcr.io/nvidia/pytorch:25.09-py3" in srun
