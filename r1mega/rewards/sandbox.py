"""Run untrusted Python in a throwaway subprocess that cannot reach the network, the host or its secrets.

Layers, outermost first: a new session (the wall-clock timeout kills the whole group) and a
parent-death signal; an unprivileged uid when we are root (root ignores RLIMIT_NPROC); then the
isolation level (`SandboxConfig.isolation`):
- bwrap: bubblewrap's user, mount, pid, network, ipc, uts and cgroup namespaces. The file system is
  an empty read-only root holding /usr (and the /bin, /lib... links or dirs), the interpreter's
  executable, standard library and libpython read-only with its site-packages hidden, a fresh /proc
  of the new pid namespace, a minimal read-only /dev, and size-capped private tmpfs /tmp and work
  dir; the run's own files (program, stdin, companions) at /sandbox, read-only.
- namespace: `unshare` user + network + pid namespaces; the host file system is visible (as `nobody`).
- audit: no namespaces; host file system visible, sockets refused by the audit hook.
Then rlimits on CPU time, address space, file size, process count and open files; an empty working
directory and a scrubbed environment; and an audit hook (`_sandbox_boot.py`) that refuses process
creation, writes outside the work dir, other processes' /proc entries, native-code loading, and
sockets when no network namespace is in use. Output is read up to a cap; more counts as a failed run.
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

from r1mega.config.reward import ISOLATIONS, SandboxConfig

_BOOT = Path(__file__).with_name("_sandbox_boot.py")
_NOBODY = 65534
_UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": "/nonexistent"}
_INSIDE = "/sandbox"  # where bwrap shows the run's directory
# Asked of the sandbox interpreter: what it needs to start (and the site-packages to hide).
_LAYOUT = ("import json, os, sys, sysconfig as s; v = s.get_config_var; "
           "lib = os.path.join(v('LIBDIR'), v('INSTSONAME')) if v('Py_ENABLE_SHARED') else ''; "
           "print(json.dumps([os.path.realpath(sys.executable), s.get_path('stdlib'), s.get_path('platstdlib'), "
           "lib, s.get_path('purelib'), s.get_path('platlib')]))")


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


def _failure(cmd: list[str]) -> str:
    """Why `cmd` does not exit 0 as the sandbox user (its last stderr line); "" when it does."""
    try:
        proc = subprocess.run(cmd, preexec_fn=_drop_privileges, env=_ENV, cwd="/", timeout=30,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if proc.returncode == 0:
        return ""
    return (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]


@functools.cache
def interpreter(preferred: str = "") -> str:
    """A Python the sandbox uid can run (root's pyenv under /root is unreadable to `nobody`)."""
    for candidate in (preferred, sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if candidate and not _failure([candidate, "-I", "-S", "-c", "import json"]):
            return candidate
    raise RuntimeError("no Python interpreter usable by the sandbox user; set sandbox.python")


@functools.cache
def namespaces_available() -> bool:
    return shutil.which("unshare") is not None and not _failure(_UNSHARE + ["true"])


@functools.cache
def _layout(python: str) -> tuple[str, list[str], list[str]]:
    """The interpreter's real executable, the paths it reads at start-up, and its site-packages."""
    out = subprocess.run([python, "-I", "-S", "-c", _LAYOUT], env=_ENV, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    exe, stdlib, platstdlib, libpython, purelib, platlib = json.loads(out)
    return exe, [p for p in dict.fromkeys((exe, stdlib, platstdlib, libpython)) if p], [purelib, platlib]


def _bwrap(cfg: SandboxConfig, python: str, argv: list[str], root: Path | None = None) -> list[str]:
    """`python argv` under bubblewrap: read-only system and interpreter, fresh /proc, minimal /dev, private
    /tmp, and `root` (the run's files) read-only at /sandbox with an empty work dir as cwd."""
    exe, needed, site = _layout(python)
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib32", "/lib64", "/libx32"):  # merged-/usr links, or real dirs (the loader)
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for path in needed:  # -try: a shared-library build may still link libpython statically (Debian)
        cmd += ["--ro-bind-try", path, path]
    bound = tuple(p + "/" for p in ("/usr", *needed))
    for path in dict.fromkeys(site):  # installed packages (ours included) stay unseen; -I -S never imports them
        if os.path.isdir(path) and path.startswith(bound):
            cmd += ["--tmpfs", path, "--remount-ro", path]
    size = str(cfg.file_mb << 20)  # tmpfs is memory: cap it like a file
    cmd += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--size", size, "--tmpfs", "/tmp"]
    if root is not None:
        work = f"{_INSIDE}/work"
        cmd += ["--ro-bind", str(root), _INSIDE, "--size", size, "--tmpfs", work, "--chdir", work]
    for key, value in _ENV.items():
        cmd += ["--setenv", key, value]
    return cmd + ["--remount-ro", "/", "--", exe, "-I", "-S", *argv]


@functools.cache
def bwrap_problem(python: str = "") -> str:
    """Why bubblewrap cannot isolate `interpreter(python)` here; "" when it can."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    return _failure(_bwrap(SandboxConfig(), interpreter(python), ["-c", "pass"]))


def resolve_isolation(cfg: SandboxConfig) -> str:
    """The level `cfg` runs under here: "bwrap", "namespace" or "audit".

    Raises ValueError for an unknown level, RuntimeError when the requested one does not run on this
    host; "auto" without bubblewrap is an error, since the program would read the host's files.
    """
    if cfg.isolation not in ISOLATIONS:
        raise ValueError(f"sandbox.isolation must be one of {ISOLATIONS}, got {cfg.isolation!r}")
    if cfg.isolation in ("auto", "bwrap"):
        problem = bwrap_problem(cfg.python)
        if problem:
            raise RuntimeError(f"sandbox.isolation={cfg.isolation} needs bubblewrap, which does not run here "
                               f"({problem}); install it (tools/install.sh) or set sandbox.isolation=namespace "
                               "or audit, which let graded code read the host's world-readable files")
        return "bwrap"
    if cfg.isolation == "namespace" and not namespaces_available():
        raise RuntimeError("sandbox.isolation=namespace: `unshare --user --net --pid` does not run here; "
                           "use bwrap or audit")
    return cfg.isolation


def _command(cfg: SandboxConfig, isolation: str, root: Path) -> list[str]:
    limits = {k: getattr(cfg, k) for k in ("cpu_s", "memory_mb", "file_mb", "nproc", "audit_hook")}
    limits["block_network"] = isolation == "audit"
    python = interpreter(cfg.python)
    if isolation == "bwrap":
        return _bwrap(cfg, python, [f"{_INSIDE}/{_BOOT.name}", json.dumps(limits), f"{_INSIDE}/main.py"], root)
    cmd = [python, "-I", "-S", str(root / _BOOT.name), json.dumps(limits), str(root / "main.py")]
    return _UNSHARE + cmd if isolation == "namespace" else cmd


def run_python(source: str, stdin: str = "", cfg: SandboxConfig | None = None,
               files: dict[str, str] | None = None) -> RunResult:
    """Run `source` as __main__ with `stdin`; `files` are read-only companions next to it (not in cwd).

    Raises RuntimeError (see `resolve_isolation`) when `cfg.isolation` does not run here.
    """
    cfg = cfg or SandboxConfig()
    isolation = resolve_isolation(cfg)
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
        cmd = _command(cfg, isolation, root)
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
