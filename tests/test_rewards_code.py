"""Code reward: correct and partial solutions, and an adversarial corpus that must score 0 with no effect outside.

Each adversarial program first tries its trick and, only if the trick worked, prints the right
answer: a sandbox that lets the trick through shows up as a non-zero reward.
"""
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from r1mega.rewards import sandbox
from r1mega.rewards.code import last_python_block, load_tests, pass_rate
from r1mega.rewards.sandbox import SandboxConfig, bwrap_problem, namespaces_available, resolve_isolation, run_python

SUM_TESTS = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
SOLVE = "a, b = map(int, input().split())\nprint(a + b)\n"
# "auto" (bubblewrap) where it runs; elsewhere these tests still check the remaining layers.
FAST = dict(cpu_s=1, wall_s=2.0, memory_mb=512,
            isolation="auto" if not bwrap_problem() else "namespace" if namespaces_available() else "audit")


def fenced(code: str) -> str:
    return f"<think>easy</think>\nHere it is:\n```python\n{code}```\n"


def score(code: str, tests=SUM_TESTS, mode="fraction", **cfg) -> tuple[float, float]:
    start = time.monotonic()
    value = pass_rate(fenced(code), {"tests": tests}, mode=mode, sandbox=SandboxConfig(**{**FAST, **cfg}))
    return value, time.monotonic() - start


def no_sandbox_processes_left() -> bool:
    time.sleep(0.2)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"_sandbox_boot.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return False
        except OSError:
            pass
    return True


def test_correct_and_partial_solutions():
    assert score(SOLVE)[0] == 1.0
    half = "a, b = map(int, input().split())\nprint(3)\n"
    assert score(half)[0] == 0.5
    assert score(half, mode="all")[0] == 0.0


def test_function_call_style():
    tests = {"fn_name": "pair", "inputs": [[1, 2], [5, 5]], "outputs": [[2, 1], [5, 5]]}
    assert score("def pair(a, b):\n    return (b, a)\n", tests)[0] == 1.0  # tuples judged as JSON lists
    leetcode = "class Solution:\n    def pair(self, a, b):\n        return [b, a] if a < b else [0, 0]\n"
    assert score(leetcode, tests)[0] == 0.5


def test_last_fenced_block_of_the_answer_is_used():
    text = "```python\nprint('draft')\n```\n<think>```python\nprint(1)\n```</think>final\n```py\nprint(2)\n```"
    assert last_python_block(text) == "print(2)\n"
    assert last_python_block("<think>```python\nprint(1)\n```</think> no code") is None


KERNEL_LEVEL = {  # rlimits, namespaces and the wall clock stop these even without the audit hook
    "infinite_loop": "while True:\n    pass\n",
    "sleep_forever": "import time\ntime.sleep(1000)\n" + SOLVE,
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n" + SOLVE,
    "allocate_8gb": "x = bytearray(8 << 30)\n" + SOLVE,
    "huge_output": "import sys\nsys.stdout.write('x' * (100 << 20) + '\\n')\n" + SOLVE,
    "exit_before_tests": "import sys\nsys.exit(0)\n" + SOLVE,
}


@pytest.mark.parametrize("audit_hook", [True, False], ids=["with_hook", "kernel_only"])
@pytest.mark.parametrize("name", list(KERNEL_LEVEL))
def test_kernel_level_adversaries(name, audit_hook):
    value, elapsed = score(KERNEL_LEVEL[name], audit_hook=audit_hook)
    assert value == 0.0
    assert elapsed < 2 * (FAST["wall_s"] + 1)
    assert no_sandbox_processes_left()


@pytest.fixture
def outside_dir():
    """A world-writable directory outside the sandbox: file permissions alone do not protect it."""
    path = Path(tempfile.mkdtemp(prefix="r1mega-outside-"))
    path.chmod(0o777)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_writing_outside_the_work_dir(outside_dir):
    target = outside_dir / "pwned"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n",
        f"import os\nfd = os.open({str(outside_dir)!r}, os.O_RDONLY)\nos.close(os.open('pwned', os.O_WRONLY | os.O_CREAT, dir_fd=fd))\n",
        f"import os\nos.chdir({str(outside_dir)!r})\nopen('pwned', 'w').write('x')\n",
        f"import os, posixpath\nposixpath.realpath = lambda p, **k: os.getcwd() + '/x'\nopen({str(target)!r}, 'w').write('x')\n",
    ]
    for code in attempts:
        assert score(code + SOLVE)[0] == 0.0, code
        assert not target.exists(), code


def test_shell_and_subprocess(outside_dir):
    target = outside_dir / "pwned"
    for code in (f"import os\nassert os.system('touch {target}') == 0\n",
                 f"import subprocess\nsubprocess.run(['touch', {str(target)!r}], check=True)\n",
                 "import subprocess\nassert subprocess.check_output(['echo', 'hi']) == b'hi\\n'\n"):
        assert score(code + SOLVE)[0] == 0.0, code
        assert not target.exists(), code


