"""`python -m r1mega.eval [key=value ...]`: evaluate a model on the math benchmarks.

Keys of `EvalOptions` (`r1mega/eval/config.py`) set the evaluation, e.g.
`benchmarks=math500,aime24 k=4 limit=20 max_tokens=256 model_dir=/path/to/hf out_dir=runs/eval/x`;
anything else is a Hydra override of the main config, which supplies the engine (`rollout=`,
`rollout.max_model_len=...`, `platform=`) and, without `model_dir`, the preset of the tiny random
model (`model=tiny_moe`). Bad options exit 2 with one line.
"""
from __future__ import annotations

import sys
import time
from dataclasses import fields
from pathlib import Path

from omegaconf import OmegaConf

from r1mega.__main__ import _one_line
from r1mega.eval.config import EvalOptions


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
    from r1mega.config import compose
    from r1mega.eval import benchmarks

    try:
        cfg, overrides = parse(list(sys.argv[1:] if argv is None else argv))
        job = compose(overrides)
        rows = [row for name in cfg.benchmarks for row in benchmarks.load(name, cfg.limit, cfg.data_dir)]
    except Exception as e:  # unknown key or benchmark, bad type or value, unreadable data file
        print(f"r1mega.eval: {_one_line(e)}", file=sys.stderr)
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
