#!/usr/bin/env bash
# Create the project's virtual environment and install w2s-agents (editable) with its test dependencies.
#
# torch is installed first, so that nothing later pulls a different build:
#   - a torch the base Python already has is kept: the environment then sees the base site-packages;
#   - on a machine with an NVIDIA GPU, the default PyPI build (CUDA);
#   - otherwise a CPU build: torch==$W2S_TORCH_VERSION+cpu from the configured indexes/find-links (a local
#     wheel), else the newest build of PyTorch's CPU index. A CPU-only machine never gets CUDA wheels.
#
# Environment: PYTHON (default python3), W2S_VENV (default .venv), W2S_TORCH_VERSION (default 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${W2S_VENV:-.venv}
TORCH_VERSION=${W2S_TORCH_VERSION:-2.13.0}
say() { echo "[setup] $*" >&2; }

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    say "keeping the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)')): $VENV sees its packages"
    "$PYTHON" -m venv --system-site-packages "$VENV"
    # A venv made from inside another venv sees the base interpreter's packages, not that venv's:
    # link the outer environment's site-packages explicitly so its torch is the one found.
    outer=$("$PYTHON" -c 'import sys, sysconfig; print(sysconfig.get_paths()["purelib"] if sys.prefix != sys.base_prefix else "")')
    if [ -n "$outer" ]; then
      inner=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      echo "$outer" > "$inner/_w2s_outer_env.pth"
    fi
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade "pip>=23" >/dev/null
cuda_packages() { "$PY" -m pip list 2>/dev/null | grep -iE '^nvidia-' || true; }
cuda_before=$(cuda_packages)

if "$PY" -c "import torch" >/dev/null 2>&1; then
  say "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: keeping it"
elif have_gpu; then
  say "NVIDIA GPU found: installing the CUDA build of torch from PyPI"
  "$PY" -m pip install torch
else
  say "no GPU: installing a CPU build of torch"
  if ! "$PY" -m pip install "torch==${TORCH_VERSION}+cpu"; then
    say "torch==${TORCH_VERSION}+cpu not found locally or on the indexes; trying PyTorch's CPU index"
    "$PY" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
torch_before=$("$PY" -c 'import torch; print(torch.__version__)')

"$PY" -m pip install -e ".[dev]"

torch_after=$("$PY" -c 'import torch; print(torch.__version__)')
if [ "$torch_before" != "$torch_after" ]; then
  say "ERROR: installing the project replaced torch $torch_before with $torch_after"
  exit 1
fi
cuda_after=$(cuda_packages)
if ! have_gpu && [ "$cuda_after" != "$cuda_before" ]; then
  say "ERROR: installing the project added CUDA packages on a machine without a GPU:"
  echo "$cuda_after" >&2
  exit 1
fi
# the browser tests of the tree viewer need Debian's chromium: installed here when missing and possible
bash scripts/setup-chromium.sh || say "WARNING: Chromium is missing; the browser tests will fail until it is installed"
touch "$VENV/.w2s-installed"
say "ready: $VENV (torch $torch_after); activate with: source $VENV/bin/activate"
