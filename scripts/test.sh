#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the default test suite offline on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME="${HF_HOME:-$(mktemp -d)}" HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$(mktemp -d)}"
exec .venv/bin/python -m pytest -q "$@"
