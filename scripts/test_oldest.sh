#!/usr/bin/env bash
# Runs the model-layer tests (every family's equivalence, edits, save/reload, `inspect`) against the OLDEST
# transformers that pyproject.toml admits, in a separate virtual environment, so the lower bound of the range is a
# tested claim. Not part of .ci/run: it builds a second environment (about 2-3 minutes of installs) and the
# model-layer suite with the slow per-family tests takes several minutes on 2 cores.
#
#   bash scripts/test_oldest.sh                 # venv in /tmp/moecompress-oldest-transformers (reused if present)
#   VENV=/path/to/venv bash scripts/test_oldest.sh -x      # extra arguments go to pytest
#
# Families newer than that transformers (their config classes do not exist there) are listed before the tests run;
# their tests are not collected, since such checkpoints cannot be loaded by that transformers either.
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=$(sed -n 's/^ *"transformers>=\([0-9][0-9.]*\),.*/\1/p' pyproject.toml)
if [ -z "$OLDEST" ]; then
    echo "could not read the transformers lower bound from pyproject.toml" >&2
    exit 2
fi
VENV=${VENV:-/tmp/moecompress-oldest-transformers}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# torch==2.13.0 first, as scripts/setup.sh does (a local CPU wheel on the project's machines).
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/pip" install -q "torch==2.13.0"
fi
"$VENV/bin/pip" install -q -e ".[test]" "transformers==$OLDEST"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME="${HF_HOME:-$(mktemp -d)}" HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$(mktemp -d)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/python" - <<'PY'
import transformers
from moecompress.models.tiny import tiny_families, tiny_families_unavailable
print(f"transformers {transformers.__version__}: {len(tiny_families())} tiny families tested; "
      f"not in this transformers: {', '.join(tiny_families_unavailable()) or 'none'}")
PY
exec "$VENV/bin/python" -m pytest -q -m "slow or not slow" \
    tests/test_models_*.py tests/test_edits_*.py tests/test_inspect.py "$@"
