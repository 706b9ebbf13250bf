#!/usr/bin/env bash
# The GPU check: kernel tests on the GPU, the kernel benchmark (fp16, torch int4), a streamed GPTQ compress of each
# test-bed model with --device cuda against the CPU result, decode speed packed vs bf16; one JSON
# (<--out>/gpu_check.json). Under 8 minutes on one H100. See scripts/gpu_check.py for the steps.
#
#   bash scripts/gpu_check.sh [--out DIR] [--testbed DIR]    # on a machine with a CUDA GPU
#   bash scripts/gpu_check.sh --dry --out /tmp/check          # CPU: every step up to its first CUDA call
#
# Python: $PYTHON, else the checkout's .venv, else python3 (a lent GPU machine has torch with CUDA and triton).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 470 "$PYTHON" scripts/gpu_check.py "$@"
