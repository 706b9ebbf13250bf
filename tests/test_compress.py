"""``moecompress compress`` end to end through the CLI entry point, and its error paths (exit code 2, one line)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_compress_prunes_and_writes_model_and_report(tmp_path, testbed, capsys):
    recipe = _recipe(tmp_path, f"""
calibration: {{files: [{testbed / 'calib'}], num_samples: 8, seq_len: 32, seed: 1}}
stages:
  - {{method: prune_frequency, keep_ratio: 0.75}}
""")
    out = tmp_path / "out"
    code = main(["compress", str(model_folder("moe-ref-ds")), "--recipe", str(recipe), "--out", str(out), "--dtype", "float32"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["stages"] == [{"method": "prune_frequency", "keep_ratio": 0.75}]
    assert len(report["calibration"]["sha256"]) == 64 and report["calibration"]["num_samples"] == 8
    kept = report["stages"][0]["decisions"]["kept_experts"]
    assert sorted(kept) == ["1", "2", "3", "4", "5"]  # DeepSeek layer 0 is dense
    assert all(len(ids) == 24 for ids in kept.values())
    assert report["peak_memory_bytes"] > 0 and report["timings"]["total"] > 0
    assert report["model"]["bits_per_parameter"] == pytest.approx(32.0)
    assert report["model"]["bits_per_parameter_before"] == report["model"]["bits_per_parameter"]  # pruning keeps precision

    from transformers import AutoModelForCausalLM, AutoTokenizer

    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert pruned.model.layers[1].mlp.gate.weight.shape[0] == 24
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(pruned(ids).logits).all()


def test_bad_inputs_exit_with_one_clear_line(tmp_path, capsys):
    model = str(model_folder("moe-ref-mx"))
    bad = _recipe(tmp_path, "stages: [{method: prune_frequency, num_experts_to_keep: 4, colour: red}]\n")
    assert main(["compress", model, "--recipe", str(bad), "--out", str(tmp_path / "o1")]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    recipe = _recipe(tmp_path, f"calibration: {{files: [{empty}], num_samples: 2, seq_len: 16}}\nstages: []\n")
    assert main(["compress", model, "--recipe", str(recipe), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "empty.jsonl has no non-empty `text` rows" in err and "Traceback" not in err

    profile = _recipe(tmp_path, "stages: []\n")
    assert main(["compress", "no-such-org/no-such-model", "--recipe", str(profile), "--out", str(tmp_path / "o3")]) == 2
    assert "could not be fetched from the hub" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not list(tmp_path.glob("o*.partial-*"))  # a rejected run leaves nothing behind


def test_compress_creates_the_folders_above_out(tmp_path, testbed):
    """`--out runs/demo` on a fresh clone: `runs/` does not exist yet, and the run creates it (README command 1)."""
    recipe = _recipe(tmp_path, f"calibration: {{files: [{testbed / 'calib' / 'pycode.jsonl'}], num_samples: 2, "
                               "seq_len: 16}\nstages: []\n")
    out = tmp_path / "runs" / "nested" / "demo"
    assert main(["compress", str(model_folder("moe-ref-mx")), "--recipe", str(recipe), "--out", str(out)]) == 0
    assert (out / "report.json").is_file() and not list(out.parent.glob("demo.partial*"))
