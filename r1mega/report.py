"""`python -m r1mega.report <run_dir> [max_steps=20] [max_groups=8]`: one self-contained HTML file,
`<run_dir>/report.html` (plotly.js inline: opens offline, attaches to a mail), for reading a GRPO run
in a minute:

- curves against the rollout number (`CHARTS`: reward terms, accuracy, response length, KL, entropy,
  clip fractions, train–inference log-prob gap, MoE load balance, step-time breakdown, loss and grad
  norm), each drawn when the run's `<recipe>_metrics.jsonl` has any of its metrics;
- the held-out eval tables before and after RL (`eval_before/`, `eval_after/results.json`);
- a sample browser over the latest `max_steps` rollout records (`rollouts/`, r1mega.trainer.records):
  for the first `max_groups` groups of a rollout, the best and the worst sample of the group by
  total reward, with each reward term, the advantage and the response's think / answer parts.
"""
from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

from r1mega.checkpoint.atomic import write_text

# (title, metric names or name prefixes ending in "/", y-axis title); `time/` stacks as bars.
CHARTS = [
    ("Reward terms", ["reward/"], "mean reward"),
    ("Accuracy and format", ["accuracy", "format_rate", "eval/pass@1", "eval/format"], "fraction"),
    ("Response length", ["response_length/mean", "response_length/max"], "tokens"),
    ("Truncated responses", ["response_length/clipped_frac"], "fraction"),
    ("KL", ["loss/ref_kl", "loss/approx_kl", "rollout_corr/kl_k3"], "nats per token"),
    ("Entropy", ["loss/entropy"], "nats per token"),
    ("Clip fractions", ["loss/clip_frac_low", "loss/clip_frac_high", "loss/dual_clip_frac"], "fraction of tokens"),
    ("Log-prob gap (trainer - engine)", ["logprob_gap/mean", "logprob_gap/max"], "|Δ log p|"),
    ("MoE load balance", ["moe/load_max_over_mean/"], "max / mean expert load"),
    ("Loss and grad norm", ["loss/total", "grad_norm"], "value"),
    ("Step time", ["time/"], "seconds"),
]
_SKIP = {"reward/std", "time/step"}  # a spread, and the total the stacked bars already show


