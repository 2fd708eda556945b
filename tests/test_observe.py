"""What a run shows and keeps, on ONE short real run shared by every test here (a 2-rollout R1-Zero
run at the sizes of tests/test_r1_zero.py, a checkpoint every rollout): the quiet console and the
run's log, the rollout records, the replay of a step from its record, the HTML report in headless
Chromium, and what W&B (offline) receives."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli import cli_env
from tests.test_r1_zero import SMALL
from tests.wandb_offline import config_keys, history_steps, table_keys

ROLLOUTS = 2


@pytest.fixture(scope="session")
def run(tmp_path_factory, cache_dir):
    """(run_dir, the console: stdout, stderr) of a finished 2-rollout run."""
    run_dir = tmp_path_factory.mktemp("observe") / "run"
    cmd = [sys.executable, "-m", "r1mega", *SMALL, f"run_dir={run_dir}", f"recipe.cache_dir={cache_dir}",
           f"recipe.rollouts={ROLLOUTS}", "recipe.save_every=1", "recipe.records.wandb_every=2"]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir, proc.stdout, proc.stderr


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "r1_zero_metrics.jsonl").read_text().splitlines()]


def test_console_shows_the_plan_progress_and_summary_the_log_the_rest(run):
    run_dir, out, err = run
    console = out + err
    for line in ("tiny_moe: 5.61M total", "r1_zero: rollouts 2 x 2 optimizer steps", "layout: TP1 PP1 EP1 CP1 DP1",
                 "r1_zero rollout 1/2  reward", "r1_zero rollout 2/2  reward", "rollout records:", "held-out eval"):
        assert line in console, line
    for noise in ("Warning", "warnings.warn", "INFO", "[megatron", "vllm", "Params for bucket", "NUMA"):
        assert noise not in console, (noise, console)
    assert len(console.splitlines()) < 20, console
    log = (run_dir / "run.log").read_text()
    for line in ("UserWarning: Apex is not installed", "[megatron.core.optimizer][INFO]", "Params for bucket",
                 "[vllm.", "r1_zero rollout 2/2"):
        assert line in log, line


def test_rollout_records_hold_every_sample_of_each_step(run):
    import pyarrow.parquet as pq

    run_dir, _, _ = run
    n = 4 * 4  # recipe.prompts_per_rollout x algorithm.group_size (SMALL)
    for row in _rows(run_dir):
        t = pq.read_table(run_dir / "rollouts" / f"step_{row['step']:06d}.parquet").to_pydict()
        assert t["step"] == [row["step"]] * n and t["sample"] == list(range(n))
        assert t["group"] == [i // 4 for i in range(n)]
        assert {"prompt", "response", "prompt_ids", "truncated", "routes", "routes_shape"} <= set(t)
        lengths = [len(r) for r in t["response_ids"]]
        assert [len(r) for r in t["engine_logp"]] == lengths == [len(r) for r in t["trainer_logp"]]
        # token counts are the step's: every response token trained once (no overlong filter at DP1)
        assert sum(lengths) == row["dp/local_response_tokens"] == row["response_length/mean"] * n
        assert sum(t["truncated"]) == row["response_length/clipped_frac"] * n
        # the log-prob gap metric is the records' largest |trainer - engine| (the same float32 numbers)
        gap = max(np.abs(np.float32(a) - np.float32(b)).max() for a, b in zip(t["trainer_logp"], t["engine_logp"]))
        assert float(gap) == row["logprob_gap/max"]
        assert np.mean(t["reward/total"]) == pytest.approx(row["reward/mean"], abs=1e-12)
        for g in range(4):  # group-normalised advantages
            assert abs(sum(t["advantage"][4 * g: 4 * g + 4])) < 1e-9
        assert t["prompt"][0].startswith("A conversation between User and Assistant")


def test_wandb_gets_the_config_and_a_table_of_samples(run):
    run_dir, _, _ = run
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{(run_dir / 'r1_zero_wandb_id').read_text()}.wandb"]
    assert history_steps(files[0]) == [1, 2]
    assert {"model", "parallel", "algorithm", "recipe", "reward"} <= config_keys(files[0])
    assert table_keys(files[0]) == [(2, "samples")]  # recipe.records.wandb_every=2: at rollout 2 only
    (table,) = files[0].parent.glob("files/media/table/samples_*.table.json")
    t = json.loads(table.read_text())
    assert t["columns"][:5] == ["step", "group", "sample", "prompt", "response"] and len(t["data"]) == 16


def test_wandb_restart_logs_each_step_once(tmp_path, monkeypatch):
    """A run that logged rollout 3 and was killed before its next checkpoint (at 2) restarts at 3:
    W&B keeps the first run's 3 and gets 4 only; the JSONL redoes 3."""
    import wandb

    from r1mega.trainer.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    killed = MetricsLogger(tmp_path, "t", 4, plain=True)
    for step in (1, 2, 3):
        killed.log(step, {"x": step / 10})
    killed.close()
    restarted = MetricsLogger(tmp_path, "t", 4, start_step=2, plain=True)
    for step in (3, 4):
        restarted.log(step, {"x": step / 10})
    restarted.close()
    wandb.teardown()  # W&B's service writes the run files asynchronously; a process exit waits like this
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda f: f.stat().st_mtime)
    assert [f.name for f in files] == [f"run-{(tmp_path / 't_wandb_id').read_text()}.wandb"] * 2
    assert [history_steps(f) for f in files] == [[1, 2, 3], [4]]
    assert [r["step"] for r in restarted.rows()] == [1, 2, 3, 4]


