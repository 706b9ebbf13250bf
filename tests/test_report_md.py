"""report.md and its plots, from a report dict shaped like the pipeline's report.json."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest

from moecompress.evals import write_report_markdown


def full_report() -> dict:
    rng = np.random.default_rng(0)
    usage = {domain: rng.integers(0, 500, size=(6, 8)).tolist() for domain in ("pycode", "austen", "kjv")}
    return {
        "recipe": {"stages": [{"method": "prune_experts", "keep": 6}, {"method": "quantize"}, {"method": "evaluate"}]},
        "versions": {"moecompress": "0.1.0", "torch": "2.13.0"},
        "calibration": {"sha256": "ab" * 32, "files": ["pycode.jsonl", "austen.jsonl"], "num_samples": 64,
                        "seq_len": 256, "seed": 0, "expert_usage_by_domain": usage},
        "super_experts": [[1, 3], [4, 0]],
        "model": {"source": "moe-ref-mx", "parameters_before": 13_900_000, "parameters_after": 10_400_000,
                  "bytes_before": 27_800_000, "bytes_after": 6_100_000, "bits_per_parameter": 4.69},
        "stages": [
            {"method": "prune_experts", "options": {"keep": 6}, "seconds": 3.2, "metrics": {}, "plots": [],
             "decisions": {"kept_experts": {str(layer): [0, 1, 2, 3, 5, 7] for layer in range(6)}}},
            {"method": "quantize", "options": {"bits": [2, 3, 4]}, "seconds": 41.0, "metrics": {}, "plots": [],
             "decisions": {"bit_widths": {str(layer): [4, 3, 3, 2, 4, 4] for layer in range(6)}}},
            {"method": "evaluate", "options": {"tasks": ["tb_arith", "tb_ppl_kjv"], "limit": 50}, "seconds": 20.5,
             "decisions": {}, "plots": [],
             "metrics": {"before": {"tb_arith": {"acc": 0.848, "acc_mutual_info": 0.792},
                                    "tb_ppl_kjv": {"bits_per_byte": 1.165}},
                         "after": {"tb_arith": {"acc": 0.80, "acc_mutual_info": 0.75},
                                   "tb_ppl_kjv": {"bits_per_byte": 1.10}},
                         "delta": {"tb_arith": {"acc": -0.048, "acc_mutual_info": -0.042},
                                   "tb_ppl_kjv": {"bits_per_byte": -0.065}}}},
        ],
        "timings": {"load": 1.5, "calibration": 12.25, "export": 0.75},
        "peak_memory_bytes": 3 * 1024**3,
    }


def table_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and line.startswith("|"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_full_report_has_every_section_and_its_numbers(tmp_path):
    report = full_report()
    markdown_file = write_report_markdown(report, tmp_path)
    assert markdown_file == tmp_path / "report.md"
    markdown = markdown_file.read_text()
    for heading in ("## Model", "## Quality", "## Stages", "## Time and memory", "## Calibration",
                    "## Super experts", "## Plots", "## Versions", "## Recipe"):
        assert heading in markdown
    rows = table_rows(markdown)
    # before/after/delta; lower-is-better metrics call a drop an improvement, accuracies the opposite
    assert rows[("tb_arith", "acc")] == ["0.848", "0.800", "-0.048 (worse)"]
    assert rows[("tb_ppl_kjv", "bits_per_byte")] == ["1.165", "1.100", "-0.065 (better)"]
    assert rows[("size", "26.5 MiB")][0] == "5.8 MiB"
    assert "4.56x smaller" in rows[("size", "26.5 MiB")][1]
    assert "| bits per parameter | | 4.690 | |" in markdown  # no before value recorded: the cell stays empty
    report["model"]["bits_per_parameter_before"] = 16.0
    assert "| bits per parameter | 16.000 | 4.690 | |" in write_report_markdown(report, tmp_path).read_text()
    assert "| calibration | 12.25 |" in markdown
    assert "Peak memory: 3.0 GiB" in markdown
    assert "layer 1 expert 3, layer 4 expert 0" in markdown
    assert "kept experts per layer 6-6 (36 in all)" in markdown
    assert "bits per expert: mean 3.33, 2-4" in markdown
    assert "At most 50 documents per task." in markdown


def test_plots_are_real_pngs_linked_from_the_markdown(tmp_path):
    markdown = write_report_markdown(full_report(), tmp_path).read_text()
    linked = [line.split("](")[1].rstrip(")") for line in markdown.splitlines() if line.startswith("![")]
    assert len(linked) == 3  # usage heatmaps, kept experts, bit widths
    for relative_path in linked:
        image = matplotlib.image.imread(tmp_path / relative_path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_kept_experts_map_marks_exactly_the_kept_cells(tmp_path):
    from moecompress.evals.plots import kept_experts_map

    kept = {"0": [0, 2], "1": [1]}
    path = kept_experts_map(kept, tmp_path / "kept.png", num_experts=3)
    image = matplotlib.image.imread(path)[..., :3].mean(axis=-1)
    # the axes area spans the figure's middle; sample the centre of each cell (2 rows x 3 columns)
    dark_rows, dark_columns = np.nonzero(image < 0.2)
    top, bottom, left, right = dark_rows.min(), dark_rows.max(), dark_columns.min(), dark_columns.max()
    assert bottom > top and right > left
    inner = image[top:bottom, left:right]
    height, width = inner.shape
    cell_centres = {(row, column): inner[int((row + 0.5) * height / 2), int((column + 0.5) * width / 3)]
                    for row in range(2) for column in range(3)}
    for (row, column), brightness in cell_centres.items():
        is_kept = column in kept[str(row)]
        assert (brightness < 0.5) == is_kept, (row, column, brightness)


@pytest.mark.parametrize("missing", ["model", "stages", "calibration", "timings", "everything"])
def test_missing_keys_are_skipped(tmp_path, missing):
    report = {} if missing == "everything" else {k: v for k, v in full_report().items() if k != missing}
    markdown = write_report_markdown(report, tmp_path).read_text()
    assert markdown.startswith("# moecompress run report")
    if missing == "calibration":
        assert "expert_usage" not in markdown and "## Calibration" not in markdown
    if missing == "everything":
        assert "## " not in markdown
    json.dumps(report)  # the input is left JSON-serialisable (not mutated into something else)
