"""The benchmarks' calibration-text scoring (``benchmarks/_common.py``), against lm-eval's rolling perplexity: the
bits per byte that defaults are chosen on must be the quantity the tasks report."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import REPO_ROOT, TESTBED
from conftest import testbed_model_path as model_folder

from moecompress.checkpoint import load_model
from moecompress.evals import run_lm_eval
from moecompress.evals.paired import document_ratios

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import _common  # noqa: E402  (the benchmarks' shared helpers live beside the scripts, not in the package)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibration_scoring_matches_lm_evals_rolling_loglikelihood_per_document(testbed):
    """Two kjv documents: lm-eval's per-document log-likelihood (``log_samples``) equals the helper's direct
    computation on the same text, and the helper's bytes are the document's UTF-8 bytes."""
    model, tokenizer = load_model(str(model_folder("moe-ref-q3")), dtype=torch.float32)
    results = run_lm_eval(model, tokenizer, ["tb_ppl_kjv"], limit=2, log_samples=True, batch_size=2)
    lm_eval_documents = document_ratios(results)["tb_ppl_kjv"]
    lines = (TESTBED / "tasks" / "tb_ppl_kjv.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    texts = [json.loads(line)["text"] for line in lines]
    ours = _common.calibration_bits_per_byte(model, tokenizer, {"kjv": texts})
    for (our_loglik, our_bytes), (their_loglik, their_bytes) in zip(ours["documents"]["kjv"], lm_eval_documents):
        assert our_bytes == their_bytes
        assert our_loglik == pytest.approx(their_loglik, rel=1e-4)
    their_bits_per_byte = -sum(ll for ll, _ in lm_eval_documents) / sum(b for _, b in lm_eval_documents) / math.log(2)
    assert ours["mean"] == pytest.approx(their_bits_per_byte, rel=1e-4)
