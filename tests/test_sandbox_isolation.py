"""Issue #15: graded code sees nothing of the host's file system, so it cannot read the tests it is judged on.

One probe program tries every read below and reports what it got. It runs under bubblewrap with
and without the audit hook (the kernel layer must hold alone), and once under isolation=audit
without the hook: that positive control shows each probe does find the host's files where
nothing hides them, so a probe that silently broke would fail here.
"""
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

import r1mega.rewards.code
from r1mega.rewards import sandbox
from r1mega.rewards.code import pass_rate
from r1mega.rewards.sandbox import SandboxConfig, bwrap_problem, run_python

pytestmark = pytest.mark.skipif(bool(bwrap_problem()), reason=f"bubblewrap unusable here: {bwrap_problem()}")

SECRET = "r1mega-secret-" + secrets.token_hex(8)
SOURCE = Path(r1mega.rewards.code.__file__).resolve()
FAST = dict(cpu_s=1, wall_s=2.0, memory_mb=512)

PROBE = """\
import glob, json, os, pathlib
DATA, SOURCE, SECRET, GRADER_PID = {args}

def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None

def attempt(fn):
    try:
        return fn()
    except OSError:  # the audit hook's PermissionError included
        return None

def link(make, name):
    return attempt(lambda: make(name) or read(name))

def files_under(*tops):
    return sorted(os.path.join(d, f) for top in tops for d, _, fs in os.walk(top) for f in fs)

environ = [read(p) for p in ["/proc/self/environ", "/proc/1/environ", f"/proc/{{os.getppid()}}/environ",
                             f"/proc/{{GRADER_PID}}/environ", *glob.glob("/proc/*/environ")]]
up = "../" * 20 + DATA.lstrip("/")
print(json.dumps({{
    "data_file": read(DATA),
    "r1mega_source": read(SOURCE),
    "etc_passwd": read("/etc/passwd"),
    "etc_shadow": read("/etc/shadow"),
    "home_files": files_under("/root", "/home"),
    "other_runs_stdin": [read(p) for p in glob.glob("/tmp/r1mega-sandbox-*/stdin.txt")],
    "own_environ": read("/proc/self/environ"),
    "secret_seen": SECRET in str(dict(os.environ)) + "".join(e for e in environ if e),
    "os_symlink": link(lambda n: os.symlink(DATA, n), "a"),
    "path_symlink_to": link(lambda n: pathlib.Path(n).symlink_to(DATA), "b"),
    "os_link": link(lambda n: os.link(DATA, n), "c"),
    "dot_dot": read(up),
    "proc_self_root": read("/proc/self/root" + DATA),
    "proc_self_cwd": read("/proc/self/cwd/" + up),
    "proc_1_root": read("/proc/1/root" + DATA),
    "root_listing": sorted(os.listdir("/")),
    "run_dir_listing": sorted(os.listdir("..")),
}}))
"""


@pytest.fixture(scope="module")
def host():
    """World-readable host files a program must not see, a parent env secret, and what each layer showed."""
    data_dir = Path(tempfile.mkdtemp(prefix="r1mega-hostdata-"))
    other_run = Path(tempfile.mkdtemp(prefix="r1mega-sandbox-"))  # a concurrent run's input
    data = data_dir / "tests.json"
    tests = {"inputs": ["1 2\n", "3 4\n"], "outputs": [secrets.token_hex(8), secrets.token_hex(8)]}
    data.write_text(json.dumps(tests))
    (other_run / "stdin.txt").write_text("another-test-input\n")
    for path in (data_dir, other_run):
        path.chmod(0o755)
    for path in (data, other_run / "stdin.txt"):
        path.chmod(0o644)
    probe = PROBE.format(args=repr((str(data), str(SOURCE), SECRET, os.getpid())))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("R1MEGA_SECRET", SECRET)
            seen = {}
            for name, cfg in {"bwrap": dict(isolation="bwrap"),
                              "bwrap_kernel_only": dict(isolation="bwrap", audit_hook=False),
                              "audit_control": dict(isolation="audit", audit_hook=False)}.items():
                result = run_python(probe, "1 2\n", SandboxConfig(**FAST, **cfg))
                assert result.ok, (name, result)
                seen[name] = json.loads(result.stdout)
        yield {"data": data, "tests": tests, "seen": seen}
    finally:
        shutil.rmtree(data_dir)
        shutil.rmtree(other_run)


def test_positive_control_sees_the_host(host):
    """Without bubblewrap the same probes do read the host: they are able to fail."""
    seen = host["seen"]["audit_control"]
    for probe in ("data_file", "dot_dot", "proc_self_root", "proc_self_cwd", "os_symlink", "path_symlink_to"):
        assert host["tests"]["outputs"][0] in (seen[probe] or ""), probe
    assert "root:" in seen["etc_passwd"]
    assert "another-test-input\n" in seen["other_runs_stdin"]
    assert "etc" in seen["root_listing"]


LAYERS = ["bwrap", "bwrap_kernel_only"]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("probe", ["data_file", "r1mega_source", "etc_passwd", "etc_shadow", "os_symlink",
                                   "path_symlink_to", "os_link", "dot_dot", "proc_self_root", "proc_self_cwd",
                                   "proc_1_root"])
def test_host_files_are_not_readable(host, layer, probe):
    assert host["seen"][layer][probe] is None


@pytest.mark.parametrize("layer", LAYERS)
def test_only_the_interpreter_and_the_run_are_visible(host, layer):
    seen = host["seen"][layer]
    needed = sandbox._layout(sandbox.interpreter())[1]  # the interpreter's own files, bound read-only
    assert all(any(f == p or f.startswith(p + "/") for p in needed) for f in seen["home_files"]), seen["home_files"]
    tops = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc", "dev", "tmp", "sandbox"}
    assert set(seen["root_listing"]) <= tops | {Path(p).parts[1] for p in needed}, seen["root_listing"]
    assert seen["other_runs_stdin"] == []
    # The run's directory holds this run's program, its stdin and the boot script: nothing of other tests.
    assert seen["run_dir_listing"] == ["_sandbox_boot.py", "main.py", "stdin.txt", "work"]


@pytest.mark.parametrize("layer", LAYERS)
def test_parent_environment_is_not_visible(host, layer):
    seen = host["seen"][layer]
    assert "PATH=/usr/bin:/bin" in seen["own_environ"]  # the /proc probes do read
    assert not seen["secret_seen"]


def fenced(code: str) -> str:
    return f"<think>easy</think>\n```python\n{code}```\n"


@pytest.mark.parametrize("style", ["stdin", "fn_name"])
def test_solution_reading_the_tests_file_scores_zero(host, style):
    tests, path = host["tests"], str(host["data"])
    if style == "stdin":
        code = (f"import json, sys\ntests = json.load(open({path!r}))\n"
                "print(tests['outputs'][tests['inputs'].index(sys.stdin.read())])\n")
        row = {"tests": tests}
    else:
        code = (f"import json\ndef answer(line):\n    tests = json.load(open({path!r}))\n"
                "    return tests['outputs'][tests['inputs'].index(line)]\n")
        row = {"tests": {"fn_name": "answer", "inputs": [[x] for x in tests["inputs"]], "outputs": tests["outputs"]}}
    control = pass_rate(fenced(code), row, sandbox=SandboxConfig(**FAST, isolation="audit"))
    assert control == 1.0  # the cheat works where the host is visible
    assert pass_rate(fenced(code), row, sandbox=SandboxConfig(**FAST, isolation="auto")) == 0.0
