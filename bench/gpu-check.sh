#!/usr/bin/env bash
# The GPU check (bench/gpu.py) on a GPU machine, from anywhere: `bash bench/gpu-check.sh [gpu.py options]`.
#
# It needs only the machine's python3 with torch, transformers, tokenizers, peft, accelerate, safetensors, numpy,
# networkx and pyyaml: the project is imported from this checkout (PYTHONPATH), nothing is installed or fetched.
# Results go to $OUT when it is set (the device tool's folder that comes back), else to bench/results:
# gpu.md (the report), gpu.json (the same figures), gpu.log (everything printed) and nvidia-smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out="${OUT:-bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    W2S_PROGRESS=0 TOKENIZERS_PARALLELISM=false
{ nvidia-smi || echo "nvidia-smi failed"; } >"$out/nvidia-smi.txt" 2>&1
"$py" bench/gpu.py --out "$out/gpu.md" "$@" 2>&1 | tee "$out/gpu.log"
exit "${PIPESTATUS[0]}"
