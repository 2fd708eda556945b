"""What a run shows on the terminal: r1mega's own lines (the plan, one progress line per step, the
summary, errors); everything else (megatron-core's configuration dumps and INFO logs, vLLM's INFO and
WARNING lines, Python warnings, C-level output of the libraries) goes to `<run_dir>/run.log`
(`run.rank<N>.log` on ranks other than 0). `verbose=true` leaves the terminal as it was: all of it.

How (`session`): file descriptors 1 and 2 point at the log, so output of C code and child processes
lands there; `sys.stdout` / `sys.stderr` write to the log *and* the terminal, so Python-level
prints, tracebacks and the progress bar stay visible; logging handlers made before the session (Hydra's
job logging: megatron-core, r1mega) write to the old streams, now the log, and vLLM does not install
its own handler (`VLLM_CONFIGURE_LOGGING=0`), so its records reach the same handlers. Python warnings
go through logging (`py.warnings`): to the log, and to the terminal unless `HARMLESS` lists them.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

# (category, message pattern, why it is harmless). Everything else still reaches the terminal.
HARMLESS = [
    (UserWarning, r"(Transformer Engine and )?Apex (is|are) not installed",
     "megatron-core falls back to its torch implementations (norms, multi_tensor_applier, optimizers); "
     "no CPU build of TE/Apex exists and GPU images bring them"),
    (UserWarning, r"full scope is deprecated",
     "megatron-core's own TransformerConfig default (cuda_graph_scope); r1mega captures no CUDA graphs"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf",
     "megatron-core's DistributedOptimizer.zero_grad reads `.grad` of its fp32 shard views "
     "(distrib_optimizer.py: 'throws grad-access warning'); gradients live in main_grad"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor|reduce_op)` is deprecated",
     "megatron-core calls, and vLLM's triton dispatcher probes, the old names of collectives torch renamed; "
     "same operations"),
    (UserWarning, r"TypedStorage is deprecated", "raised inside torch's checkpoint loading that megatron-core calls"),
    (FutureWarning, r"deprecating ShardedTensor|`load_state_dict` is deprecated",
     "megatron-core's dist_checkpointing torch strategy uses torch's older checkpoint API; files load the same"),
]


_held: list[tuple] = []  # harmless warnings raised before the run's log exists (imports, pre-flight)


def _harmless(category, text: str) -> bool:
    return any(issubclass(category, c) and re.search(pattern, text) for c, pattern, _ in HARMLESS)


def hold_harmless_warnings() -> None:
    """Where r1mega starts: the `HARMLESS` warnings wait for the run's log (`session`) instead of
    reaching the terminal; any other warning shows as usual."""
    show = warnings.showwarning

    def hold(message, category, filename, lineno, file=None, line=None):
        if _harmless(category, str(message)):
            _held.append((message, category, filename, lineno, None, line))
        else:
            show(message, category, filename, lineno, file, line)

    hold.show = show  # what `verbose=true` shows them with
    warnings.showwarning = hold


def _release_held(show) -> None:
    for held in _held:
        show(*held)
    _held.clear()


class _Tee:
    """A text stream writing to the terminal and the log (`isatty`, `fileno`: the terminal's)."""

    def __init__(self, terminal, log):
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        self.log.write(text)
        self.log.flush()
        n = self.terminal.write(text)
        self.terminal.flush()
        return n

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    def __getattr__(self, name):
        return getattr(self.terminal, name)


class _NotHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(f"{c.__name__}: " in text and re.search(pattern, text) for c, pattern, _ in HARMLESS)


def log_path(run_dir: str | Path) -> Path:
    rank = int(os.environ.get("RANK", "0"))
    return Path(run_dir) / ("run.log" if rank == 0 else f"run.rank{rank}.log")


def layout_line(cfg) -> str:
    """`layout: TP1 PP1 EP1 CP1 DP1 (1 process, cpu)` of a composed config."""
    from r1mega.config.validate import world_size_of

    p, world = cfg.parallel, world_size_of(cfg.parallel)
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    return (f"layout: TP{tp} PP{pp} EP{p.expert_model_parallel_size} CP{cp} DP{world // (tp * pp * cp)} "
            f"({world} process{'es' if world > 1 else ''}, {cfg.platform.device})")


@contextmanager
def session(cfg):
    """The terminal of the run of composed config `cfg` (see the module docstring); restores it on
    exit, exceptions included (a traceback or an interrupt message printed after this block reaches
    the terminal). `recipe=none` (validation only) and `verbose=true` leave it as it is."""
    if cfg.recipe.name == "none" or cfg.get("verbose", False):
        _release_held(getattr(warnings.showwarning, "show", warnings.showwarning))
        yield
        return
    path = log_path(cfg.run_dir)
    if os.environ.get("RANK", "0") == "0":
        print(f"{layout_line(cfg)}; all output in {path} (verbose=true shows it here)", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    log = open(path, "a", buffering=1)
    terminal_out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    terminal_err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout, sys.stderr = _Tee(terminal_out, log), _Tee(terminal_err, log)
    previous_vllm = os.environ.get("VLLM_CONFIGURE_LOGGING")
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    warnings_logger = logging.getLogger("py.warnings")
    shown = logging.StreamHandler(terminal_err)
    shown.addFilter(_NotHarmless())
    warnings_logger.addHandler(shown)
    logging.captureWarnings(True)
    _release_held(warnings.showwarning)  # logging's now: into the log
    try:
        yield
    finally:
        logging.captureWarnings(False)
        warnings_logger.removeHandler(shown)
        if previous_vllm is None:
            os.environ.pop("VLLM_CONFIGURE_LOGGING", None)
        else:
            os.environ["VLLM_CONFIGURE_LOGGING"] = previous_vllm
        for stream in (sys.stdout, sys.stderr, *saved_streams):
            stream.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal_out.close()
        terminal_err.close()
        log.close()
