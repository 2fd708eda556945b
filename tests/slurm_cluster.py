"""A real Slurm cluster of virtual nodes on this host for the tests (tools/slurm/up.sh and down.sh):
one per session, started on first use. Skipped when not root; under CI=true it must run."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODES = 4  # n1..n4: two 1-node jobs and a 2-node job at once


@dataclass
class Cluster:
    state: Path
    env: dict  # the test environment with SLURM_CONF

    def run(self, *cmd: str, env: dict | None = None) -> str:
        """Run a command from the repository root against this cluster (`env`: extra variables)."""
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
        return proc.stdout

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        fields = self.run("scontrol", "show", "job", "--oneliner", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: str, timeout_s: float = 420) -> dict:
        """Poll until the job has ended (a requeued job pends and runs again first); its record."""
        deadline = time.time() + timeout_s
        while True:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            assert time.time() < deadline, f"job {job_id} still {info['JobState']} after {timeout_s} s"
            time.sleep(0.5)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "a real Slurm cluster needs root (slurmd runs jobs as their user)"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if not (shutil.which(b) or Path("/usr/sbin", b).exists())]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)}): bash tools/install.sh installs them"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[Cluster]:
    reason = _why_not()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: the Slurm tests must run, but {reason}")
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", str(ROOT / "tools/slurm/up.sh"), str(state), str(NODES)], capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Cluster(state, {**os.environ, "SLURM_CONF": str(state / "slurm.conf")})
    finally:
        subprocess.run(["bash", str(ROOT / "tools/slurm/down.sh"), str(state)], capture_output=True, timeout=120)
