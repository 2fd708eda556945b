"""Step metrics to W&B, a JSONL file and the console (rank 0 only), and the per-step PNG.

W&B runs offline unless the user configures it (`WANDB_MODE=online` and a key): files land in
`<run_dir>/wandb`, to be `wandb sync`-ed later. `metrics.jsonl` in the run directory is the
source the PNG and the resume test read. The W&B run id is kept in `<run_dir>/<name>_wandb_id`: a
restart (after kill -9 too) continues the same W&B run (`resume="allow"`), and steps the killed run
already logged (they are in metrics.jsonl) are not logged to W&B again, so its step column stays
strictly increasing with no duplicates. With `samples_every` > 0, every that many steps a table of
sample completions (the first `SAMPLE_ROWS` rows of the step's rollout record, r1mega.trainer.records)
goes to W&B as `samples`.

On a terminal the console shows a progress bar (stderr). Without one (stdout not a TTY: Slurm, nohup,
`| tee`) each step prints one plain line to stdout instead, e.g.
`r1_zero rollout 3/30  reward 0.41  accuracy 0.38  len 21.0  7.2 s`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r1mega.parallel.state import is_rank0


class MetricsLogger:
    def __init__(self, run_dir: str | Path, name: str, total_steps: int, config: dict | None = None,
                 start_step: int = 0, headline: tuple[str, ...] = (), use_wandb: bool = True, unit: str = "step",
                 plain: bool | None = None, plain_every_s: float = 0.0, samples_every: int = 0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / f"{name}_metrics.jsonl"
        self.name, self.total, self.unit = name, total_steps, unit
        self.headline = headline
        self.enabled = is_rank0()
        self.wandb = None
        self.progress = None
        self.closed = False
        # No terminal on stdout: one plain line per step (a progress bar would reach the log garbled).
        self.plain = (not _isatty(sys.stdout)) if plain is None else plain
        self.plain_every_s = plain_every_s  # plain lines at most this often (the last step always)
        self._last_t = self._printed_t = time.perf_counter()
        self.samples_every = samples_every
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Steps a killed run logged past its checkpoint are in W&B already: it gets steps after them only.
        self.wandb_after = max((r["step"] for r in self.rows()), default=0) if self.path.exists() else 0
        if start_step == 0 and self.path.exists():
            self.path.unlink()
        self._truncate_after(start_step)
        if use_wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project="r1mega", name=name, dir=str(self.run_dir), config=config,
                                    resume="allow", id=_run_id(self.run_dir / f"{name}_wandb_id"), reinit="create_new")
        self.console = Console(stderr=True)
        if self.plain:
            return
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
        if self.wandb is not None and step > self.wandb_after:
            self.wandb.log({**row, **self._samples_table(step)}, step=step)
        now = time.perf_counter()
        dt, self._last_t = now - self._last_t, now
        if self.progress is None:
            if now - self._printed_t >= self.plain_every_s or step == self.total:
                self._printed_t = now
                print(self.line(step, row, dt), flush=True)
            return
        info = "  ".join(f"{k}={row[k]:.4g}" for k in self.headline if isinstance(row.get(k), (int, float)))
        self.progress.update(self.task, completed=step, info=info)

    def _samples_table(self, step: int) -> dict:
        """{"samples": a W&B table of the step's sample completions} every `samples_every` steps
        that have a rollout record, else {}."""
        from r1mega.trainer.records import path_of

        path = path_of(self.run_dir / "rollouts", step)
        if not (self.samples_every and step % self.samples_every == 0 and path.is_file()):
            return {}
        import pyarrow.parquet as pq
        import wandb

        batch = next(pq.ParquetFile(path).iter_batches(batch_size=SAMPLE_ROWS, columns=SAMPLE_COLUMNS))
        cols = batch.to_pydict()
        return {"samples": wandb.Table(columns=SAMPLE_COLUMNS, data=[list(r) for r in zip(*cols.values())])}

    def line(self, step: int, row: dict, seconds: float) -> str:
        """The plain per-step line: `<name> <unit> 3/30  reward 0.41  accuracy 0.38  len 21.0  7.2 s`."""
        parts = [f"{self.name} {self.unit} {step}/{self.total}"]
        for k in self.headline:
            v = row.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{_SHORT.get(k, k)} {_num(v)}")
        parts.append(f"{seconds:.1f} s")
        return "  ".join(parts)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, soft_wrap=True)  # one line however long (a log reader greps it)

    def close(self) -> None:
        if not self.enabled or self.closed:
            return
        self.closed = True
        if self.progress is not None:
            self.progress.stop()
        if self.wandb is not None:
            self.wandb.finish()


_SHORT = {"reward/mean": "reward", "response_length/mean": "len"}
SAMPLE_ROWS = 64  # rows of a W&B samples table (the rollout's first groups)
SAMPLE_COLUMNS = ["step", "group", "sample", "prompt", "response", "reward/total", "advantage", "truncated"]


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.4g}" if abs(v) < 0.01 and v else f"{v:.3f}"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _run_id(path: Path) -> str:
    """The W&B run id kept in file `path`; a new one, written atomically, when there is none."""
    if path.is_file():
        return path.read_text().strip()
    import secrets

    from r1mega.checkpoint.atomic import write_text

    run_id = secrets.token_hex(6)  # W&B ids: lowercase letters and digits
    write_text(path, run_id)
    return run_id


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