def _replay(run_dir: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "r1mega.replay", str(run_dir), "step=2", *extra], env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "Warning" not in proc.stdout + proc.stderr
    return json.loads((run_dir / "replay" / "step_000002.json").read_text())["metrics"]


def test_replay_of_step_2_reproduces_its_loss_and_grad_norm(run):
    run_dir, _, _ = run
    same = _replay(run_dir)
    for k in ("loss/total", "grad_norm", "loss/ref_kl", "loss/entropy", "logprob_gap/max"):
        original, replayed = same[k]
        assert replayed == original, k  # exact on CPU
    changed = _replay(run_dir, "algorithm.kl_coef=0.01")  # 10x the KL weight: a different update
    assert changed["loss/total"][1] != changed["loss/total"][0]
    assert changed["grad_norm"][1] > 2 * changed["grad_norm"][0]


def _chromium(width: int = 1400, height: int = 2000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"  # Debian's, installed by tools/install.sh
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_report_renders_in_headless_chromium(run, tmp_path_factory):
    from selenium.webdriver.support.ui import WebDriverWait

    from r1mega.report import chart_series, write

    run_dir, _, _ = run
    page = write(run_dir)
    browser = _chromium()
    try:
        browser.get(page.as_uri())
        js = browser.execute_script
        # Plotly draws after the load event on a busy machine: wait for every chart (a deadline, not a speed check)
        charts = "return document.querySelectorAll('.js-plotly-plot').length"
        traces = "return document.querySelectorAll('.js-plotly-plot .trace').length"  # drawn, not just placed
        WebDriverWait(browser, 120).until(lambda _: js(charts) >= 11 and js(traces) >= 11)
        assert js(charts) == len(chart_series(_rows(run_dir))) == 11
        # the browser: 2 rollouts x 4 groups x (best, worst); the latest rollout shows, the select switches
        assert js("return document.querySelectorAll('.sample').length") == 2 * 4 * 2
        visible = "return [...document.querySelectorAll('.step')].filter(d => !d.hidden).map(d => d.id)"
        assert js(visible) == ["step-2"]
        js("const s = document.getElementById('step-select'); s.value = '1'; s.dispatchEvent(new Event('change'))")
        assert js(visible) == ["step-1"]
        assert js("return document.querySelectorAll('table tr').length") == 1 + 2  # header, before and after RL
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert not errors, errors
        shot = tmp_path_factory.mktemp("artefacts") / "report.png"
        browser.save_screenshot(str(shot))
        print(f"report screenshot: {shot}")
        assert shot.stat().st_size > 50_000
    finally:
        browser.quit()


@pytest.mark.parametrize("module", ["r1mega.replay", "r1mega.report"])
def test_help_and_bad_arguments(module, capsys, tmp_path):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and f"usage: python -m {module}" in out and "example:" in out and "exit status" in out
    for bad in ([], [str(tmp_path), "steps=2"]):
        with pytest.raises(SystemExit) as done:
            main(bad)
        assert done.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as done:  # not a run directory
        main([str(tmp_path), "step=2"] if module == "r1mega.replay" else [str(tmp_path)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and str(tmp_path) in err and err.count("\n") == 1, err
