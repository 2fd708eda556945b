"""Stage helpers shared by the multi-stage recipes (`recipe=r1`, `recipe=distill`).

- `run_pending` / `stages_to_run`: the stages of a run in order, skipping the finished ones (manifest),
  or the one `recipe.stage` selects.
- `stage_cfg` / `rl_recipe`: the run's config with one stage's `recipe` (and `algorithm` / `optim` /
  `reward` overlays), as `r1mega.recipes.r1_zero.rl_stage` reads it.
- `sft_stage`: SFT of a starting model on rows (R1 output form), packed, epochs with an lr schedule,
  checkpoints (model + optimizer + scheduler) every `save_every` optimizer steps; a restarted stage resumes
  from its last checkpoint and a finished one is not redone.
- SFT rows: read and written (checked, on rank 0, shared with every rank).

Sampling from a checkpoint (`PolicySampler`, rejection sampling) lives in `r1mega.rollout.sampler`,
the evaluation of a stage's model and the final table in `r1mega.eval.models` / `r1mega.eval.report`.

Synthetic data for the embedded CPU default: long-CoT cold-start rows from the addition task
(`reasoning(a, b)` as the chain of thought, the sum as a `\\boxed{}` summary) and a small
non-reasoning set (answers with an empty chain of thought, as the paper does for simple queries).
"""
from __future__ import annotations

import copy
import random
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from r1mega.config import CONF_DIR
from r1mega.config.recipes import RLStageConfig
from r1mega.config.schema import ModelConfig, ParallelConfig, RLRecipeConfig, RLRunConfig
from r1mega.data import arithmetic
from r1mega.data.jsonl import DataError, read_jsonl, read_sft_rows, write_jsonl
from r1mega.parallel import interrupt
from r1mega.parallel.state import barrier, broadcast_object, is_rank0
from r1mega.trainer.metrics import MetricsLogger, plot_curves


class StageError(RuntimeError):
    """A recipe cannot run as configured (missing earlier stage, unknown stage, unwired option)."""


def log(msg: str) -> None:
    if is_rank0():
        print(msg, flush=True)


def run_pending(tag: str, cfg, stages: tuple[str, ...] | list[str], todo: list[str], manifest,
                run_one: Callable[[str], tuple[dict, dict]], prepare: Callable[[str], None] | None = None) -> None:
    """Runs the stages of `todo` in order: a finished one (per the manifest) is skipped; the others
    are prepared (e.g. a parallel-layout switch, which reseeds), seeded, timed, and recorded in the
    manifest with their outputs and summary line."""
    import time

    from r1mega.parallel.state import seed_everything

    for i, name in enumerate(stages):
        if name not in todo:
            continue
        head = f"[{tag}] stage {i + 1}/{len(stages)} {name}"
        if manifest.done(name):
            log(f"{head}: done earlier, skipped (manifest) | {manifest.stages[name]['summary'].get('line', '')}")
            continue
        if prepare is not None:
            prepare(name)
        log(f"{head}: starting")
        seed_everything(cfg.platform.seed + i, on_cpu=cfg.platform.device == "cpu")
        t0 = time.perf_counter()
        outputs, summary = run_one(name)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        summary["line"] = f"{summary['line']} ({summary['seconds']:.0f}s)"
        manifest.finish(name, outputs, summary)
        log(f"{head}: {summary['line']}")
        interrupt.stop_point(f"stage {name} finished (recorded in {manifest.path}); run the same command to "
                             "continue with the next stage")


def stages_to_run(cfg, run_dir: Path, stages: tuple[str, ...] | list[str]) -> list[str]:
    """All of `stages`, or the one `recipe.stage` selects once its predecessors have finished in
    `run_dir`; otherwise exit with one line naming the problem (before anything is built)."""
    from r1mega.recipes.manifest import Manifest

    stage = selected_stage(cfg)
    if stage is None:
        return list(stages)
    if stage not in stages:
        fail(f"recipe.stage={stage!r}: expected one of {', '.join(stages)}")
    manifest = Manifest(run_dir)
    missing = [s for s in stages[:stages.index(stage)] if not manifest.done(s)]
    if missing:
        fail(f"recipe.stage={stage} needs the output of stage(s) {', '.join(missing)}, not finished in {run_dir} "
             f"(manifest: {manifest.path}); run `recipe={cfg.recipe.name}` without recipe.stage first")
    return [stage]


