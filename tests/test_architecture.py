"""Import boundaries between r1mega's packages."""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "megatron", "vllm", "math_verify", "transformers")


def test_config_package_imports_only_config():
    """`import r1mega.config` (schemas, ConfigStore, validation rules) loads no training, inference or
    grading library: tools that only compose or plan stay light, and a schema never depends on code."""
    probe = f"import sys, r1mega.config; print(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []


def test_no_module_imports_a_private_name_of_another():
    """A leading underscore means "this module only": another module reaching for it (`from x import
    _y`, `x._y(...)` on an imported r1mega module) couples the two behind the public API's back."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "r1mega"
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        modules = set()  # local names bound to r1mega modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("r1mega"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.module}.{a.name}")
                    modules.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                modules.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("r1mega"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in modules):
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value.id}.{node.attr}")
    assert found == []