isolations = ["audit"] + (["namespace"] if namespaces_available() else []) + ([] if bwrap_problem() else ["bwrap"])


@pytest.mark.parametrize("isolation", isolations)
def test_socket_cannot_reach_the_host(isolation):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    port = server.getsockname()[1]
    connected = []

    def accept():
        try:
            connected.append(server.accept())
        except OSError:  # timed out or closed: nobody connected
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
    try:
        assert score(code + SOLVE, isolation=isolation)[0] == 0.0
        thread.join(timeout=1)
        assert not connected
    finally:
        server.close()


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("R1MEGA_TEST_SECRET", "hunter2-secret")
    code = ("import glob, os\n"
            "seen = str(dict(os.environ))\n"
            "for path in glob.glob('/proc/*/environ'):\n"
            "    try:\n        seen += open(path, errors='replace').read()\n"
            "    except OSError:\n        pass\n"
            "assert 'hunter2-secret' in seen\n")
    assert score(code + SOLVE)[0] == 0.0
    assert score("import os\nassert 'R1MEGA_TEST_SECRET' not in os.environ\n" + SOLVE)[0] == 1.0  # the probe works


CALL_TESTS = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}
HARNESS_ATTACKS = {
    "exit_at_import": "import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b\n",
    "exit_in_call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "patch_json": ("import json\nlast = []\njson.dumps = lambda *a, **k: str(last[-1])\n"
                   "def add(a, b):\n    last.append(a + b)\n    return None\n"),
    "patch_stdout": ("import sys\nlast = []\nwrite = sys.stdout.write\n"
                     "sys.stdout.write = lambda s: write(s.replace('null', str(last[-1])))\n"
                     "def add(a, b):\n    last.append(a + b)\n    return None\n"),
    "forge_marker": ("import sys, __main__\nnonce = __main__.spec['nonce'] if hasattr(__main__, 'spec') else ''\n"
                     "for guess in range(10):\n    print(nonce + str(guess))\n"
                     "def add(a, b):\n    return None\n"),
    "always_equal": ("class Eq:\n    def __eq__(self, other):\n        return True\n"
                     "def add(a, b):\n    return Eq()\n"),
}


@pytest.mark.parametrize("name", list(HARNESS_ATTACKS))
def test_harness_cannot_be_patched_or_skipped(name):
    assert score(HARNESS_ATTACKS[name], CALL_TESTS)[0] == 0.0
    assert score("def add(a, b):\n    return a + b\n", CALL_TESTS)[0] == 1.0


def test_auto_isolation_refuses_a_host_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda python="": "bwrap is not installed")
    for level in ("auto", "bwrap"):
        with pytest.raises(RuntimeError, match="bwrap is not installed.*isolation=namespace or audit"):
            run_python(SOLVE, "1 2\n", SandboxConfig(isolation=level))
    assert resolve_isolation(SandboxConfig(isolation="audit")) == "audit"  # an explicit opt-out still runs
    assert run_python(SOLVE, "1 2\n", SandboxConfig(**{**FAST, "isolation": "audit"})).stdout == "3\n"
    with pytest.raises(ValueError, match="sandbox.isolation must be one of"):
        resolve_isolation(SandboxConfig(isolation="chroot"))


@pytest.mark.parametrize("row, message", [
    ({"problem": "p"}, r"row\['tests'\] is missing"),
    ({"tests": {"outputs": ["3\n"]}}, r"row\['tests'\]\['inputs'\] must be a list, got NoneType"),
    ({"tests": {"inputs": "1 2\n", "outputs": ["3\n"]}}, r"row\['tests'\]\['inputs'\] must be a list, got str"),
    ({"tests": {"inputs": ["1 2\n"], "outputs": "3\n"}}, r"row\['tests'\]\['outputs'\] must be a list, got str"),
    ({"tests": {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n"]}}, r"row\['tests'\] has 2 inputs but 1 outputs"),
    ({"tests": {"fn_name": 7, "inputs": [[1, 2]], "outputs": [3]}},
     r"row\['tests'\]\['fn_name'\] must be a string, got int"),
    ({"tests": {"fn_name": "add", "inputs": [3], "outputs": [3]}},
     r"row\['tests'\]\['inputs'\]\[0\] must be a list \(arguments of add\)"),
    ({"tests": {"inputs": [["1 2"]], "outputs": ["3\n"]}}, r"row\['tests'\]\['inputs'\]\[0\] must be a str \(stdin\)"),
    ({"tests": "[1, 2]"}, r"row\['tests'\] must be an object with 'inputs' and 'outputs', got list"),
    ({"tests": "{not json"}, r"row\['tests'\] is not valid JSON"),
])
def test_malformed_tests_are_rejected(row, message):
    with pytest.raises(ValueError, match=message):
        load_tests(row)
    with pytest.raises(ValueError, match=message):  # before any sandbox run
        pass_rate(fenced(SOLVE), row)


def test_tests_may_be_json_text():
    assert load_tests({"tests": json.dumps(SUM_TESTS)}) == SUM_TESTS
