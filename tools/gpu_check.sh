#!/usr/bin/env bash
# The borrowed-GPU check: dsv3_proxy (DeepSeek-V3's structure at 39M parameters) trained with the GRPO
# loss through r1mega's MegatronEngine on one GPU (NCCL, bf16, megatron-core's local spec); prints
# tokens/s, peak memory and the planner's prediction (tools/gpu_check.py). Exit status 0 = it ran.
#
#   tools/gpu_check.sh --prepare        # here (network): wheels for the GPU machine into .whl/ (~20 MB)
#   tools/gpu_check.sh [args]           # on the GPU machine: install the missing wheels, run the check
#   tools/gpu_check.sh --dry-run [args] # anywhere: the same code on CPU (gloo, fp32, 2 tiny steps)
#
# The GPU machine has torch (CUDA) and Python 3.12 but maybe not megatron-core and no internet: the
# wheels travel with the repository copy (`.whl/` is git-ignored; pass it to the device with carry).
# Only packages that do not import (or, for megatron-core, are not 0.16.1) are installed, into
# .whl/site (pip --target, --no-index --no-deps), which goes first on PYTHONPATH: the machine's own
# packages, torch above all, are never touched. Extra args go to tools/gpu_check.py (--help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHL="${R1MEGA_WHEEL_DIR:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
# For the GPU machine (CPython 3.12, x86_64 Linux): megatron-core and what r1mega imports on this path
# beyond torch and its own requirements. Versions are the ones tested here (pyproject.toml pins).
MEGATRON=megatron-core==0.16.1
PURE=(hydra-core==1.3.8 omegaconf==2.3.1 einops==0.8.2 packaging==26.2 math-verify==0.9.0 latex2sympy2_extended==1.11.0)
BINARY=(PyYAML==6.0.3 numpy==2.3.5)
SDIST=(antlr4-python3-runtime==4.9.3)  # sdist only on PyPI: built into a py3-none-any wheel here

prepare() {
    mkdir -p "$WHL"
    local target=(--only-binary=:all: --implementation cp --python-version 3.12 --platform manylinux2014_x86_64
                  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
    "$PY" -m pip download --no-deps "${target[@]}" -d "$WHL" "$MEGATRON" "${PURE[@]}" "${BINARY[@]}"
    "$PY" -m pip wheel --no-deps -w "$WHL" "${SDIST[@]}"
    du -sh "$WHL"
    ls -1 "$WHL"
}

install_missing() {
    # wheel file prefix -> module that must import (megatron: at version 0.16.1)
    [ -d "$WHL" ] || { echo "gpu_check: no $WHL (run tools/gpu_check.sh --prepare where there is network)"; return 0; }
    local wheels
    wheels=$("$PY" - "$WHL" <<'EOF'
import importlib, importlib.util, pathlib, sys
MODULES = {"megatron_core": "megatron.core", "hydra_core": "hydra", "omegaconf": "omegaconf", "einops": "einops",
           "packaging": "packaging", "math_verify": "math_verify", "latex2sympy2_extended": "latex2sympy2_extended",
           "pyyaml": "yaml", "numpy": "numpy", "antlr4_python3_runtime": "antlr4"}
def present(mod):
    try:
        m = importlib.import_module(mod)
    except Exception:
        return False
    return mod != "megatron.core" or getattr(m, "__version__", "") == "0.16.1"
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = whl.name.split("-")[0].lower()
    if dist in MODULES and not present(MODULES[dist]):
        print(whl)
EOF
)
    if [ -n "$wheels" ]; then
        echo "gpu_check: installing into $WHL/site: $(echo "$wheels" | xargs -n1 basename | tr '\n' ' ')"
        # shellcheck disable=SC2086
        "$PY" -m pip install --no-index --no-deps --quiet --target "$WHL/site" $wheels
    fi
}

if [ "${1:-}" = --prepare ]; then
    prepare
    exit 0
fi
export PYTHONPATH="$WHL/site${PYTHONPATH:+:$PYTHONPATH}"
install_missing  # also in a dry run: a no-op where everything imports
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
exec "$PY" tools/gpu_check.py "$@"
