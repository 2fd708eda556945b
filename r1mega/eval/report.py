"""The evaluation summary: one set of metric names (`columns`), the numbers of all benchmarks
together (`pooled`), the tables that show them (console, markdown, the multi-model table; the HTML
run report uses `columns` too) and the files of an evaluation run: `results.json` (settings +
metrics), `results.md` (the table), `samples.jsonl` (every completion)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from r1mega.checkpoint.atomic import write_text
from r1mega.data.jsonl import write_jsonl

if TYPE_CHECKING:  # the tables need no grading library (r1mega.report imports them)
    from r1mega.eval.runner import EvalResult


@dataclass(frozen=True)
class Column:
    """One metric of a benchmark (`EvalResult.metrics[benchmark][key]`); `key` is also its name in
    every table and summary."""

    key: str
    fmt: str
    count: bool = False  # a count, summed across benchmarks; the others are means weighted by problems


def columns(k: int) -> list[Column]:
    """The metrics in table order: `problems` evaluated, `skipped` (prompt longer than max_model_len -
    max_tokens), pass@1 / cons@k / pass@k (per-problem means, fractions in [0, 1]), `format` (fraction
    of samples in the template's form), `mean_tokens` (completion tokens per sample), `truncated`
    (fraction of samples cut at max_tokens)."""
    rate = "{:.3f}"
    return [Column("problems", "{}", count=True), Column("skipped", "{}", count=True), Column("pass@1", rate),
            Column(f"cons@{k}", rate), Column(f"pass@{k}", rate), Column("format", rate),
            Column("mean_tokens", "{:.1f}"), Column("truncated", rate)]


def cells(metrics: dict, k: int, keys: tuple[str, ...] | None = None) -> list[str]:
    """`metrics` formatted, in `columns(k)` order or that of `keys`; "-" for a missing or None value
    (no problem evaluated)."""
    cols = columns(k)  # a list: at k = 1, pass@1 is also pass@k
    fmt = {c.key: c.fmt for c in cols}
    return ["-" if metrics.get(key) is None else fmt[key].format(metrics[key])
            for key in (keys or [c.key for c in cols])]


def pooled(metrics: dict[str, dict], k: int) -> dict:
    """All benchmarks of `metrics` (benchmark -> its numbers) together under the same names: counts
    summed, means weighted by each benchmark's problems (every problem has k samples, so this is the
    mean over all problems and samples); a mean is None when no problem was evaluated."""
    out = {}
    problems = sum(m["problems"] for m in metrics.values())
    for c in columns(k):
        if c.count:
            out[c.key] = sum(m[c.key] for m in metrics.values())
        else:
            out[c.key] = (sum(m["problems"] * m[c.key] for m in metrics.values() if m["problems"]) / problems
                          if problems else None)
    return out


def changes(before: dict, after: dict, keys: tuple[str, ...], k: int) -> str:
    """`key before -> after` for each of `keys`, formatted as the tables do."""
    return ", ".join(f"{key} {b} -> {a}" for key, b, a in zip(keys, cells(before, k, keys), cells(after, k, keys)))


def rows(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """The table's header and one line per benchmark."""
    k = result.settings["k"]
    return (["benchmark", *(c.key for c in columns(k))],
            [[name, *cells(m, k)] for name, m in result.metrics.items()])


def title(result: EvalResult) -> str:
    s = result.settings
    return (f"{s.get('model', 'model')}: k={s['k']}, temperature {s['temperature']}, top-p {s['top_p']}, "
            f"max_tokens {s['max_tokens']}, template {s['template']}")


def _print(title_: str, header: list[str], body: list[list[str]], labels: int, console: Console | None) -> None:
    """A rich table: the first `labels` columns left-aligned, the numbers right-aligned."""
    table = Table(title=title_, box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < labels else "right", min_width=len(name), no_wrap=True)
    for line in body:
        table.add_row(*line)
    # Without a terminal (logs, CI) rich assumes 80 columns and would squeeze the table: no limit there.
    (console or Console(width=None if sys.stdout.isatty() else 1000)).print(table)


def _markdown(title_: str, header: list[str], body: list[list[str]]) -> str:
    lines = [f"**{title_}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body]) + "\n"


def print_table(result: EvalResult, console: Console | None = None) -> None:
    """One line per benchmark (`columns`)."""
    _print(title(result), *rows(result), labels=1, console=console)


def markdown(result: EvalResult) -> str:
    return _markdown(title(result), *rows(result))


def print_eval_table(title_: str, entries: list[tuple[str, dict]], k: int, out_dir: Path,
                     console: Console | None = None) -> None:
    """One line per (model, benchmark) of `entries` (model label, its metrics by benchmark), printed
    and written to `out_dir/eval_table.md` and `.json` (label -> metrics). Call it on one rank."""
    header = ["model", "benchmark", *(c.key for c in columns(k))]
    body = [[label, bench, *cells(m, k)] for label, metrics in entries for bench, m in metrics.items()]
    _print(title_, header, body, labels=2, console=console)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "eval_table.md", _markdown(title_, header, body))
    write_text(out_dir / "eval_table.json", json.dumps(dict(entries), indent=2))


def save(result: EvalResult, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "samples.jsonl", result.samples)
    write_text(out / "results.md", markdown(result))
    # Last and atomic: results.json is what a restarted run reuses (`r1mega.eval.models`).
    write_text(out / "results.json", json.dumps({"settings": result.settings, "metrics": result.metrics}, indent=2))
    return out
