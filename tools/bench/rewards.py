"""Rewards per second: the worker pool vs a single-process loop, on the same completions in one run.

    python tools/bench/rewards.py [--math 2000] [--code 200] [--workers 2]

Math completions are MATH-500/GSM8K gold solutions (every third one scored against another
row's answer), or synthetic fractions without the shared data; code completions solve
a-plus-b against 3 stdin tests, every other one wrongly.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from r1mega.rewards import RewardConfig, RewardManager, SourceConfig, TermConfig

DATA = Path(__file__).resolve().parents[2].parent / "shared/data/eval"
CODE_TESTS = {"inputs": ["1 2\n", "10 20\n", "-5 5\n"], "outputs": ["3", "30", "0"]}


def math_batch(n: int) -> list[tuple[dict, str]]:
    rows = []
    for name, key in (("math500.jsonl", "solution"), ("gsm8k.jsonl", "answer")):
        if (DATA / name).exists():
            rows += [(r, r[key]) for r in map(json.loads, (DATA / name).open())]
    if not rows:
        rows = [({"answer": f"\\frac{{{i}}}{{7}}"}, f"<think>...</think> so \\boxed{{{i}/7}}") for i in range(100)]
    batch = [rows[i % len(rows)] for i in range(n)]
    return [(rows[(i + 1) % len(rows)][0] if i % 3 == 0 else row, text) for i, (row, text) in enumerate(batch)]


def code_batch(n: int) -> list[tuple[dict, str]]:
    right = "a, b = map(int, input().split())\nprint(a + b)\n"
    wrong = "a, b = map(int, input().split())\nprint(a - b)\n"
    row = {"data_source": "code", "tests": CODE_TESTS}
    return [(row, f"<think>sum</think>\n```python\n{wrong if i % 2 else right}```") for i in range(n)]


def rate(cfg: RewardConfig, batch: list) -> tuple[float, float]:
    with RewardManager(cfg, "r1_zero") as manager:
        manager.score(batch[:4])  # warm-up: imports and sympy caches outside the timing
        start = time.perf_counter()
        totals = [s["total"] for s in manager.score(batch)]
        elapsed = time.perf_counter() - start
    return len(batch) / elapsed, sum(totals) / len(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--math", type=int, default=2000)
    parser.add_argument("--code", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sources = {"default": SourceConfig([TermConfig("accuracy")]), "code": SourceConfig([TermConfig("code")])}
    for kind, batch in (("math", math_batch(args.math)), ("code", code_batch(args.code))):
        serial, mean_serial = rate(RewardConfig(sources=sources, workers=0), batch)
        pooled, mean_pooled = rate(RewardConfig(sources=sources, workers=args.workers), batch)
        assert abs(mean_serial - mean_pooled) < 1e-9, "pool and loop disagree"
        print(f"{kind}: {len(batch)} completions, mean reward {mean_pooled:.3f}; single-process {serial:.1f}/s, "
              f"pool of {args.workers} {pooled:.1f}/s; ratio {pooled / serial:.2f}x")


if __name__ == "__main__":
    main()
