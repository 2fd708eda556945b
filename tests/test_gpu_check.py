"""`tools/gpu_check.sh --dry-run`: the borrowed-GPU check's own code path (dsv3_proxy through
MegatronEngine, GRPO loss, MTP loss, planner prediction) on CPU with gloo and fp32, end to end through
the shell script, so that the script a GPU session runs is known to work up to the device itself."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    from r1mega.config import compose
    from r1mega.models.params import count_parameters

    out = tmp_path / "result.json"
    env = {**os.environ, "R1MEGA_WHEEL_DIR": str(tmp_path / "no-wheels"), "PYTHON": sys.executable}  # nothing to install here
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    m = compose(["model=dsv3_proxy"]).model
    c = count_parameters(m)
    bias = (m.num_layers - m.first_k_dense_layers + m.mtp_num_layers) * m.num_experts  # buffers, not parameters
    assert r["model"] == "dsv3_proxy" and r["params_dtype"] == "fp32" and r["device"] == "cpu"
    assert r["parameters"] == c.total + c.mtp - bias
    assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"] + r["grad_norms"])
    assert r["max_weight_change"] > 0 and r["train_tokens_per_s"] > 0 and not r["problems"]
    p = r["planner"]
    assert p["verdict"]["fits"] and p["train_memory_gb"] > p["train_memory_without_reserve_gb"] > 0
    assert "gpu_check: OK" in run.stdout and "planner (h200" in run.stdout


def test_gpu_check_fails_loudly():
    """A broken run exits non-zero (here: an invalid override) instead of printing numbers."""
    env = {**os.environ, "R1MEGA_WHEEL_DIR": "/nonexistent", "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "model.num_layers=abc"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "FAILED" in run.stdout
