"""Run untrusted Python in a throwaway subprocess that cannot reach the network, the host or its secrets.

Layers, outermost first: a new session (the wall-clock timeout kills the whole group) and a
parent-death signal; an unprivileged uid when we are root (root ignores RLIMIT_NPROC); a
user + network + pid namespace via `unshare` where the host allows it (killing the
namespace's first process kills every process in it); rlimits on CPU time, address space,
file size, process count and open files; an empty temporary working directory and a scrubbed
environment; and an audit hook (`_sandbox_boot.py`) that refuses process creation, writes
outside the work dir, other processes' /proc entries, native-code loading, and sockets when no
network namespace is in use. Output is read up to a cap; more counts as a failed run.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_BOOT = Path(__file__).with_name("_sandbox_boot.py")
_NOBODY = 65534
_UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": "/nonexistent"}


@dataclass
class SandboxConfig:
    cpu_s: int = 2  # per test run
    wall_s: float = 4.0  # per test run, includes interpreter start-up
    memory_mb: int = 1024  # RLIMIT_AS
    file_mb: int = 8  # RLIMIT_FSIZE
    nproc: int = 16  # RLIMIT_NPROC: per namespace with `unshare`, per uid without it
    output_kb: int = 256  # stdout beyond this fails the run
    isolation: str = "auto"  # auto | namespace | audit ("audit" = no namespaces, sockets refused)
    audit_hook: bool = True  # the interpreter-level layer; off only to test the kernel layer alone
    python: str = ""  # interpreter for untrusted code; "" = this one, or a system one nobody can run


@dataclass
class RunResult:
    stdout: str
    returncode: int | None  # None if killed by the parent (timeout or output cap)
    timed_out: bool = False
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.truncated


def _drop_privileges() -> None:
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(_NOBODY)
        os.setuid(_NOBODY)


def _preexec() -> None:
    _drop_privileges()
    # After the uid change (which clears it): die with the grader, so a killed pool worker leaves nothing.
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, preexec_fn=_drop_privileges, env=_ENV, cwd="/", timeout=30,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def interpreter(preferred: str = "") -> str:
    """A Python the sandbox uid can run (root's pyenv under /root is unreadable to `nobody`)."""
    for candidate in (preferred, sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if candidate and _works([candidate, "-I", "-S", "-c", "import json"]):
            return candidate
    raise RuntimeError("no Python interpreter usable by the sandbox user; set sandbox.python")


@functools.cache
def namespaces_available() -> bool:
    return shutil.which("unshare") is not None and _works(_UNSHARE + ["true"])


def _command(cfg: SandboxConfig, program: Path) -> list[str]:
    use_ns = cfg.isolation == "namespace" or (cfg.isolation == "auto" and namespaces_available())
    limits = {k: getattr(cfg, k) for k in ("cpu_s", "memory_mb", "file_mb", "nproc", "audit_hook")}
    limits["block_network"] = not use_ns
    cmd = [interpreter(cfg.python), "-I", "-S", str(program.parent / _BOOT.name), json.dumps(limits), str(program)]
    return _UNSHARE + cmd if use_ns else cmd


def run_python(source: str, stdin: str = "", cfg: SandboxConfig | None = None,
               files: dict[str, str] | None = None) -> RunResult:
    """Run `source` as __main__ with `stdin`; `files` are read-only companions next to it (not in cwd)."""
    cfg = cfg or SandboxConfig()
    root = Path(tempfile.mkdtemp(prefix="r1mega-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        for name, text in {"main.py": source, "stdin.txt": stdin, **(files or {})}.items():
            (root / name).write_text(text)
        shutil.copy(_BOOT, root / _BOOT.name)
        root.chmod(0o755)
        if os.getuid() == 0:
            os.chown(work, _NOBODY, _NOBODY)
        cmd = _command(cfg, root / "main.py")
        with open(root / "stdin.txt", "rb") as stdin_file:
            proc = subprocess.Popen(cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    cwd=work, env=_ENV, start_new_session=True, preexec_fn=_preexec)
        return _collect(proc, cfg)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _collect(proc: subprocess.Popen, cfg: SandboxConfig) -> RunResult:
    """Read stdout up to the cap before the deadline; kill the process group otherwise."""
    cap, deadline = cfg.output_kb << 10, time.monotonic() + cfg.wall_s
    chunks, size, timed_out, truncated = [], 0, False, False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                truncated = True
                break
    if timed_out or truncated:
        _kill(proc)
    try:
        proc.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:  # closed stdout but kept running
        _kill(proc)
        timed_out = True
    proc.stdout.close()
    out = b"".join(chunks)[:cap].decode("utf-8", errors="replace")
    return RunResult(out, None if (timed_out or truncated) else proc.returncode, timed_out, truncated)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
