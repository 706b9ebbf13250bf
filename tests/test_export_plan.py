"""Deployability checked before the work: ``compress --export`` and a recipe's ``export:`` plan what the stages
will produce on the model's meta skeleton and refuse an impossible export with the export's own one-line message,
before the profiling pass and calibration."""

from __future__ import annotations

import time

import pytest
from conftest import testbed_model_path as model_folder

from moecompress.checkpoint.lazy import build_skeleton
from moecompress.cli import main
from moecompress.errors import MoECompressError, UsageError
from moecompress.export.deployability import NotDeployableError, plan_of_recipe, plan_problems
from moecompress.export.options import ExportOptions, check_exports
from moecompress.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

GPTQ = {"method": "gptq", "bits": 4, "group_size": 32}
PMQ = {"method": "mcmoe_pmq", "avg_bits": 3.0, "candidates": [2, 3, 4], "group_size": 32}
PLANS = {
    # case: (model, stages, export options, first problem's case, a part of its message)
    "group size vs the experts' width": ("moe-ref-mx", [{**GPTQ, "group_size": 128}], {}, "group_size",
                                         "group_size 128 does not divide down_proj input (intermediate) width 288"),
    "q3's 80-wide experts": ("moe-ref-q3", [GPTQ], {}, "group_size", "a `group_size` dividing 80 (e.g. 16)"),
    "asymmetric 3-bit": ("moe-ref-mx", [{**GPTQ, "bits": 3, "symmetric": False}], {"consumer": "vllm"},
                         "asymmetric_low_bit", "quantize with `symmetric: true`"),
    "asymmetric for transformers": ("moe-ref-mx", [{**GPTQ, "symmetric": False}], {}, "transformers_asymmetric",
                                    "--for vllm"),
    "PMQ per expert": ("moe-ref-mx", [PMQ, GPTQ], {}, "mixed_widths", "--widen-to-layer-max"),
    "PMQ per layer": ("moe-ref-mx", [{**PMQ, "granularity": "layer"}, GPTQ], {}, "transformers_mixed",
                      "--widen-to-model-max (every layer at 4 bits"),
    "global pruning budget": ("moe-ref-mx", [{"method": "prune_frequency", "num_experts_to_keep": 6,
                                              "layer_budget": "global"}, GPTQ], {}, "expert_counts",
                              "layer_budget: uniform"),
    "CAMERA-P physical": ("moe-ref-mx", [{"method": "camera_p", "ratio": 0.25, "mode": "physical"}, GPTQ], {},
                          "variable_width", "pad_to: 64"),
    "CAMERA-P pad_to vs group": ("moe-ref-mx", [{"method": "camera_p", "ratio": 0.25, "mode": "physical",
                                                 "pad_to": 48}, GPTQ], {}, "group_size", "multiple of 32"),
}


def _plan(model, stages):
    skeleton, _ = build_skeleton(model_folder(model))
    return skeleton, parse_recipe({"stages": stages}).stages


@pytest.mark.parametrize("case", sorted(PLANS))
def test_the_plan_refuses_what_the_export_would(case):
    model, stages, export, expected, message = PLANS[case]
    skeleton, parsed = _plan(model, stages)
    consumers = ("vllm",) if export.get("consumer") else ("transformers", "vllm")
    problems = plan_problems(plan_of_recipe(skeleton, parsed), consumers=consumers)
    assert problems and problems[0].case == expected, [p.case for p in problems]
    assert message in problems[0].message()


