"""Test set-up shared by every test module.

* Offline: no hub is reachable; lm-eval tasks and models come from local files.
* Triton kernels run in interpreter mode when there is no GPU: TRITON_INTERPRET must be set before any module
  defining ``@triton.jit`` kernels is imported, so it is set here, at conftest import time.
* The test bed (three small trained MoE models, calibration text, tasks) lives in ``../shared/testbed`` beside the
  checkout (CI has it there); ``MOECOMPRESS_TESTBED`` overrides the location.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="moecompress-hf-"))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTBED = Path(os.environ.get("MOECOMPRESS_TESTBED", REPO_ROOT.parent / "shared" / "testbed"))
TESTBED_MODELS = ("moe-ref-q3", "moe-ref-mx", "moe-ref-ds")


@pytest.fixture(scope="session")
def testbed() -> Path:
    if not (TESTBED / "models").is_dir():
        pytest.fail(f"test bed not found at {TESTBED}; set MOECOMPRESS_TESTBED to the shared/testbed folder")
    return TESTBED


def testbed_model_path(name: str) -> Path:
    return TESTBED / "models" / name


@pytest.fixture()
def one_thread():
    """Run a test on one CPU thread: transformers' eager experts loop (index_add_) is very slow with several."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_family_params(exclude=()):
    """Every tiny family as pytest params; beyond one per layout/routing rule they run with ``-m slow``."""
    from moecompress.models.tiny import CORE_TINY_FAMILIES, tiny_families

    return [
        pytest.param(model_type, marks=() if model_type in CORE_TINY_FAMILIES else pytest.mark.slow)
        for model_type in tiny_families()
        if model_type not in exclude
    ]


@pytest.fixture(scope="session")
def native_mx(tmp_path_factory, testbed) -> Path:
    """moe-ref-mx quantised (RTN 4-bit, group 32) and saved in the native format, once per session; tests that damage
    it copy it first."""
    from export_helpers import native_folder  # imports torch and moecompress: only when a test asks for it

    return native_folder(tmp_path_factory.mktemp("native-mx"), "moe-ref-mx")
