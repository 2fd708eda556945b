"""Slurm: the launcher's per-node torchrun commands (dry run), and on a real Slurm cluster of virtual
nodes (tests/slurm_cluster.py): `sbatch slurm/r1_zero.sbatch` runs R1-Zero on 1 and 2 nodes; a job
requeued by `scontrol requeue` (SIGTERM) or warned by SIGUSR1 (`--signal=B:USR1@N`, which requeues
itself) checkpoints, comes back with SLURM_RESTART_COUNT=1 and resumes with no lost or repeated
rollout (1 node: the uninterrupted run's metrics); `-m` sweeps are validated job by job and submitted
with hydra/launcher=submitit_slurm."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import cli_env
from tests.distributed import free_port
from tests.slurm_cluster import Cluster, slurm_cluster  # noqa: F401  (the session fixture)
from tests.test_r1_zero import NONDETERMINISTIC, SMALL, _rows

ROOT = Path(__file__).resolve().parents[1]
# 3 rollouts, a checkpoint only at the end: the one a signal makes is the only one to resume from.
RUN = [*SMALL, "recipe.rollouts=3", "recipe.save_every=3", "recipe.wandb=false", "platform=cpu"]


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
    for line in nodes:  # gpu-a01 resolves nowhere here: its name is the rendezvous host
        assert "torchrun --nnodes=3 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=gpu-a01:29500 --rdzv-id=77" in line
        assert line.endswith("-m r1mega recipe=r1_zero platform=gpu parallel.world_size=24 model=deepseek_v3_671b rollout.temperature=1.0")
    srun = out[-1]
    assert srun.startswith("srun --nodes=3 --ntasks-per-node=1") and "--container-image=nvcr.io/nvidia/pytorch:25.09-py3" in srun


def _sbatch(cluster: Cluster, workdir: Path, nodes: int, cache: Path) -> str:
    """Submit slurm/r1_zero.sbatch as a user would (from the repository root), its logs in `workdir`."""
    workdir.mkdir()
    env = {**cli_env(), "R1MEGA_NPROC_PER_NODE": "1", "MASTER_PORT": str(free_port())}
    return cluster.run("sbatch", "--parsable", f"--chdir={workdir}", f"--nodes={nodes}", "slurm/r1_zero.sbatch",
                       *RUN, f"run_dir={workdir / 'run'}", f"recipe.cache_dir={cache}", env=env).strip()


def _logs(workdir: Path, job: str) -> tuple[str, str]:
    """(the batch log, the per-node logs concatenated)."""
    nodes = sorted((workdir / "logs" / job).glob("*.log"))
    return (workdir / f"r1mega-r1_zero-{job}.out").read_text(), "".join(p.read_text() for p in nodes)


@pytest.mark.timeout(900)
def test_sbatch_runs_and_requeued_jobs_resume(slurm_cluster, cache_dir, tmp_path):
    cluster = slurm_cluster
    ref = _sbatch(cluster, tmp_path / "ref", 1, cache_dir)
    deadline = time.time() + 300
    while not list(cache_dir.glob("base-*/DONE")):  # one pretraining of the base, then the jobs share it
        assert cluster.job(ref)["JobState"] in ("PENDING", "RUNNING") and time.time() < deadline, cluster.job(ref)
        time.sleep(0.5)
    requeued = _sbatch(cluster, tmp_path / "requeued", 1, cache_dir)
    warned = _sbatch(cluster, tmp_path / "warned", 2, cache_dir)

    # After the first rollout: Slurm's requeue (SIGTERM to every process) and the time-limit warning
    # (SIGUSR1 to the batch script only, as --signal=B:USR1@N sends it).
    signals = {requeued: ("scontrol", "requeue", requeued), warned: ("scancel", "--batch", "--signal=USR1", warned)}
    deadline = time.time() + 420
    while signals:
        for job, cmd in list(signals.items()):
            rows = tmp_path / ("requeued" if job == requeued else "warned") / "run" / "r1_zero_metrics.jsonl"
            if rows.exists() and rows.read_text():
                cluster.run(*cmd)
                del signals[job]
            else:
                assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING") and time.time() < deadline, cluster.job(job)
        time.sleep(0.2)

    for job, restarts in ((ref, "0"), (requeued, "1"), (warned, "1")):
        info = cluster.wait(job)
        assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", restarts, "0:0"), info

    # The uninterrupted 1-node job: its own outputs.
    out, nodes = _logs(tmp_path / "ref", ref)
    assert f"r1mega: job {ref} (restart 0) on 1 node(s) x 1, rendezvous 127.0.0.1:" in out, out
    assert "held-out eval" in out + nodes and re.findall(r"rollout (\d)/3", nodes) == ["1", "2", "3"], nodes[-3000:]
    reference = _rows(tmp_path / "ref" / "run")
    assert [r["step"] for r in reference] == [1, 2, 3]
    assert (tmp_path / "ref" / "run" / "ckpt" / "latest").read_text() == "3"
    summary = (tmp_path / "ref" / "run" / "summary.json").read_text()

    for job, name in ((requeued, "requeued"), (warned, "warned")):
        out, nodes = _logs(tmp_path / name, job)
        run_dir = tmp_path / name / "run"
        assert f"r1mega: job {job} (restart 1)" in out, out
        # checkpointed at the step the signal reached, resumed there: each rollout ran exactly once
        # (sorted: rank 0 is whichever node joins the rendezvous first, so attempts may log to different files)
        stopped = re.findall(rf"r1mega: interrupted \(SIGTERM\); checkpoint at rollout (\d) in {run_dir}/ckpt", nodes)
        resumed = re.findall(rf"r1mega: resuming from checkpoint at rollout (\d) \({run_dir}/ckpt\)", nodes)
        assert stopped == resumed and stopped[0] in ("1", "2"), nodes[-5000:]
        assert sorted(re.findall(r"rollout (\d)/3", nodes)) == ["1", "2", "3"], nodes[-5000:]
        assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3]
        assert (run_dir / "ckpt" / "latest").read_text() == "3"

    # The warning: forwarded to the ranks, then the job requeued itself; on 2 nodes.
    out, nodes = _logs(tmp_path / "warned", warned)
    assert "on 2 node(s) x 1" in out and "r1mega: SIGUSR1 (time limit near)" in out, out
    assert f"requeueing job {warned} to resume from the checkpoint" in out, out
    assert len(list((tmp_path / "warned" / "logs" / warned).glob("*.log"))) == 2

    # Requeued on 1 node: the uninterrupted run's metrics, step for step, and its final eval.
    for got, want in zip(_rows(tmp_path / "requeued" / "run"), reference):
        for k, v in want.items():
            if not k.startswith(NONDETERMINISTIC):
                assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), f"step {want['step']}: {k}"
    assert (tmp_path / "requeued" / "run" / "summary.json").read_text() == summary


def test_multirun_validates_each_job_of_the_sweep(capsys):
    from r1mega.__main__ import preflight

    with pytest.raises(SystemExit) as exit_:
        preflight(["-m", "recipe=none", "model=tiny_moe,tiny_dense", "parallel=ep2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "tiny_moe: 5.61M total" in err  # job 1 is valid ...
    assert ("r1mega: invalid config: sweep job 2/2 (recipe=none model=tiny_dense parallel=ep2): "
            "parallel.expert_model_parallel_size=2 needs a MoE model") in err, err  # ... job 2 is not


def test_sweep_submitted_with_submitit_slurm(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "r1mega", "-m", "recipe=none", "model=tiny_moe,tiny_dense", "hydra/launcher=submitit_slurm",
         "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={sweep}"],
        env={**cli_env(), "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, model in enumerate(["tiny_moe", "tiny_dense"]):
        (job_dir,) = (sweep / ".submitit").glob(f"*_{i}")  # array task i: its stdout and stderr
        text = "".join(p.read_text() for p in sorted(job_dir.glob("*_log.*")))
        assert f"config is valid (model={model}, parallel=single, platform=cpu)" in text, text[-2000:]
        assert "Job completed successfully" in text