def test_what_the_export_allows_passes_the_plan():
    skeleton, stages = _plan("moe-ref-mx", [{**PMQ, "granularity": "layer"}, GPTQ])
    for options in ({"format": "compressed-tensors", "for": "vllm"},
                    {"format": "compressed-tensors", "widen_to_model_max": True},
                    {"format": "hf", "dequantize": True}):
        check_exports(skeleton, stages, [ExportOptions.model_validate(options)], "out")  # no error
    skeleton, stages = _plan("moe-ref-mx", [PMQ, GPTQ])
    check_exports(skeleton, stages, [ExportOptions(format="compressed-tensors", widen_to_layer_max=True,
                                                   consumer="vllm")], "out")
    with pytest.raises(UsageError, match="add --dequantize"):
        check_exports(skeleton, stages, [ExportOptions(format="hf")], "out")
    skeleton, stages = _plan("moe-ref-mx", [{"method": "prune_frequency", "num_experts_to_keep": 6}])
    with pytest.raises(UsageError, match="quantizes nothing"):
        check_exports(skeleton, stages, [ExportOptions(format="compressed-tensors")], "out")


def _recipe(tmp_path, testbed, stages: str, export: str = "") -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"calibration: {{files: [{testbed / 'calib'}], num_samples: 4, seq_len: 32}}\n"
                    f"stages:\n{stages}\n{export}")
    return str(path)


def test_an_impossible_group_size_fails_before_calibration(tmp_path, testbed, capsys, monkeypatch):
    from moecompress.calibration import runner

    def no_calibration(*args, **kwargs):
        raise AssertionError("the profiling pass started")

    monkeypatch.setattr(runner.LayerwiseRunner, "run", no_calibration)
    recipe = _recipe(tmp_path, testbed, "  - {method: gptq, bits: 4, group_size: 128}")
    started = time.perf_counter()
    code = main(["compress", str(model_folder("moe-ref-mx")), "--recipe", recipe, "--out", str(tmp_path / "out"),
                 "--export", "compressed-tensors"])
    seconds = time.perf_counter() - started
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0, error
    assert "group_size 128 does not divide down_proj input (intermediate) width 288" in error
    assert "e.g. 32" in error and "--tp" not in error  # no tensor-parallel size gives 288 whole groups of 128
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial*"))
    print(f"refused in {seconds:.1f} s")


def test_a_recipe_export_key_is_checked_before_calibration(tmp_path, testbed, monkeypatch):
    from moecompress.calibration import runner
    from moecompress.pipeline import Pipeline

    monkeypatch.setattr(runner.LayerwiseRunner, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    recipe = _recipe(tmp_path, testbed, "  - {method: mcmoe_pmq, avg_bits: 3.0, granularity: layer, group_size: 32}\n"
                                        "  - {method: gptq, bits: 4, group_size: 32}",
                     "export: compressed-tensors\n")
    with pytest.raises(NotDeployableError, match="--widen-to-model-max .*--for vllm") as refused:
        Pipeline.from_recipe(recipe).run(str(model_folder("moe-ref-mx")), tmp_path / "out")
    assert isinstance(refused.value, MoECompressError) and "\n" not in str(refused.value)


def test_a_gguf_export_of_a_config_llama_cpp_would_compute_otherwise_fails_before_calibration(tmp_path, testbed,
                                                                                             monkeypatch):
    import json
    import shutil

    from moecompress.calibration import runner
    from moecompress.errors import UnsupportedModelError

    monkeypatch.setattr(runner.LayerwiseRunner, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    model = tmp_path / "q3-no-renorm"
    shutil.copytree(model_folder("moe-ref-q3"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}))
    skeleton, stages = build_skeleton(model)[0], parse_recipe({"stages": [GPTQ]}).stages
    with pytest.raises(UnsupportedModelError, match="norm_topk_prob false"):
        check_exports(skeleton, stages, [ExportOptions(format="gguf")], "out")
    recipe = _recipe(tmp_path, testbed, "  - {method: gptq, bits: 4, group_size: 32}")
    assert main(["compress", str(model), "--recipe", recipe, "--out", str(tmp_path / "out"), "--export", "gguf"]) == 2
    assert not list(tmp_path.glob("out*"))  # refused before anything was written
    skeleton, stages = _plan("moe-ref-mx", [GPTQ])
    check_exports(skeleton, stages, [ExportOptions(format="gguf")], "out")  # a family llama.cpp runs: no error