# -- configs -------------------------------------------------------------------------------------------
def stage_cfg(cfg: DictConfig, name: str, run_dir: Path, recipe: dict | DictConfig | None = None,
              model=None, parallel=None, algorithm=None, optim=None, reward=None) -> DictConfig:
    """A copy of `cfg` for one stage: `recipe` replaced (an RLRecipeConfig node when `recipe` is given),
    the other groups merged with the given overlays, `run_dir` the stage's directory."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.run_dir = str(run_dir)
        if recipe is not None:
            node = OmegaConf.structured(RLRecipeConfig)
            out.recipe = OmegaConf.merge(node, recipe, {"name": name, "cache_dir": cfg.recipe.cache_dir})
        for key, overlay in (("model", model), ("parallel", parallel), ("algorithm", algorithm), ("optim", optim),
                             ("reward", reward)):
            if overlay:
                out[key] = OmegaConf.merge(out[key], overlay)
    return out


def rl_recipe(stage: RLStageConfig) -> dict:
    """The fields of an RL stage that `rl_stage` reads as `cfg.recipe`: those of `RLRunConfig`."""
    return {f.name: OmegaConf.to_container(stage[f.name], resolve=True) if OmegaConf.is_config(stage[f.name])
            else stage[f.name] for f in fields(RLRunConfig)}


def preset(group: str, name: str, overrides=None) -> DictConfig:
    """conf/<group>/<name>.yaml on its schema (a model or parallel preset), plus `overrides`."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise StageError(f"{group} preset {name!r} not found; known: {known}")
    raw = OmegaConf.load(path)
    with open_dict(raw):
        raw.pop("defaults", None)
    schema = {"model": ModelConfig, "parallel": ParallelConfig}[group]
    return OmegaConf.merge(OmegaConf.structured(schema), raw, overrides or {})


# -- SFT data ------------------------------------------------------------------------------------------
def load_sft_rows(path: str | Path) -> list[dict]:
    """SFT rows from JSONL: {problem, response} or {problem, reasoning, summary} (`r1mega.data.chat`);
    the same checks as validation runs on the configured files (`r1mega.data.jsonl.read_sft_rows`)."""
    return read_sft_rows(path)


def cold_start_rows(arith, n: int, seed: int) -> list[dict]:
    """`n` long-CoT rows in the R1 form from the pretraining split (never an RL or eval problem):
    correct column-addition reasoning, then the sum as a `\\boxed{}` summary."""
    rng = random.Random(seed)
    pairs = arithmetic.split_pairs(arith)["pretrain"]
    rows = []
    for i in range(n):
        a, b = pairs[rng.randrange(len(pairs))]
        rows.append({"id": f"cold-{i}-{a}+{b}", "problem": arithmetic.problem_text(a, b), "answer": str(a + b),
                     "data_source": arithmetic.SOURCE, "reasoning": arithmetic.reasoning(a, b),
                     "summary": f"\\boxed{{{a + b}}}"})
    return rows


