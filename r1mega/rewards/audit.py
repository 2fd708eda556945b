"""Grader audit: the math reward over the benchmarks' own gold solutions, over other rows' golds, and
over known hard cases (each with its right value). `tools/grader_audit.py` prints the tables.

- own-gold acceptance: the share of rows whose own worked solution (MATH-500, AIME 2024, GSM8K) is
  graded correct against the row's gold; AMC 2023 has no solutions, so its gold in a box stands in.
  Rows whose solution states no final answer are counted apart (`unstated`), not graded.
- cross-gold false positives: the share of (solution, other row's gold) pairs graded correct, over
  `others` seeded partners per row whose gold is not equivalent to the row's own.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from r1mega.data.jsonl import read_jsonl
from r1mega.eval.benchmarks import BENCHMARKS, data_dir, load
from r1mega.rewards.math import accuracy, equivalent, extract_answer
from r1mega.rewards.pool import WorkerPool

SOLUTION_KEY = {"math500": "solution", "aime24": "solution", "gsm8k": "answer"}  # amc23: none


@dataclass(frozen=True)
class Case:
    """A grading case whose right value is known: `accuracy(completion, {"answer": gold},
    think_open=think_open)` must be `expected`."""

    what: str
    completion: str
    gold: str | None
    expected: float
    think_open: bool = False


CASES = [
    Case("tiny values: 2^-98 vs 2^-99", "... \\boxed{\\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}", 0.0),
    Case("tiny values: 1/2006! vs 1/2004!", "\\boxed{\\frac{1}{2006!}}", "\\frac{1}{2004!}", 0.0),
    Case("huge terms: 1/(3*2^2006) vs (2^2005+1)/(3*2^2006)", "\\boxed{\\frac{1}{3 \\cdot 2^{2006}}}", "\\frac{2^{2005}+1}{3 \\cdot 2^{2006}}", 0.0),
    Case("tiny values inside a tuple", "\\boxed{(2^{-98}, 1)}", "(2^{-99}, 1)", 0.0),
    Case("tiny decimal vs exact", "\\boxed{1.58 \\times 10^{-30}}", "\\frac{1}{2^{99}}", 0.0),
    Case("large integers differ by one", "\\boxed{100000}", "100001", 0.0),
    Case("percent in the gold", "\\boxed{28}", "28\\%", 1.0),
    Case("percent in the prediction", "\\boxed{25\\%}", "25", 1.0),
    Case("a fraction is not a percent", "\\boxed{0.28}", "28\\%", 0.0),
    Case("degrees in the gold", "\\boxed{90}", "90^{\\circ}", 1.0),
    Case("currency in the gold", "\\boxed{5}", "\\$5", 1.0),
    Case("thin-space thousands", "\\boxed{1\\,000}", "1000", 1.0),
    Case("template opened <think>, never closed", "Let me try 2+3. Maybe \\boxed{5}? Wait, let me re-check the", "5", 0.0, think_open=True),
    Case("a second think left open", "<think>first pass</think> <think>second pass, maybe \\boxed{5} but", "5", 0.0),
    Case("null gold", "\\boxed{None}", None, 0.0),
    Case("empty box", "\\boxed{}", "", 0.0),
    Case("last stated answer wins", "\\boxed{5} wait, no:\n#### 6", "5", 0.0),
    Case("a Markdown heading after the answer is not an answer", "\\boxed{7}\n\n#### Check\nPlugging back in works.", "7", 1.0),
    Case("GSM8K's answer ends with its line", "#### 7\n\nSo she earns \\$7.", "7", 1.0),
    Case("a bare \\boxed after the answer", "\\boxed{7} \\boxed", "7", 1.0),
    Case("escaped backslash before the closing brace", "\\boxed{7 \\\\}", "7", 1.0),
    Case("scientific notation as Python prints a float gold", "\\boxed{0.00001}", "1e-05", 1.0),
    Case("Euler's e is not scientific notation", "\\boxed{e-5}", "1e-05", 0.0),
    Case("scientific notation in the prediction", "\\boxed{1.2e5}", "120000", 1.0),
    Case("degrees inside a trig function are not dropped", "\\boxed{\\sin 30^\\circ}", "\\frac{1}{2}", 1.0),
    Case("a zero-width gold matches nothing", "\\boxed{\u200b}", "\u200b", 0.0),
    Case("a full stop after a choice", "\\boxed{\\text{(C)}.}", "\\text{(C)}", 1.0),
    Case("\\boxed without braces", "so $\\boxed 5$.", "5", 1.0),
    Case("gold only inside the think", "<think>the answer is \\boxed{42}</think> I am not sure.", "42", 0.0),
]


def check_cases(cases: list[Case] = CASES) -> list[tuple[Case, float]]:
    """(case, value graded now) for each case; a case holds when value == case.expected."""
    return [(c, accuracy(c.completion, {"answer": c.gold}, think_open=c.think_open)) for c in cases]


@dataclass
class BenchmarkAudit:
    name: str
    rows: int
    graded: int  # rows with a stated answer in their solution (all rows for amc23)
    own_accepted: int
    cross_pairs: int
    cross_accepted: int
    seconds: float
    failures: list[dict] = field(default_factory=list)  # {kind: own | cross, id, gold, stated}

    @property
    def own_rate(self) -> float:
        return self.own_accepted / max(self.graded, 1)

    @property
    def cross_rate(self) -> float:
        return self.cross_accepted / max(self.cross_pairs, 1)


def _solutions(name: str, root: Path) -> list[str]:
    rows = load(name, root=root)
    if name not in SOLUTION_KEY:
        return [f"\\boxed{{{r['answer']}}}" for r in rows]
    raw = read_jsonl(root / "eval" / f"{name}.jsonl")
    return [str(r[SOLUTION_KEY[name]]) for r in raw]


def audit_benchmark(name: str, pool: WorkerPool, others: int = 5, seed: int = 0, root: Path | None = None,
                    timeout_s: float = 10.0) -> BenchmarkAudit:
    """Own-gold and cross-gold grading of benchmark `name` (module docstring); `others` partners per row."""
    root = Path(root or data_dir())
    start = time.monotonic()
    rows, solutions = load(name, root=root), _solutions(name, root)
    stated = [extract_answer(s) for s in solutions]
    graded = [i for i, a in enumerate(stated) if a is not None]
    rng = random.Random(seed)
    pairs = [(i, j) for i in graded
             for j in [j for j in rng.sample(range(len(rows)), min(others + 1, len(rows))) if j != i][:others]]
    same = pool.run([(equivalent, (rows[i]["answer"], rows[j]["answer"]), {}, timeout_s) for i, j in pairs], False)
    pairs = [p for p, s in zip(pairs, same) if not s]
    own = pool.run([(accuracy, (solutions[i], rows[i]), {}, timeout_s) for i in graded], 0.0)
    cross = pool.run([(accuracy, (solutions[i], rows[j]), {}, timeout_s) for i, j in pairs], 0.0)
    failures = [{"kind": "own", "id": rows[i]["id"], "gold": rows[i]["answer"], "stated": stated[i]}
                for i, v in zip(graded, own) if v != 1.0]
    failures += [{"kind": "cross", "id": rows[i]["id"], "gold": f"{rows[j]['answer']} (of {rows[j]['id']})",
                  "stated": stated[i]} for (i, j), v in zip(pairs, cross) if v == 1.0]
    return BenchmarkAudit(name, len(rows), len(graded), int(sum(v == 1.0 for v in own)), len(pairs),
                          int(sum(v == 1.0 for v in cross)), time.monotonic() - start, failures)


def audit(names: tuple[str, ...] = BENCHMARKS, others: int = 5, workers: int = 2, seed: int = 0,
          root: Path | None = None) -> list[BenchmarkAudit]:
    pool = WorkerPool(workers)
    try:
        return [audit_benchmark(name, pool, others, seed, root) for name in names]
    finally:
        pool.close()
