"""`python -m r1mega.eval [key=value ...]`: evaluate a model on the math benchmarks.

Keys of `EvalOptions` (`r1mega/eval/config.py`) set the evaluation, e.g.
`benchmarks=math500,aime24 k=4 limit=20 max_tokens=256 model_dir=/path/to/hf out_dir=runs/eval/x`;
anything else is a Hydra override of the main config, which supplies the engine (`rollout=`,
`rollout.max_model_len=...`, `platform=`) and, without `model_dir`, the preset of the tiny random
model (`model=tiny_moe`). Bad options, a missing `model_dir` or data file, or an `out_dir` /
`cache_dir` that cannot be created exit 2 with one line, before any engine starts.
"""
from __future__ import annotations

import sys
import time
from dataclasses import fields
from pathlib import Path

from omegaconf import OmegaConf

from r1mega.eval.config import EvalOptions

USAGE = """usage: python -m r1mega.eval [option=value ...] [hydra overrides ...]

Evaluate a model on the math benchmarks (pass@1 from k samples, cons@k) with vLLM; writes
results.json, results.md and samples.jsonl to out_dir and prints a table.

options (EvalOptions, r1mega/eval/config.py):
{options}
anything else is an override of the main config: the engine (rollout=..., rollout.max_model_len=...,
platform=...) and, without model_dir, the tiny random model's preset (model=tiny_moe).

example:
  python -m r1mega.eval model_dir=/path/to/hf benchmarks=math500,aime24 k=4 limit=20 out_dir=runs/eval/x

exit status: 0 done, 2 bad options or paths (one line on stderr, before any engine starts)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _options_help() -> str:
    """One line per EvalOptions field: name, default and the comment beside it in the source."""
    import inspect
    import re

    notes = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(EvalOptions), re.M))
    rows = []
    for f in fields(EvalOptions):
        default = f.default_factory() if callable(f.default_factory) else f.default
        default = ",".join(default) if isinstance(default, list) else default
        rows.append((f"  {f.name}={default}".ljust(40) + f"  {notes.get(f.name, '')}").rstrip())
    return "\n".join(rows)


def _path_problems(cfg: EvalOptions) -> list[str]:
    """Missing inputs and uncreatable outputs, each in one sentence."""
    from r1mega.__main__ import dir_problem

    problems = []
    if cfg.model_dir is not None:
        d = Path(cfg.model_dir)
        if not d.is_dir():
            problems.append(f"model_dir={cfg.model_dir} " + ("is not a directory." if d.exists() else "does not exist."))
        elif not (d / "config.json").is_file():
            problems.append(f"model_dir={cfg.model_dir} has no config.json (not a Hugging Face model directory).")
        elif not any((d / f).is_file() for f in TOKENIZER_FILES):
            problems.append(f"model_dir={cfg.model_dir} has no tokenizer ({', '.join(TOKENIZER_FILES)}).")
        elif not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
            problems.append(f"model_dir={cfg.model_dir} has no weights (*.safetensors or *.bin).")
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        problems.append(f"data_dir={cfg.data_dir} is not a directory.")
    outputs = [("out_dir", cfg.out_dir)] + ([("cache_dir", cfg.cache_dir)] if cfg.model_dir is None else [])
    problems += [p for key, path in outputs if path is not None for p in [dir_problem(key, path)] if p]
    return problems


def parse(argv: list[str]) -> tuple[EvalOptions, list[str]]:
    """(evaluation options, main-config overrides). `benchmarks=a,b` is accepted for `[a,b]`."""
    ours, overrides = [], []
    names = {f.name for f in fields(EvalOptions)}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in names:
            overrides.append(arg)
        elif key == "benchmarks" and not value.startswith("["):
            ours.append(f"benchmarks=[{value}]")
        else:
            ours.append(arg)
    cfg = OmegaConf.merge(OmegaConf.structured(EvalOptions), OmegaConf.from_dotlist(ours))
    return OmegaConf.to_object(cfg), overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(USAGE.format(options=_options_help()))
        return 0

    from r1mega.config import one_line
    from r1mega.config import ConfigError, compose
    from r1mega.eval import benchmarks

    try:
        cfg, overrides = parse(argv)
        problems = _path_problems(cfg)
        if problems:
            raise ConfigError(problems)
        job = compose(overrides)
        if cfg.max_tokens >= job.rollout.max_model_len:  # vLLM would leave no room for any prompt
            raise ConfigError([f"max_tokens={cfg.max_tokens} leaves no room for a prompt in rollout.max_model_len="
                               f"{job.rollout.max_model_len}; raise rollout.max_model_len or lower max_tokens."])
        rows = [row for name in cfg.benchmarks for row in benchmarks.load(name, cfg.limit, cfg.data_dir)]
    except ConfigError as e:
        more = f" ({len(e.problems) - 1} more problem(s) after fixing this)" if len(e.problems) > 1 else ""
        print(f"r1mega.eval: invalid config: {e.problems[0]}{more}", file=sys.stderr)
        return 2
    except Exception as e:  # unknown key or benchmark, bad type or value, unreadable data file
        print(f"r1mega.eval: invalid config: {one_line(e)}", file=sys.stderr)
        return 2

    from rich.progress import Progress

    from r1mega.data.tokenizer import load_tokenizer
    from r1mega.eval.random_model import random_model
    from r1mega.eval.report import print_table, save
    from r1mega.eval.runner import evaluate
    from r1mega.rollout.vllm_engine import VLLMEngine

    start = time.monotonic()
    model_dir = Path(cfg.model_dir or random_model(job.model, cfg.cache_dir))
    engine = VLLMEngine(model_dir, job.rollout, device=job.platform.device, seed=cfg.seed)
    try:
        with Progress() as bar:
            task = bar.add_task(f"{len(rows)} problems x {cfg.k} samples", total=None)
            result = evaluate(engine, load_tokenizer(model_dir), rows, template=cfg.template, k=cfg.k,
                              temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                              seed=cfg.seed, max_model_len=job.rollout.max_model_len, workers=cfg.workers,
                              timeout_s=cfg.timeout_s,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))
    finally:
        engine.shutdown()
    result.settings["model"] = str(model_dir)
    out = save(result, cfg.out_dir or Path("runs/eval") / time.strftime("%Y%m%d-%H%M%S"))
    print_table(result)
    print(f"wrote {out}/results.json, results.md, samples.jsonl ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
