"""Evaluation of the models a recipe holds, with the paper's protocol (`r1mega.eval.runner.evaluate`:
pass@1 from k samples, cons@k, ...) and the settings of a recipe's `eval` (`EvalConfig`): the model
an engine serves now (`evaluate_served`; the GRPO policy before / after RL), a checkpoint loaded into a
`PolicySampler` (`evaluate_model`), or several with one engine (`evaluate_models`). Results are cached
per model in a directory of the run, so a restarted run does not evaluate again."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig

from r1mega.config.schema import EvalConfig
from r1mega.eval import report
from r1mega.eval.runner import evaluate
from r1mega.parallel.state import broadcast_object, is_rank0
from r1mega.rollout.sampler import PolicySampler


SETTINGS = ("template", "k", "temperature", "top_p", "max_tokens", "seed", "max_model_len")  # what a cached result must share


def evaluate_served(engine, tok, rows: list[dict], template: str, e: EvalConfig, seed: int, max_model_len: int,
                    out_dir: Optional[Path] = None, label: Optional[str] = None, remeasure: bool = True) -> dict:
    """Metrics per data source (`r1mega.eval.report.columns`) of the model `engine` serves, evaluated
    on the engine rank (`engine` is None elsewhere) and shared with every rank. With `out_dir`: saved
    there by rank 0 (results.json/.md, samples.jsonl, the model named `label`) and read back instead of
    evaluating when results.json exists with the same `SETTINGS`. With other settings the served model
    is evaluated again (`remeasure`), or, where the model that result measured is gone (the policy
    before RL, once trained), ValueError names the settings that differ."""
    cached = saved_metrics(out_dir, settings(template, e, seed, max_model_len), remeasure) if out_dir is not None else None
    if cached is not None:
        return cached
    metrics = None
    if engine is not None:
        result = evaluate(engine, tok, rows, template, k=e.k, temperature=e.temperature, top_p=e.top_p,
                          max_tokens=e.max_tokens, seed=seed, max_model_len=max_model_len)
        if label is not None:
            result.settings["model"] = label
        if out_dir is not None and is_rank0():
            report.save(result, out_dir)
        metrics = result.metrics
    return broadcast_object(metrics)


def settings(template: str, e: EvalConfig, seed: int, max_model_len: int) -> dict:
    """The `SETTINGS` of an evaluation, as `r1mega.eval.runner.evaluate` records them."""
    return dict(template=template, k=e.k, temperature=e.temperature, top_p=e.top_p, max_tokens=e.max_tokens,
                seed=seed, max_model_len=max_model_len)


def saved_metrics(out_dir: Path, settings: dict, remeasure: bool = True) -> Optional[dict]:
    """The metrics saved in `out_dir/results.json` if they were measured with `settings` (`SETTINGS`);
    None when there are none or (`remeasure`) they were measured otherwise; ValueError otherwise."""
    path = out_dir / "results.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    differ = [key for key in SETTINGS if saved["settings"].get(key) != settings[key]]
    if not differ:
        return saved["metrics"]
    if remeasure:
        return None
    was = ", ".join(f"{key}={saved['settings'].get(key)!r}" for key in differ)
    now = ", ".join(f"{key}={settings[key]!r}" for key in differ)
    raise ValueError(f"{path} was measured with {was}, this run asks for {now}, and the model it measured is "
                     "gone: keep the run's eval settings (recipe.eval, rollout.max_model_len) or use a new run_dir")


def evaluate_model(sampler: PolicySampler, rows: list[dict], template: str, e: EvalConfig, seed: int,
                   out_dir: Path) -> dict:
    """`evaluate_served` of the model `sampler` has loaded, cached under `out_dir`."""
    return evaluate_served(sampler.engine, sampler.tok, rows, template, e, seed, sampler.cfg.rollout.max_model_len,
                           out_dir, sampler.loaded)


def evaluate_models(cfg: DictConfig, tok, launch, models: list[tuple[str, Callable]], rows: list[dict], e: EvalConfig,
                    out_dir: Path, work_dir: Path) -> dict:
    """`evaluate_served` of each (name, init) model, saved under `out_dir/name`; one engine serves them
    all and is built only if some result is not saved yet (with these settings)."""
    want = settings(cfg.recipe.template, e, cfg.platform.seed, cfg.rollout.max_model_len)
    results = {name: saved_metrics(out_dir / name, want) for name, _ in models}  # None: still to evaluate
    sampler = PolicySampler(cfg, tok, work_dir, launch) if None in results.values() else None
    try:
        for name, init in models:
            if results[name] is None:
                sampler.load(init, name)
                results[name] = evaluate_model(sampler, rows, cfg.recipe.template, e, cfg.platform.seed, out_dir / name)
        return results
    finally:
        if sampler is not None:
            sampler.close()
