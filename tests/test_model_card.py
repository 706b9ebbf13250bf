"""Model cards (issue 25): every output folder gets a README.md in the Hugging Face model-card format, with the
base model's license, what each stage decided, quality before/after, size, a loader that works (the test runs the
card's own snippet), the version, and the plots; an export's card lists the loaders its export report records.
Also the report fixes: what a quantiser applied, one kept-experts map, discrete bit-width colours."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from conftest import testbed_model_path as model_folder

import moecompress
from moecompress.evals.model_card import render_model_card
from moecompress.evals.report_md import applied_options, write_report_markdown

pytestmark = pytest.mark.usefixtures("one_thread")

LICENSED_CARD = """---
license: apache-2.0
language: [en]
tags: [tiny]
---

# Tiny Licensed MoE

A test model.
"""


def front_matter(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


@pytest.fixture(scope="module")
def run(tmp_path_factory, testbed):
    """q3 with a licensed card, pruned, PMQ-allocated and GPTQ'd (the bit map), evaluated, exported."""
    tmp_path = tmp_path_factory.mktemp("card")
    source = tmp_path / "tiny-licensed"
    shutil.copytree(model_folder("moe-ref-q3"), source)
    (source / "README.md").write_text(LICENSED_CARD)
    recipe = {
        "calibration": {"files": [str(testbed / "calib")], "num_samples": 8, "seq_len": 64},
        "stages": [{"method": "prune_reap", "num_experts_to_keep": 24},
                   {"method": "mcmoe_pmq", "avg_bits": 3.0, "granularity": "layer", "candidates": [2, 3, 4],
                    "group_size": 16},
                   {"method": "gptq", "bits": 4, "group_size": 16},
                   {"method": "evaluate", "tasks": ["tb_arith"], "limit": 4}],
        "export": {"format": "compressed-tensors", "for": "vllm"},  # per-layer widths: a vLLM-only shape (issue 21)
    }
    out = tmp_path / "out"
    report = moecompress.compress(source, recipe, out, progress=False)
    return out, report


def test_the_card_has_the_hub_format_and_the_base_models_license(run):
    out, report = run
    text = (out / "README.md").read_text()
    metadata = front_matter(text)
    assert metadata["license"] == "apache-2.0" and metadata["language"] == ["en"]
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"moecompress", "prune_reap", "mcmoe_pmq", "gptq", "tiny"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # a local folder is not a hub id
    assert "# Tiny Licensed MoE, compressed with moecompress" in text
    assert f"moecompress {moecompress.__version__}" in text
    assert "License: apache-2.0 (from the base model's card" in text


def test_the_card_says_what_each_stage_decided_quality_and_size(run):
    out, report = run
    text = (out / "README.md").read_text()
    before = report["stages"][3]["metrics"]["before"]["tb_arith"]["acc"]
    assert re.search(rf"\| tb_arith \| acc \| {before:.3f} \|", text)
    assert "1. `prune_reap`" in text and "kept experts per layer 24-24 (144 in all)" in text
    assert "2. `mcmoe_pmq`" in text and "3. `gptq`" in text
    assert re.search(r"3\. `gptq` \([0-9.]+ s\): .*; applied [0-9-]+ per expert \(mean [0-9.]+\), from the bit map", text)
    assert "| parameters | 15.13 M |" in text and "safetensors on disk" in text
    for plot in (out / "plots").glob("*.png"):
        assert f"(plots/{plot.name})" in text


