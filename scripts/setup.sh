#!/usr/bin/env bash
# Creates .venv at the repository root and installs moecompress into it (editable), with test extras.
# torch==2.13.0 is installed first when the venv has no torch: on the project's machines that version is a local
# CPU wheel, while a bare "torch" requirement would download several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[kernels,test]"
