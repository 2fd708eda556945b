"""First code run inside the sandbox: rlimits, then an audit hook the program cannot remove, then the program.

Kernel-level limits (rlimits, bubblewrap's or unshare's namespaces, an unprivileged uid) are the real
boundary; the audit hook is a second layer that also covers hosts without namespaces. It is
written without global lookups so rebinding module attributes cannot switch it off.
Usage: python -I -S _sandbox_boot.py LIMITS_JSON PROGRAM
"""
import json
import os
import resource
import sys

_SPAWN = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "os.symlink",
    "os.link", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
})
_NETWORK = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo"})
_NATIVE_IMPORTS = frozenset({"_ctypes", "_posixsubprocess"})  # ways around the events above
_PATH_EVENTS = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                          "os.truncate", "os.utime", "shutil.rmtree", "shutil.move"})
_FUNC_ATTRS = frozenset({"__code__", "__defaults__", "__kwdefaults__"})


def _install_hook(workdir: str, block_network: bool, block_spawn: bool) -> None:
    own_proc = os.path.realpath("/proc/self") + "/"

    def hook(event, args, _spawn=_SPAWN if block_spawn else frozenset(),
             _network=_NETWORK if block_network else frozenset(), _native=_NATIVE_IMPORTS,
             _paths=_PATH_EVENTS, _attrs=_FUNC_ATTRS, _work=workdir + "/", _proc=own_proc,
             _realpath=os.path.realpath, _isinstance=isinstance, _str=str, _err=PermissionError):
        if event in _spawn or event in _network:
            raise _err("sandbox: " + event)
        if event == "import" and args[0] in _native:
            raise _err("sandbox: import " + args[0])
        if event == "object.__setattr__" and args[1] in _attrs:
            raise _err("sandbox: function attributes are read-only")
        if event == "open" and _isinstance(args[0], (_str, bytes)):
            path = _realpath(args[0]) + "/"
            writes = args[2] & 0o3103  # O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND
            if writes and (args[1] is None or not path.startswith(_work)):
                # os.open-level writes may use dir_fd, which the event does not show: refuse them.
                raise _err("sandbox: writes only inside the work dir")
            if path.startswith(("/proc/", "/sys/")) and not path.startswith(_proc):
                raise _err("sandbox: other processes are not visible")
        elif event in _paths:
            for path in args[:2]:
                if _isinstance(path, (_str, bytes)) and not (_realpath(path) + "/").startswith(_work):
                    raise _err("sandbox: " + event + " outside the work dir")

    sys.addaudithook(hook)


def main() -> None:
    limits = json.loads(sys.argv[1])
    program = sys.argv[2]
    for name, soft, hard in (("RLIMIT_CPU", limits["cpu_s"], limits["cpu_s"]),  # SIGKILL: the program may be a pid-namespace init
                             ("RLIMIT_AS", limits["memory_mb"] << 20, limits["memory_mb"] << 20),
                             ("RLIMIT_FSIZE", limits["file_mb"] << 20, limits["file_mb"] << 20),
                             ("RLIMIT_NPROC", limits["nproc"], limits["nproc"]),
                             ("RLIMIT_NOFILE", 64, 64), ("RLIMIT_CORE", 0, 0)):
        resource.setrlimit(getattr(resource, name), (soft, hard))
    with open(program) as f:
        code = compile(f.read(), os.path.basename(program), "exec")
    if limits["audit_hook"]:
        _install_hook(os.path.realpath(os.getcwd()), limits["block_network"], True)
    sys.argv = [program]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