def non_reasoning_rows(n: int, seed: int) -> list[dict]:
    """A small non-reasoning SFT set: copy tasks answered directly, with an empty chain of thought
    (the paper gives simple queries no CoT)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        rows.append({"id": f"chat-{i}", "problem": f"Repeat the numbers {a} and {b}.", "data_source": "chat",
                     "response": f"\n</think>\n{a} and {b}"})
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    if is_rank0():
        write_jsonl(path, rows)
    barrier()


# -- SFT stage -----------------------------------------------------------------------------------------
def sft_stage(cfg: DictConfig, name: str, stage_dir: Path, init: Optional[Callable], rows: list[dict], sft, tok,
              template: str) -> dict:
    """SFT (`r1mega.trainer.sft.train_sft`) on `rows` from the weights `init(chunks)` puts in (None:
    random init); checkpoints (model + optimizer + scheduler) under `stage_dir/ckpt` every `save_every`
    steps and at the end, metrics in `stage_dir/<name>_metrics.jsonl`. Resumes from the last checkpoint;
    a stage whose last step is saved is not redone."""
    from r1mega.checkpoint.manager import CheckpointManager
    from r1mega.trainer.sft import SFTConfig, num_steps, rows_to_samples, train_sft, with_schedule

    samples, dropped = rows_to_samples(rows, tok, template, max_tokens=sft.max_tokens)
    if not samples:
        raise StageError(f"{name}: no SFT sample fits max_tokens={sft.max_tokens} ({len(rows)} rows)")
    scfg = SFTConfig(steps=sft.steps, epochs=sft.epochs, batch_size=sft.batch_size, max_tokens=sft.max_tokens,
                     seed=cfg.platform.seed, lr=sft.lr, min_lr=sft.min_lr, warmup_steps=sft.warmup_steps,
                     lr_decay_style=sft.lr_decay_style)
    total = num_steps(len(samples), scfg)
    per_epoch = max(len(samples) // sft.batch_size, 1)
    ckpt = CheckpointManager(stage_dir / "ckpt", keep_last=sft.keep_last)
    start = ckpt.latest_step() or 0
    summary = {"samples": len(samples), "dropped": dropped, "steps": total, "epochs": total / per_epoch,
               "checkpoint": str(ckpt.root), "resumed_from": start}
    metrics = stage_dir / f"{name}_metrics.jsonl"
    if start >= total:  # finished before a restart: nothing to redo
        return {**summary, **_loss_summary(metrics)}

    from r1mega.trainer.engine import MegatronEngine

    run_cfg = with_schedule(cfg, scfg, len(samples))
    engine = MegatronEngine(run_cfg)
    if start:
        state = ckpt.load(engine.model, engine.optimizer)
        engine.scheduler.load_state_dict(state["scheduler"])
        log(f"[{name}] resuming SFT from its checkpoint at step {start}/{total}")
        interrupt.checkpointed(f"{name} step {start}", ckpt.root)
    elif init is not None:
        init(engine.model)
    logger = MetricsLogger(stage_dir, name, total, start_step=start, headline=("loss", "lr"), use_wandb=sft.wandb,
                           config=OmegaConf.to_container(run_cfg, resolve=True))
    if dropped:
        logger.print(f"[yellow]{name}: {dropped} of {len(rows)} rows longer than max_tokens={sft.max_tokens} were dropped")

    saved = [start]

    def save(step: int, _metrics: dict | None = None, stopping: bool = False) -> None:
        if stopping and saved[0] == step:
            return
        if stopping or step % sft.save_every == 0 or step == total:
            ckpt.save(step, engine.model, engine.optimizer, state={"scheduler": engine.scheduler.state_dict()})
            saved[0] = step
            interrupt.checkpointed(f"{name} step {step}", ckpt.root)

    try:  # a stop signal: a checkpoint at the step it ends, then Interrupted
        res = train_sft(engine, samples, scfg, logger=logger, start_step=start, on_step=save,
                        on_stop=lambda step: save(step, stopping=True))
    finally:
        logger.close()
    if is_rank0():
        plot_curves(logger.rows(), ["loss", "lr"], stage_dir / f"{name}.png", f"{name}: SFT of {cfg.model.name}")
    return {**summary, **_loss_summary(metrics), "seconds": res["seconds"], "tokens_per_s": res["tokens_per_s"]}


def _loss_summary(path: Path) -> dict:
    rows = _read_on_rank0(lambda: read_jsonl(path, "metrics") if path.exists() else [])
    if not rows:
        return {}
    return {"first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}


def checkpoint_loader(root: str | Path) -> Callable:
    """init(chunks) loading the latest checkpoint under `root` (weights only)."""
    from r1mega.checkpoint.manager import CheckpointManager

    def load(chunks):
        CheckpointManager(Path(root)).load(chunks)
    load.label = str(root)
    return load


# -- rows I/O ------------------------------------------------------------------------------------------
def read_rows(path: str | Path) -> list[dict]:
    """SFT rows a stage wrote (rejection-sampled, distilled, mixed), checked as `load_sft_rows` does."""
    return _read_on_rank0(lambda: read_sft_rows(path))


def _read_on_rank0(read: Callable[[], list[dict]]) -> list[dict]:
    """`read()` on rank 0, its rows (or its `DataError`, raised) on every rank: no rank waits forever."""
    try:
        out = read() if is_rank0() else None
    except DataError as e:
        out = e
    out = broadcast_object(out)
    if isinstance(out, DataError):
        raise out
    return out


def selected_stage(cfg) -> Optional[str]:
    """`recipe.stage`, or a top-level `+stage=` (the root schema has no `stage` field)."""
    return cfg.get("stage") or cfg.recipe.stage


def fail(msg: str) -> None:
    """One line on stderr and exit status 2, like a config error."""
    print(f"r1mega: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)
