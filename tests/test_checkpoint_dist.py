"""Distributed checkpoints (model + distributed optimizer + RNG + trainer state): saved at 1 process,
loaded at TP2/EP2/PP2 and back with the same logits and the same next optimizer step; a save killed
with SIGKILL leaves the previous checkpoint loadable and `latest` pointing at it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import free_port, run_distributed
from tests.test_checkpoint_hf import megatron_logits
from tests.test_parallel_equivalence import OPTIM, _loss_fn, _microbatches

TOL = 1e-5
OVERRIDES = ["model=tiny_moe", *[o for o in OPTIM if "distributed_optimizer" not in o]]  # distributed optimizer on


def _engine(parallel: str):
    from r1mega.config import compose
    from r1mega.parallel.state import init_distributed
    from r1mega.trainer.engine import MegatronEngine

    cfg = compose([*OVERRIDES, f"parallel={parallel}"])
    init_distributed(cfg.parallel, cfg.platform)
    return cfg, MegatronEngine(cfg)


def _train(engine, cfg):
    return engine.train_step(_microbatches(cfg.model.vocab_size), _loss_fn, with_labels=True)


def _params(engine) -> dict:
    return {n: p.detach().clone() for n, p in engine.named_parameters()}


def _adam_steps(engine) -> list[float]:
    """The torch Adam `step` of every param's state (each must be its own tensor)."""
    states = [s for o in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]) for s in o.optimizer.state.values()]
    assert len({id(s["step"]) for s in states}) == len(states), "params share one Adam step tensor"
    return sorted({float(s["step"]) for s in states})


def _reference(root: str) -> dict:
    """1 process: step 1, save, logits; then steps 2 and 3 (what every layout must reproduce after
    loading)."""
    from r1mega.checkpoint.manager import CheckpointManager

    cfg, engine = _engine("single")
    _train(engine, cfg)
    CheckpointManager(root).save(1, engine.model, engine.optimizer, {"data": {"consumed": 4}, "recipe": {"stage": "rl"}})
    logits = megatron_logits(engine, cfg.model.vocab_size)
    _train(engine, cfg)
    params2 = _params(engine)
    _train(engine, cfg)
    return dict(logits=logits, params=params2, params3=_params(engine))


def _resume(parallel: str, src: str, dst: str) -> dict:
    """Load step 1 under `parallel`, take step 2, save it."""
    from r1mega.checkpoint.manager import CheckpointManager

    cfg, engine = _engine(parallel)
    state = CheckpointManager(src).load(engine.model, engine.optimizer)
    steps = _adam_steps(engine)
    logits = megatron_logits(engine, cfg.model.vocab_size)
    _train(engine, cfg)
    CheckpointManager(dst).save(2, engine.model, engine.optimizer, state)
    return dict(logits=logits, state=state, steps=steps)


def _load_back(dirs: list[str]) -> list[dict]:
    """1 process: load each step-2 checkpoint, take step 3."""
    from r1mega.checkpoint.manager import CheckpointManager

    out = []
    cfg, engine = _engine("single")
    for d in dirs:
        state = CheckpointManager(d).load(engine.model, engine.optimizer)
        loaded, steps = _params(engine), _adam_steps(engine)
        _train(engine, cfg)
        out.append(dict(state=state, params=loaded, steps=steps, params3=_params(engine)))
    return out


