"""How a compression run asks for an export: a recipe's ``export:`` key and ``compress --export``."""

from __future__ import annotations

import json

import pytest
from conftest import testbed_model_path as model_folder

from moecompress.cli import main
from moecompress.errors import RecipeError
from moecompress.export.options import ExportOptions, parse_export
from moecompress.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_key_forms_and_errors():
    assert parse_export("compressed-tensors") == [ExportOptions(format="compressed-tensors")]
    assert parse_export([{"format": "hf", "dequantize": True}, "compressed-tensors"])[0].dequantize
    recipe = parse_recipe({"stages": [], "export": {"format": "compressed-tensors", "tp": 2}})
    assert recipe.exports == [ExportOptions(format="compressed-tensors", tp=2)]
    assert parse_recipe({"stages": []}).sha256 == recipe.sha256  # exporting does not change the run's identity
    with pytest.raises(RecipeError, match=r"export\[0\]: format"):
        parse_recipe({"stages": [], "export": "onnx"})
    with pytest.raises(RecipeError, match=r"export\[0\]: colour"):
        parse_recipe({"stages": [], "export": {"format": "hf", "colour": "red"}})


def test_compress_runs_the_recipe_export_beside_its_output(tmp_path, testbed, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
calibration: {{files: [{testbed / 'calib'}], num_samples: 4, seq_len: 32, seed: 1}}
stages:
  - {{method: rtn, bits: 4, group_size: 32}}
export: compressed-tensors
""")
    out = tmp_path / "out"
    assert main(["compress", str(model_folder("moe-ref-mx")), "--recipe", str(recipe), "--out", str(out),
                 "--export", "hf", "--dequantize"]) == 0
    printed = capsys.readouterr().out  # the summary, with each export's load commands, is on stdout
    assert "vllm serve" in printed
    ct = tmp_path / "out-compressed-tensors"
    report = json.loads((ct / "export_report.json").read_text())
    assert report["source"] == str(out.resolve()) and report["format"] == "compressed-tensors"
    assert json.loads((tmp_path / "out-hf" / "export_report.json").read_text())["format"] == "hf"
    assert not (out / "export_report.json").exists()  # the native folder is left as the run wrote it
