"""Ctrl-C / SIGTERM: stop at the next safe point with a checkpoint, on every rank at the same step.

`install()` (the CLI calls it first) replaces Python's SIGINT/SIGTERM behaviour: the first signal only
sets a flag and says so; the loops ask `should_stop()` at their safe points (end of a rollout or an
optimizer step, stage boundaries), a MAX all-reduce of the flag over every rank, so all ranks stop
at the same step even when the signal reached only some of them (no rank is left waiting in a
collective). A loop that stops saves its checkpoint, records it (`checkpointed`) and raises
`Interrupted`; the CLI prints one line naming the checkpoint and exits 128 + signal (130 for SIGINT,
143 for SIGTERM), without a traceback.

A second Ctrl-C (more than `REPEAT_S` after the first: torchrun forwards the terminal's Ctrl-C to
its workers, who then get it twice) stops at once: one line naming the last checkpoint, exit
128 + signal, no cleanup. A repeated SIGTERM is the same request: under Slurm each rank gets one
from slurmd and one from torchrun, possibly seconds apart on a loaded node; the managers send
SIGKILL themselves when their grace period (KillWait, torchrun's shutdown timeout) ends.

Helper processes must not die of the terminal's Ctrl-C (or a process-group SIGTERM) while the main
process finishes its step: the reward workers' fork server is started with both signals ignored,
which its workers inherit (their parent stops them).
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 2.0  # a second delivery within this window is the same interruption (terminal + torchrun)

_signum: int | None = None
_first_at = 0.0
_installed = False
_last: tuple[str, str] | None = None  # (what, where) of the newest checkpoint of this run


class Interrupted(BaseException):
    """Raised at a safe point after a stop signal. A BaseException, so `except Exception` (Hydra's
    error reporting included) lets it through to the CLI."""

    def __init__(self, signum: int, note: str | None = None):
        super().__init__(signum, note)
        self.signum, self.note = int(signum), note

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        return f"r1mega: interrupted ({_name(self.signum)}); {self.note or saved_line()}"


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def saved_line() -> str:
    if _last is None:
        return "no checkpoint yet; run the same command to start again"
    what, where = _last
    return f"checkpoint at {what} in {where}; run the same command to resume"


def checkpointed(what: str, where: str | Path) -> None:
    """Record the newest checkpoint (`what`: e.g. "rollout 3"), for the interrupted message."""
    global _last
    _last = (what, str(where))


def _rank0() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # noqa: BLE001 - a signal handler must not fail
        pass
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _say(text: str) -> None:
    """From a signal handler: os.write, as print could re-enter a buffered write it interrupted."""
    if _rank0():
        try:
            os.write(2, (text + "\n").encode())
        except OSError:
            pass


def _handler(signum, frame) -> None:
    global _signum, _first_at
    now = time.monotonic()
    if _signum is None:
        _signum, _first_at = signum, now
        again = "Ctrl-C again to stop at once; " if signum == signal.SIGINT else ""
        _say(f"\nr1mega: {_name(signum)} received: stopping at the end of the current step, with a checkpoint "
             f"({again}the last checkpoint is kept)")
        return
    if signum == signal.SIGTERM or now - _first_at < REPEAT_S:
        return  # the same interruption, delivered twice
    _say(f"\nr1mega: stopped at once ({_name(signum)} again); {saved_line()}")
    os._exit(128 + signum)


def install() -> None:
    """Handle SIGINT/SIGTERM as described above (main thread only; idempotent)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _handler)
    _installed = True


def requested() -> int | None:
    """The signal this process received, if any (local; `should_stop` is what loops use)."""
    return _signum


def should_stop() -> int:
    """0, or the stop signal if any rank received one: a collective over every rank (call it at the
    same points on all ranks)."""
    local = _signum or 0
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([local], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def stop_point(note: str | None = None) -> None:
    """A safe point with nothing to save: raise `Interrupted` if any rank received a stop signal."""
    signum = should_stop()
    if signum:
        raise Interrupted(signum, note)


def shield_helpers() -> None:
    """Start the reward workers' fork server (same preload as `r1mega.rewards.pool`) with SIGINT and
    SIGTERM ignored: it and the workers it forks inherit that, so a Ctrl-C to the terminal's process
    group does not kill them mid-rollout (with a traceback each); the pool stops them itself."""
    if threading.current_thread() is not threading.main_thread():
        return
    import multiprocessing as mp
    from multiprocessing import forkserver

    from r1mega.rewards.pool import PRELOAD

    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    # multiprocessing's own exit hook stops leftover daemon workers with SIGTERM, which they now
    # ignore, then joins them: kill them first (atexit runs this before it, registered later).
    atexit.register(_kill_daemon_children)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        forkserver.ensure_running()
    finally:
        for s, h in old.items():
            signal.signal(s, h)  # (a signal in these few milliseconds would be lost)


def _kill_daemon_children() -> None:
    import multiprocessing as mp

    for p in mp.active_children():
        if p.daemon:
            p.kill()
            p.join(5)


def exit_for(exc: Interrupted) -> None:
    """The CLI's end of an interrupted run: the message (rank 0) and the exit status."""
    if _rank0():
        print(exc.message(), file=sys.stderr, flush=True)
    sys.exit(exc.exit_code)
