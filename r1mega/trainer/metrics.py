"""Step metrics to W&B, a JSONL file and the console (rank 0 only), and the per-step PNG.

W&B runs offline unless the user configures it (`WANDB_MODE=online` and a key): files land in
`<run_dir>/wandb`, to be `wandb sync`-ed later. `metrics.jsonl` in the run directory is the
source the PNG and the resume test read.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r1mega.parallel.state import is_rank0


class MetricsLogger:
    def __init__(self, run_dir: str | Path, name: str, total_steps: int, config: dict | None = None,
                 start_step: int = 0, headline: tuple[str, ...] = (), use_wandb: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / f"{name}_metrics.jsonl"
        self.headline = headline
        self.enabled = is_rank0()
        self.wandb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and self.path.exists():
            self.path.unlink()
        self._truncate_after(start_step)
        if use_wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project="r1mega", name=name, dir=str(self.run_dir), config=config,
                                    resume="allow", id=_run_id(self.run_dir, name), reinit="create_new")
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console, transient=False,
        )
        self.task = self.progress.add_task(name, total=total_steps, completed=start_step, info="")
        self.progress.start()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop rows a killed run wrote after its last checkpoint: they will be redone."""
        if not self.path.exists():
            return
        rows = [r for r in self.rows() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        info = "  ".join(f"{k}={row[k]:.4g}" for k in self.headline if isinstance(row.get(k), (int, float)))
        self.progress.update(self.task, completed=step, info=info)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.stop()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _run_id(run_dir: Path, name: str) -> str:
    import hashlib

    return hashlib.sha1(f"{run_dir.resolve()}:{name}".encode()).hexdigest()[:12]


def plot_curves(rows: list[dict], keys: list[str], path: str | Path, title: str) -> Path:
    """One panel per key against step (keys missing from every row are skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
