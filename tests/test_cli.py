"""The commands besides `python -m r1mega` behave like it: `--help` prints usage (what the command
does, its arguments, an example) and exits 0; bad input is one line on stderr and exit 2 before
anything is built, never a traceback; the planner's first line is its verdict (exit 1: does not fit);
convert refuses to overwrite without --force and replaces a destination only whole.

Subprocess calls are kept few (each `python -m r1mega...` start costs seconds); the cases that need
no process of their own call the entry point or its helper in this one."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import cli_env

ROOT = Path(__file__).resolve().parents[1]
ENV = {**cli_env(), "PYTHONWARNINGS": "ignore"}  # megatron's import-time warnings are not the CLI's lines


def run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=timeout)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p


def one_line(p, rc: int, *words: str) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == rc and len(lines) == 1, (p.returncode, p.stderr[-3000:])
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.mark.parametrize("cmd,words", [  # `python -m r1mega --help` is Hydra's; tools/convert.py runs below
    (["-m", "r1mega.eval", "--help"], ["usage: python -m r1mega.eval", "model_dir=", "example:", "exit status"]),
    (["-m", "r1mega.plan", "--help"], ["usage: python -m r1mega.plan", "num_gpus=", "example:", "exit status"]),
    (["-m", "r1mega.convert", "--help"], ["usage: python -m r1mega.convert", "--force", "examples:", "exit status"]),
    (["tools/eval.py", "-h"], ["usage: python -m r1mega.eval"]),
])
def test_help_prints_usage_and_exits_0(cmd, words):
    p = run(*cmd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(w in p.stdout for w in words), p.stdout


def test_eval_missing_model_dir_is_one_line():
    one_line(run("-m", "r1mega.eval", "model_dir=/nonexistent"), 2, "r1mega.eval", "model_dir=/nonexistent", "does not exist")


def test_eval_other_paths_are_checked(tmp_path, capsys):
    from r1mega.eval.__main__ import main

    (tmp_path / "a_file").write_text("")
    for arg, words in [(f"model_dir={tmp_path}", ("no config.json",)), ("data_dir=/nonexistent", ("data_dir",)),
                       (f"out_dir={tmp_path / 'a_file' / 'x'}", ("out_dir", "is a file"))]:
        assert main([arg]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err


def test_uncreatable_run_dir_is_one_line_before_anything_is_built():
    one_line(run("-m", "r1mega", "run_dir=/proc/r1mega_x"), 2, "invalid config: run_dir=/proc/r1mega_x")


def test_dir_problem_creates_nothing(tmp_path):
    from r1mega.__main__ import dir_problem

    (tmp_path / "f").write_text("")
    assert "is a file" in dir_problem("run_dir", tmp_path / "f" / "x")
    assert dir_problem("run_dir", tmp_path / "new" / "deeper") is None
    assert dir_problem("run_dir", tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe left nothing, created no run_dir


def test_plan_verdict_first_and_exit_1_when_nothing_fits():
    p = run("-m", "r1mega.plan", "model=deepseek_v3_671b", "cluster=h100_80gb", "num_gpus=8")
    assert p.returncode == 1, p.stderr[-3000:]
    first = p.stdout.splitlines()[0]
    assert first.startswith("DOES NOT FIT") and "training memory" in first and "no layout of 8 GPUs fits" in first, first
    assert "None" not in p.stdout and "n/a" in p.stdout  # the rollout that cannot run says so


def test_plan_fits_verdict_first():
    from rich.console import Console

    from r1mega.plan import compose_plan, plan
    from r1mega.plan.report import render

    cfg = compose_plan(["model=deepseek_v3_671b", "cluster=h100_80gb", "num_gpus=256", "parallel=dsv3_256xh100",
                        "rollout=dsv3_tp32", "seq_length=67584", "prompt_length=2048", "recompute=full"])
    out = io.StringIO()
    render(plan(cfg), cfg.cluster.gpu_memory_gb, Console(file=out, width=120))
    first = out.getvalue().splitlines()[0]
    assert first.startswith("FITS: deepseek_v3_671b on 256 x h100_80gb") and "of 80 GB per GPU" in first, first
    assert "None" not in out.getvalue()


# ---- convert -------------------------------------------------------------------------------------


def _fake_hf(path: Path, model: str = "tiny_moe") -> Path:
    """Enough of an HF directory for the checks that run before anything is read."""
    from r1mega.checkpoint.hf_mapping import hf_config
    from r1mega.config import compose

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf_config(compose([f"model={model}"]).model)))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_convert_missing_source_is_one_line(tmp_path):
    one_line(run("tools/convert.py", "hf_to_megatron", str(tmp_path / "nope"), str(tmp_path / "dst"), "model=tiny_moe"),
             2, "r1mega.convert", "does not exist")
    assert not (tmp_path / "dst").exists()


def test_convert_mismatch_lists_fields_and_existing_destination_is_refused(tmp_path, capsys):
    from r1mega.convert import main

    src = _fake_hf(tmp_path / "hf")
    assert main(["hf_to_megatron", str(src), str(tmp_path / "dst"), "model=tiny_dense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model=tiny_dense does not match" in err[0], err
    assert "model_type (preset 'qwen2', checkpoint 'deepseek_v3')" in err[0] and "num_key_value_heads" in err[0], err

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("old")
    assert main(["hf_to_megatron", str(src), str(dst), "model=tiny_moe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0] and "--force" in err[0], err
    assert (dst / "keep").read_text() == "old"


def test_convert_force_replaces_destination_whole(tmp_path):
    from tests.test_checkpoint_hf import MODELS, make_hf_model

    make_hf_model(MODELS["tiny_moe"], str(tmp_path / "hf"))
    dst = tmp_path / "mg"
    dst.mkdir()
    (dst / "stale").write_text("old")
    p = run("-m", "r1mega.convert", "hf_to_megatron", str(tmp_path / "hf"), str(dst), "--force", *MODELS["tiny_moe"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert (dst / "metadata.json").is_file() and (dst / "hf_assets" / "config.json").is_file()
    assert not (dst / "stale").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["hf", "mg"]  # no staging or old copy left


def test_convert_killed_leftovers_leave_old_destination_or_none(tmp_path):
    """What kill -9 can leave: a staging dir (removed) and, killed between the two renames of
    --force, the old destination moved aside (put back)."""
    from r1mega.convert import clean_leftovers, install

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dst = tmp_path / "out"
    (tmp_path / f".out.tmp-{dead.pid}").mkdir()
    (tmp_path / f".out.tmp-{dead.pid}" / "half").write_text("")
    (tmp_path / f".out.old-{dead.pid}").mkdir()
    (tmp_path / f".out.old-{dead.pid}" / "old").write_text("")
    clean_leftovers(dst)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"] and (dst / "old").exists()

    new = tmp_path / f".out.tmp-{os.getpid()}"
    new.mkdir()
    (new / "new").write_text("")
    install(new, dst)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"] and sorted(x.name for x in dst.iterdir()) == ["new"]