def chart_series(rows: list[dict]) -> list[tuple[str, list[str], str]]:
    """(title, metric names, axis title) of each chart the rows have data for, in `CHARTS` order."""
    names = [k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    names = list(dict.fromkeys(names))
    out = []
    for title, keys, axis in CHARTS:
        picked = [n for n in names if n not in _SKIP and any(n == k or (k.endswith("/") and n.startswith(k)) for k in keys)]
        if picked:
            out.append((title, picked, axis))
    return out


def _figure(rows: list[dict], title: str, names: list[str], axis: str) -> str:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name in names:
        pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        fig.add_trace(go.Bar(x=x, y=y, name=name) if title == "Step time" else
                      go.Scatter(x=x, y=y, name=name, mode="lines+markers"))
    fig.update_layout(title=title, barmode="stack", height=320, margin=dict(l=50, r=20, t=40, b=40),
                      xaxis_title="rollout", xaxis_tickformat="d", yaxis_title=axis, legend=dict(font=dict(size=10)))
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _eval_table(run_dir: Path) -> str:
    from r1mega.eval.report import cells, columns

    results = {when: json.loads(p.read_text()) for when in ("before", "after")
               if (p := run_dir / f"eval_{when}" / "results.json").is_file()}
    if not results:
        return "<p>No held-out eval in this run directory.</p>"
    first = next(iter(results.values()))
    k = first["settings"]["k"]
    out = [f"<p>{html.escape(', '.join(f'{key} {v}' for key, v in first['settings'].items()))}</p>",
           "<table><tr><th>benchmark</th><th>when</th>" + "".join(f"<th>{c.key}</th>" for c in columns(k)) + "</tr>"]
    for bench in first["metrics"]:
        for when, res in results.items():
            row = "".join(f"<td>{html.escape(c)}</td>" for c in cells(res["metrics"].get(bench, {}), k))
            out.append(f"<tr><td>{html.escape(bench)}</td><td>{when} RL</td>{row}</tr>")
    return "\n".join(out) + "</table>"


def _parts(response: str) -> str:
    """The response with its <think> and <answer> parts marked (as the R1 templates ask for them)."""
    think = re.search(r"<think>(.*?)(</think>|$)", response, re.S)
    answer = re.search(r"<answer>(.*?)(</answer>|$)", response, re.S)
    if not think and not answer:
        return f'<div class="raw">{html.escape(response)}</div>'
    out = []
    if think:
        out.append(f'<div class="think"><b>think</b> {html.escape(think.group(1).strip())}</div>')
    if answer:
        out.append(f'<div class="answer"><b>answer</b> {html.escape(answer.group(1).strip())}</div>')
    return "".join(out)


def sample_browser(run_dir: Path, max_steps: int, max_groups: int) -> tuple[str, int]:
    """The browser's HTML and the number of samples it shows."""
    import pyarrow.parquet as pq

    files = sorted((run_dir / "rollouts").glob("step_*.parquet"))[-max_steps:]
    if not files:
        return "<p>No rollout records (recipe.records.every=0?).</p>", 0
    options, panes, shown = [], [], 0
    for k, f in enumerate(reversed(files)):  # the latest first
        t = pq.read_table(f).to_pylist()
        step = t[0]["step"]
        terms = [c for c in t[0] if c.startswith("reward/") and c != "reward/total"]
        options.append(f'<option value="{step}">rollout {step}</option>')
        blocks = []
        for g in sorted({r["group"] for r in t})[:max_groups]:
            group = sorted((r for r in t if r["group"] == g), key=lambda r: r["reward/total"])
            for label, r in (("best", group[-1]), ("worst", group[0])):
                rewards = " ".join(f"{c[7:]} {r[c]:.3g}" for c in terms)
                blocks.append(
                    f'<div class="sample"><div class="meta"><b>group {g} {label}</b> · sample {r["sample"]} · '
                    f'total reward {r["reward/total"]:.3g} ({html.escape(rewards)}) · advantage {r["advantage"]:+.3f} · '
                    f'{len(r["response_ids"])} tokens{" · truncated" if r["truncated"] else ""}</div>'
                    f'<details><summary>prompt</summary><pre>{html.escape(r["prompt"])}</pre></details>'
                    f'{_parts(r["response"])}</div>')
                shown += 1
        panes.append(f'<div class="step" id="step-{step}"{"" if k == 0 else " hidden"}>{"".join(blocks)}</div>')
    select = ('<select id="step-select" onchange="for (const d of document.querySelectorAll(\'.step\')) '
              'd.hidden = d.id !== \'step-\' + this.value;">' + "".join(options) + "</select>")
    return f"<p>Rollout {select} — best and worst sample of each group (first {max_groups} groups).</p>" + "".join(panes), shown


STYLE = """body{font-family:sans-serif;margin:20px;max-width:1400px} .charts{display:grid;grid-template-columns:1fr 1fr;gap:8px}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
.sample{border:1px solid #ddd;border-radius:4px;margin:6px 0;padding:6px} .meta{font-size:13px;color:#333}
.think{background:#f3f3f3;padding:4px;margin-top:4px;white-space:pre-wrap}
.answer{background:#e8f4e8;padding:4px;margin-top:4px;white-space:pre-wrap} .raw{white-space:pre-wrap;margin-top:4px}
pre{white-space:pre-wrap;font-size:12px}"""


def write(run_dir: str | Path, max_steps: int = 20, max_groups: int = 8) -> Path:
    """Writes `<run_dir>/report.html` (atomically) and returns its path. Raises FileNotFoundError
    when `run_dir` has no metrics file."""
    from plotly.offline import get_plotlyjs

    run_dir = Path(run_dir)
    metrics = sorted(run_dir.glob("*_metrics.jsonl"))
    if not metrics:
        raise FileNotFoundError(f"{run_dir}: no <recipe>_metrics.jsonl (not a run directory, or no step done yet)")
    rows = [json.loads(line) for line in metrics[0].read_text().splitlines() if line.strip()]
    name = metrics[0].name[: -len("_metrics.jsonl")]
    charts = "".join(f'<div class="chart">{_figure(rows, *series)}</div>' for series in chart_series(rows))
    samples, _ = sample_browser(run_dir, max_steps, max_groups)
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(name)}: {html.escape(str(run_dir))}</title>'
            f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(name)} — {html.escape(str(run_dir))}</h1><p>{len(rows)} rollouts logged.</p>"
            f'<h2>Curves</h2><div class="charts">{charts}</div><h2>Held-out eval</h2>{_eval_table(run_dir)}'
            f"<h2>Samples</h2>{samples}</body></html>")
    return write_text(run_dir / "report.html", page)


USAGE = """usage: python -m r1mega.report <run_dir> [max_steps=20] [max_groups=8]

Writes <run_dir>/report.html, one self-contained page: the run's curves, its held-out eval tables
and a sample browser over the latest max_steps rollout records (best and worst sample of the first
max_groups groups of each).

example: python -m r1mega.report runs/r1_zero/tiny_moe
exit status: 0 written; 2 bad arguments or not a run directory"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        sys.exit(0)
    opts = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    if (not argv or len(opts) != len(argv) - 1 or set(opts) - {"max_steps", "max_groups"}
            or not all(v.isdigit() for v in opts.values())):
        print(USAGE.splitlines()[0], file=sys.stderr)
        sys.exit(2)
    try:
        out = write(argv[0], **{k: int(v) for k, v in opts.items()})
    except FileNotFoundError as e:
        print(f"r1mega.report: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report: {out}")


if __name__ == "__main__":
    main()
