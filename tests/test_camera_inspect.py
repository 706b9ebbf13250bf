"""`moecompress inspect --micro --calib`: per-layer CAMERA energy summary equal to energies computed from an
in-memory calibration pass of the same model; the plot is written; a missing --calib is a one-line error."""

from __future__ import annotations

import json

import conftest
import pytest
import torch
from transformers import AutoTokenizer

from moecompress.analysis.camera import STATISTICS, layer_energies, lowest_share_of_energy
from moecompress.calibration import collect_statistics, load_calibration
from moecompress.checkpoint import load_model
from moecompress.cli import main
from moecompress.models import find_moe_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_inspect_micro_summarises_the_energies_of_each_layer(capsys, testbed, tmp_path):
    source = conftest.testbed_model_path("moe-ref-ds")
    calib_file = testbed / "calib" / "kjv.jsonl"
    plot = tmp_path / "energies.png"
    assert main(["inspect", str(source), "--json", "--micro", "--calib", str(calib_file), "--num-samples", "4",
                 "--seq-len", "64", "--alpha", "0.5", "--plot", str(plot)]) == 0
    micro = json.loads(capsys.readouterr().out)["micro_experts"]
    assert plot.stat().st_size > 0 and micro["alpha"] == 0.5

    model, _ = load_model(source, dtype=torch.bfloat16)  # the lazy pass computes in the checkpoint's dtype
    calibration = load_calibration(AutoTokenizer.from_pretrained(source), files=[calib_file], num_samples=4, seq_len=64)
    statistics = collect_statistics(model, calibration, list(STATISTICS))
    rows = {row["layer"]: row for row in micro["layers"]}
    views = find_moe_blocks(model)
    assert sorted(rows) == [view.layer_index for view in views] == [1, 2, 3, 4, 5]
    for view in views:
        energies = layer_energies(view, statistics[view.layer_index], 0.5).flat()
        row = rows[view.layer_index]
        assert row["micro_experts"] == 32 * 64 + 64  # routed channels + the shared expert's
        for share in (0.2, 0.4, 0.6):
            assert row["lowest_share"][f"{int(share * 100)}%"] == pytest.approx(
                lowest_share_of_energy(energies, share), rel=1e-3, abs=1e-6)
        assert row["quantiles"]["max"] == pytest.approx(float(energies.max()), rel=1e-3)


def test_inspect_micro_without_calibration_is_a_one_line_error(capsys):
    assert main(["inspect", str(conftest.testbed_model_path("moe-ref-q3")), "--micro"]) == 2
    assert "--calib" in capsys.readouterr().err
