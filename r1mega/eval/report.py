"""The results table (console and markdown) and the files of an evaluation run:
`results.json` (settings + metrics), `results.md` (the table), `samples.jsonl` (every completion)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from r1mega.data.jsonl import write_jsonl
from r1mega.eval.runner import EvalResult


def _columns(k: int) -> list[tuple[str, str, str]]:
    """(metric key, column title, format); rates are fractions in [0, 1]."""
    rate = "{:.3f}"
    return [("problems", "problems", "{}"), ("skipped", "skipped", "{}"), ("pass@1", "pass@1", rate),
            (f"cons@{k}", f"cons@{k}", rate), (f"pass@{k}", f"pass@{k}", rate), ("format", "format", rate),
            ("mean_tokens", "tokens", "{:.1f}"), ("truncated", "truncated", rate)]


def rows(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """The table's header and one line per benchmark."""
    columns = _columns(result.settings["k"])
    header = ["benchmark", *(title for _, title, _ in columns)]
    return header, [[name, *("-" if m[key] is None else fmt.format(m[key]) for key, _, fmt in columns)]
                    for name, m in result.metrics.items()]


def title(result: EvalResult) -> str:
    s = result.settings
    return (f"{s.get('model', 'model')}: k={s['k']}, temperature {s['temperature']}, top-p {s['top_p']}, "
            f"max_tokens {s['max_tokens']}, template {s['template']}")


def print_table(result: EvalResult, console: Console | None = None) -> None:
    """`skipped`: prompts too long for max_model_len - max_tokens; `tokens`: mean completion length."""
    table = Table(title=title(result), box=box.SIMPLE_HEAD, pad_edge=False)
    header, body = rows(result)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", min_width=len(name))
    for line in body:
        table.add_row(*line)
    # Without a terminal (logs, CI) rich assumes 80 columns and would squeeze the table.
    (console or Console(width=None if sys.stdout.isatty() else 120)).print(table)


def markdown(result: EvalResult) -> str:
    header, body = rows(result)
    lines = [f"**{title(result)}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body]) + "\n"


def save(result: EvalResult, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": result.settings, "metrics": result.metrics}, indent=2))
    (out / "results.md").write_text(markdown(result))
    write_jsonl(out / "samples.jsonl", result.samples)
    return out
