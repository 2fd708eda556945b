"""Code accuracy: the last fenced Python block of the final answer, run against a problem's tests.

Tests follow the APPS/TACO `input_output` layout: {"inputs": [...], "outputs": [...]} with an
optional "fn_name". Without fn_name each input is a program's stdin and the output its expected
stdout; with fn_name each input is an argument list and the output the return value.
Every test runs in its own sandbox process, and judging happens here, in the parent: the child
only ever sees inputs, so exiting early or patching the harness inside the child cannot pass.
"""
from __future__ import annotations

import json
import re
import secrets

from r1mega.rewards.math import final_region
from r1mega.rewards.sandbox import SandboxConfig, run_python

MAX_CODE_CHARS = 64_000
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# Runs in the sandbox: defines the solution, calls it on one argument list, prints the result
# after a per-test nonce. Exactly one marked line must come back; its JSON is judged outside.
_CALL_HARNESS = """\
import json, sys
dumps, write = json.dumps, sys.stdout.write  # bound before the solution can patch them
spec = json.loads(sys.stdin.read())
namespace = {"__name__": "solution"}
with open(spec["solution"]) as f:
    exec(compile(f.read(), "solution.py", "exec"), namespace)
fn = namespace.get(spec["fn_name"])
if fn is None and "Solution" in namespace:  # LeetCode style
    fn = getattr(namespace["Solution"](), spec["fn_name"])
result = fn(*spec["args"])
write("\\n" + spec["nonce"] + dumps(result) + "\\n")
"""


def last_python_block(completion: str, think_open: bool = False) -> str | None:
    """The last fenced Python block of the final region (`rewards.math.final_region`), or None."""
    blocks = _FENCE.findall(final_region(completion, think_open))
    return blocks[-1] if blocks and len(blocks[-1]) <= MAX_CODE_CHARS else None


def _same_stdout(got: str, expected: str) -> bool:
    lines = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return lines(got) == lines(expected)


def _run_stdin_test(code: str, stdin: str, expected: str, cfg: SandboxConfig) -> bool:
    result = run_python(code, stdin, cfg)
    return result.ok and _same_stdout(result.stdout, str(expected))


def _run_call_test(code: str, fn_name: str, args: list, expected, cfg: SandboxConfig) -> bool:
    nonce = secrets.token_hex(16)
    spec = {"solution": "../solution.py", "fn_name": fn_name, "args": args, "nonce": nonce}
    result = run_python(_CALL_HARNESS, json.dumps(spec), cfg, files={"solution.py": code})
    marked = [line[len(nonce):] for line in result.stdout.splitlines() if line.startswith(nonce)]
    if not result.ok or len(marked) != 1:
        return False
    try:
        got = json.loads(marked[0])
    except ValueError:
        return False
    return got == json.loads(json.dumps(expected))  # tuples and lists compare as JSON does


def load_tests(row: dict, tests_key: str = "tests") -> dict:
    """The row's tests (a dict or its JSON text) as {"inputs": [...], "outputs": [...], "fn_name"?: str}.

    Raises ValueError, one sentence naming the row field, when they are missing or malformed.
    """
    field = f"row[{tests_key!r}]"
    if tests_key not in row:
        raise ValueError(f"{field} is missing: code rows need tests")
    tests = row[tests_key]
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError as e:
            raise ValueError(f"{field} is not valid JSON ({e})") from None
    if not isinstance(tests, dict):
        raise ValueError(f"{field} must be an object with 'inputs' and 'outputs', got {type(tests).__name__}")
    for key in ("inputs", "outputs"):
        if not isinstance(tests.get(key), list):
            raise ValueError(f"{field}[{key!r}] must be a list, got {type(tests.get(key)).__name__}")
    if len(tests["inputs"]) != len(tests["outputs"]):
        raise ValueError(f"{field} has {len(tests['inputs'])} inputs but {len(tests['outputs'])} outputs")
    fn_name = tests.get("fn_name")
    if fn_name is not None and not isinstance(fn_name, str):
        raise ValueError(f"{field}['fn_name'] must be a string, got {type(fn_name).__name__}")
    kind = list if fn_name else str  # an argument list per call, or a program's stdin
    for i, inp in enumerate(tests["inputs"]):
        if not isinstance(inp, kind):
            raise ValueError(f"{field}['inputs'][{i}] must be a {kind.__name__} "
                             f"({'arguments of ' + fn_name if fn_name else 'stdin'}), got {type(inp).__name__}")
    return tests


def run_tests(code: str, tests: dict, cfg: SandboxConfig) -> list[bool]:
    fn_name = tests.get("fn_name")
    cases = zip(tests["inputs"], tests["outputs"], strict=True)
    if fn_name:
        return [_run_call_test(code, fn_name, args, out, cfg) for args, out in cases]
    return [_run_stdin_test(code, inp, out, cfg) for inp, out in cases]


def pass_rate(completion: str, row: dict, mode: str = "fraction", tests_key: str = "tests",
              sandbox: SandboxConfig | None = None, think_open: bool = False) -> float:
    """Fraction of the row's tests passed (`fraction`), or 1.0 only if all pass (`all`); the code is
    the last Python block after the chain of thought (`think_open`: the prompt opened it)."""
    if mode not in ("fraction", "all"):
        raise ValueError(f"code reward mode must be 'fraction' or 'all', got {mode!r}")
    tests = load_tests(row, tests_key)
    code = last_python_block(completion, think_open)
    if code is None or not tests["inputs"]:
        return 0.0
    passed = run_tests(code, tests, sandbox or SandboxConfig())
    return sum(passed) / len(passed) if mode == "fraction" else float(all(passed))