LAYOUTS = ["tp2", "ep2", "pp2"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """1 process saves step 1; each layout loads it, takes step 2 and saves it."""
    root = tmp_path_factory.mktemp("dist")
    (ref,) = run_distributed(_reference, 1, str(root / "ref"))
    runs = {layout: run_distributed(_resume, 2, layout, str(root / "ref"), str(root / layout)) for layout in LAYOUTS}
    return root, ref, runs


def test_save_one_process_load_tp2_ep2_pp2(resumed):
    _, ref, runs = resumed
    for layout, results in runs.items():
        got = [r["logits"] for r in results if r["logits"] is not None]
        assert got
        for logits in got:
            diff = (logits - ref["logits"]).abs().max().item()
            assert diff <= TOL, f"{layout}: logits after load differ by {diff:.2e}"
        assert all(r["state"] == {"step": 1, "data": {"consumed": 4}, "recipe": {"stage": "rl"}} for r in results)
        assert all(r["steps"] == [1.0] for r in results), f"{layout}: Adam steps after load {results[0]['steps']}"


def test_optimizer_state_round_trips_back_to_one_process(resumed):
    # Step 2 at TP2/EP2/PP2 used the Adam moments and step count saved at 1 process; step 3 at 1
    # process uses those saved at 2 processes: both give the uninterrupted run's weights.
    root, ref, _ = resumed
    (back,) = run_distributed(_load_back, 1, [str(root / layout) for layout in LAYOUTS])
    for layout, b in zip(LAYOUTS, back):
        assert b["state"]["step"] == 2
        assert b["steps"] == [2.0], f"{layout}: Adam steps after load {b['steps']}"
        for key, what in [("params", "step 2 (2 processes)"), ("params3", "step 3 (back at 1 process)")]:
            for name, p in b[key].items():
                diff = (p - ref[key][name]).abs().max().item()
                assert diff <= TOL, f"{layout}: {name} after {what} differs by {diff:.2e}"


def _save_before_first_step(root: str, distributed_optimizer: bool) -> dict:
    """Save at step 0 (no optimizer state yet), load into a second engine (other initial weights,
    fresh optimizer), take a step on both: the same weights."""
    from r1mega.checkpoint.manager import CheckpointManager
    from r1mega.trainer.engine import MegatronEngine

    OVERRIDES.append(f"parallel.use_distributed_optimizer={str(distributed_optimizer).lower()}")
    cfg, engine = _engine("single")
    before = _params(engine)
    CheckpointManager(root).save(0, engine.model, engine.optimizer, {})
    unchanged = all(torch.equal(p, before[n]) for n, p in _params(engine).items())
    _train(engine, cfg)
    other = MegatronEngine(cfg)
    differed = any(not torch.equal(p, before[n]) for n, p in _params(other).items())
    state = CheckpointManager(root).load(other.model, other.optimizer)
    steps = _adam_steps(other)
    _train(other, cfg)
    diff = max((p - engine_p).abs().max().item() for (_, p), engine_p in zip(other.named_parameters(), _params(engine).values()))
    return dict(unchanged=unchanged, differed=differed, state=state, steps=steps, diff=diff)


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_save_before_first_optimizer_step(tmp_path, distributed_optimizer):
    (r,) = run_distributed(_save_before_first_step, 1, str(tmp_path / "ckpt"), distributed_optimizer)
    assert r["unchanged"], "saving changed the weights"
    assert r["differed"] and r["state"] == {"step": 0}
    assert r["steps"] == [0.0]
    assert r["diff"] == 0.0, f"first step after loading a step-0 checkpoint differs by {r['diff']:.2e}"


SAVER = textwrap.dedent(
    """
    import sys
    from r1mega.checkpoint.manager import CheckpointManager
    from tests.test_checkpoint_dist import _engine, _train
    cfg, engine = _engine("single")
    _train(engine, cfg)  # the optimizer has state to save
    mgr = CheckpointManager(sys.argv[1], keep_last=2)
    step = 0
    while True:
        step += 1
        mgr.save(step, engine.model, engine.optimizer, {"step_marker": step})
        print("saved", step, flush=True)
    """
)


def _load_latest(root: str) -> dict:
    from r1mega.checkpoint.manager import CheckpointManager

    _, engine = _engine("single")
    return CheckpointManager(root).load(engine.model, engine.optimizer)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    env = dict(os.environ, MASTER_PORT=str(free_port()), TORCHDYNAMO_DISABLE="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(root)], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1], env=env, stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout.readline().split() == ["saved", "1"]
        time.sleep(0.5)  # well inside the next save (seconds at this size)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    latest = int((root / "latest").read_text())
    assert list(root.glob("tmp-*")), "the kill did not land inside a save"
    assert not (root / f"step_{latest + 1}").exists() or latest >= 1
    (state,) = run_distributed(_load_latest, 1, str(root))
    assert state["step"] == latest and state["step_marker"] == latest
    assert not list(root.glob("tmp-*")), "the load did not remove the killed save's directory"
    assert (root / f"step_{latest}" / "trainer_state.json").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_clean_leftovers_of_killed_saves(tmp_path):
    from r1mega.checkpoint.manager import CheckpointManager

    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "trainer_state.json").write_text("{}")
    (root / "latest").write_text("2")  # killed between renaming step_3 and moving `latest`
    dead, alive = _dead_pid(), os.getppid()
    for name in (f"tmp-3-{dead}", f"tmp-4-{os.getpid()}", f"tmp-4-{alive}"):
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / "shard").write_bytes(b"x")
    (root / f"latest.tmp-{dead}").write_text("3")
    mgr = CheckpointManager(root)

    removed = {p.name for p in mgr.clean_leftovers()}  # what a load does
    assert removed == {f"tmp-3-{dead}", f"tmp-4-{os.getpid()}", f"latest.tmp-{dead}"}
    assert (root / f"tmp-4-{alive}").exists(), "a live process's save in progress was removed"
    assert {p.name for p in root.iterdir()} == {"step_1", "step_2", "step_3", "latest", f"tmp-4-{alive}"}

    assert mgr.clean_leftovers(saving=2) == []  # `latest` names step_2: never removed (the save then refuses)
    assert (root / "step_2" / "trainer_state.json").exists()
    assert [p.name for p in mgr.clean_leftovers(saving=3)] == ["step_3"]  # newer than `latest`: a killed save's
    assert mgr.latest_step() == 2 and (root / "step_1").exists() and (root / "step_2").exists()