def test_the_cards_loader_runs(run):
    out, _ = run
    text = (out / "README.md").read_text()
    snippet = re.search(r"## How to load it\n\n.*?```python\n(.*?)```", text, flags=re.S).group(1)
    assert snippet.startswith("import moecompress")  # a native (packed) folder
    done = subprocess.run([sys.executable, "-c", snippet + "\nprint(type(model).__name__, len(tokenizer))"],
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Qwen3MoeForCausalLM", "8192"]


def test_a_plain_checkpoint_card_uses_plain_transformers(tmp_path, testbed):
    out = tmp_path / "pruned"
    moecompress.compress(model_folder("moe-ref-mx"), [moecompress.PruneFrequencyStage(keep_ratio=0.75)], out,
                         calibration={"files": [str(testbed / "calib")], "num_samples": 4, "seq_len": 32},
                         progress=False)
    text = (out / "README.md").read_text()
    assert "A plain Hugging Face checkpoint" in text and "import moecompress" not in text
    assert "The base model's card gives no license metadata" in text


def test_an_exports_card_lists_what_the_export_recorded(run):
    out, _ = run
    export = out.parent / "out-compressed-tensors"
    export_report = json.loads((export / "export_report.json").read_text())
    text = (export / "README.md").read_text()
    assert front_matter(text)["license"] == "apache-2.0"
    assert "A `compressed-tensors` export of" in text
    for command in export_report["load"].values():
        assert f"  {command}\n" in text
    listed = re.findall(r"^- (\w+):$", text, flags=re.M)
    assert listed == list(export_report["load"])  # no loader the export did not record
    for note in export_report["notes"]:
        assert note in text


def test_the_report_shows_the_bits_applied_not_the_nominal_option(run):
    out, report = run
    gptq = report["stages"][2]
    assert gptq["options"]["bits"] == 4  # the recipe's option, kept as given in report.json
    widths = {bits for layer in gptq["decisions"]["bit_widths"].values() for bits in layer}
    applied = applied_options(gptq)["bits"]
    assert applied.endswith("from the bit map") and str(min(widths)) in applied
    assert "from the bit map" in (out / "report.md").read_text()


def test_one_map_per_decision_in_the_report(run):
    out, report = run
    plots = sorted(path.name for path in (out / "plots").glob("*.png"))
    assert not [name for name in plots if "kept_experts" in name]  # the pruning stage's own plot shows it
    assert "prune_reap_scores.png" in plots
    assert len([name for name in plots if "bit_widths" in name]) == 1  # gptq repeats PMQ's map: drawn once


def test_bit_width_map_has_a_discrete_legend_and_usage_titles_do_not_overlap(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moecompress.evals import plots

    captured = {}
    original_save = plots._save

    def keep(figure, out_file):
        captured.setdefault("figures", []).append(figure)
        figure.canvas.draw()
        captured.setdefault("renderers", []).append(figure.canvas.get_renderer())
        return original_save(figure, out_file)

    plots._save = keep
    try:
        plots.bit_width_map({"0": [2, 3, 4, 0], "1": [4, 4, 2, 2]}, tmp_path / "bits.png")
        usage = {f"domain{index}": [[index + 1, 2, 3, 4]] * 6 for index in range(8)}
        plots.expert_usage_heatmaps(usage, tmp_path / "usage.png")
    finally:
        plots._save = original_save
    bits_figure, usage_figure = captured["figures"]
    colour_bar_axis = bits_figure.axes[-1]
    assert [tick.get_text() for tick in colour_bar_axis.get_yticklabels()] == ["dropped", "2", "3", "4"]
    renderer = captured["renderers"][1]
    panels = [axis for axis in usage_figure.axes if axis.get_title()]
    titles = [axis.title.get_window_extent(renderer) for axis in panels]
    labels = [axis.xaxis.label.get_window_extent(renderer) for axis in panels]
    suptitle = usage_figure._suptitle.get_window_extent(renderer)
    for title in titles:
        assert not any(title.overlaps(label) for label in labels) and not title.overlaps(suptitle)
    plt.close("all")


def test_write_report_markdown_is_unchanged_for_reports_without_stages(tmp_path):
    path = write_report_markdown({"model": {"source": "x"}}, tmp_path)
    assert path.read_text().startswith("# moecompress run report")
    card = render_model_card({"model": {"source": "org/name"}, "stages": []}, tmp_path)
    assert front_matter(card)["base_model"] == "org/name"  # a hub id is the hub's base_model
