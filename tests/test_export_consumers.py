"""Exact or refused, in plain transformers: every compressed-tensors export shape on every test-bed model is loaded by
the installed transformers and compressed-tensors in a process that never imports moecompress
(:mod:`export_matrix`). No case may load with other weights than ours."""

from __future__ import annotations

import pytest
from export_matrix import EXACT_BOUND, MODELS, run_matrix, table, versions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model", MODELS)
def test_every_export_shape_is_exact_or_refused(tmp_path, model):
    matrix = run_matrix(tmp_path, (model,))
    shown = f"\n{table(matrix)}"
    for case in matrix:
        where = f"{case.model} / {case.shape} ({versions()}): {case.outcome} {case.detail}{shown}"
        assert case.outcome != "WRONG", where  # loaded, with other weights: never
        if case.expected == "refused":
            assert case.outcome == "refused" and case.refusal in case.detail and "\n" not in case.detail, where
        elif case.expected == "exact":
            # the exporter's "load with" lines name transformers, so transformers must load it exactly
            assert case.outcome == "exact" and case.max_diff <= EXACT_BOUND, where
            assert "transformers" in case.load, where
        else:
            # written for vLLM only: transformers must refuse it (a transformers that decodes each layer with its own
            # scheme would load it exactly, which is fine too; a silent wrong load is not)
            assert case.outcome in ("raises", "exact"), where
            assert "transformers" not in case.load and "vllm" in case.load, where
