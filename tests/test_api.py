"""The Python API (issue 25): ``import moecompress`` is light and exposes the main names; ``compress`` takes a path
or a loaded model; stage classes take keyword options and document every option; one naming scheme with the old
names kept; threads, device and dtype are options of ``Pipeline.run``; the native format still loads after a bare
``import moecompress``; the README's example runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from conftest import testbed_model_path as model_folder

import moecompress
from moecompress.pipeline import Pipeline
from moecompress.recipe import known_methods, parse_recipe
from moecompress.stages import STAGE_REGISTRY, StageOptionsError, stage_class_name

pytestmark = pytest.mark.usefixtures("one_thread")


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)}, **kwargs)


# ----- the facade -----------------------------------------------------------------------------------------------
def test_import_moecompress_is_light_and_every_name_resolves():
    done = _python("import sys, time; started = time.perf_counter(); import moecompress; "
                   "print(time.perf_counter() - started); "
                   "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'rich') if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "[]"  # nothing heavy imported by `import moecompress`
    for name in moecompress.__all__:
        assert getattr(moecompress, name) is not None, name
    assert moecompress.GPTQStage is STAGE_REGISTRY["gptq"]
    assert callable(moecompress.compress) and callable(moecompress.load) and callable(moecompress.export)


def package_stages() -> dict:
    """The registered stages of the package (tests register stages of their own)."""
    known_methods()
    return {method: stage_class for method, stage_class in STAGE_REGISTRY.items()
            if stage_class.__module__.startswith("moecompress.")}


def test_one_naming_scheme_with_the_old_names_kept():
    assert len(package_stages()) >= 16
    for method, stage_class in package_stages().items():
        assert stage_class.__name__ == stage_class_name(method), method
        assert getattr(moecompress, stage_class.__name__) is stage_class
    from moecompress.evals.stage import EvaluateStage
    from moecompress.pruning.camera_p import CameraPPruning, CameraPruning
    from moecompress.pruning.frequency import FrequencyPruning
    from moecompress.pruning.hcsmoe import HcSmoeMerging
    from moecompress.pruning.reap import ReapPruning
    from moecompress.quantization.camera_q import CameraQuantization
    from moecompress.quantization.odp import ODPStage
    from moecompress.quantization.pmq import PMQStage
    from moecompress.quantization.stages import GPTQStage, RTNStage
    old = {FrequencyPruning: "prune_frequency", ReapPruning: "prune_reap", HcSmoeMerging: "merge_hcsmoe",
           CameraPruning: "prune_camera", CameraPPruning: "camera_p", CameraQuantization: "camera_q",
           ODPStage: "mcmoe_odp", PMQStage: "mcmoe_pmq", GPTQStage: "gptq", RTNStage: "rtn",
           EvaluateStage: "evaluate"}
    for alias, method in old.items():
        assert alias is STAGE_REGISTRY[method]


def test_stage_options_as_keywords_or_a_dict_and_one_line_errors():
    keywords = moecompress.GPTQStage(bits=3, group_size=32, agq=True)
    as_dict = moecompress.GPTQStage({"bits": 3, "group_size": 32, "agq": True})
    assert keywords.options == as_dict.options and repr(keywords) == "GPTQStage(bits=3, group_size=32, agq=True)"
    assert moecompress.GPTQStage({"bits": 3}, group_size=64).options.group_size == 64  # keywords add to a dict
    assert moecompress.McmoePmqStage(avg_bits=2.5).options.avg_bits == 2.5  # a stage with its own __init__
    with pytest.raises(StageOptionsError, match=r"^GPTQStage: bits: bits=5 cannot be packed.*unknown key 'colour'"):
        moecompress.GPTQStage(bits=5, colour="red")
    assert issubclass(StageOptionsError, moecompress.RecipeError)
    # a recipe's errors still name the recipe's place
    with pytest.raises(moecompress.RecipeError, match=r"^stages\[0\] \(gptq\): bits"):
        parse_recipe({"stages": [{"method": "gptq", "bits": 5}]})


def test_help_lists_every_option_with_its_type_default_and_description():
    for method, stage_class in package_stages().items():
        doc = stage_class.__doc__
        assert f"``method: {method}``" in doc, method
        for name, field in stage_class.Options.model_fields.items():
            line = next((line for line in doc.splitlines() if line.strip().startswith(f"{name}:")), None)
            assert line is not None, f"{method}: option {name} missing from the docstring"
            assert "default" in line or "required" in line, line
            assert field.description and field.description.split()[0] in doc, f"{method}.{name} has no description"
    gptq_doc = moecompress.GPTQStage.__doc__
    assert "    damp: float (>= 0, < 1), default 0.01\n        damping, a fraction of the mean Hessian diagonal" in gptq_doc
    assert "scale_search: 'minmax' | 'mse', default 'mse'" in gptq_doc
    import inspect

    signature = inspect.signature(moecompress.GPTQStage)
    assert signature.parameters["bits"].default == 4 and signature.parameters["bits"].kind is inspect.Parameter.KEYWORD_ONLY


# ----- Pipeline.run options --------------------------------------------------------------------------------------
def test_threads_device_and_dtype_are_run_options(tmp_path, testbed):
    before = torch.get_num_threads()
    seen = {}
    pipeline = Pipeline([moecompress.PruneFrequencyStage(keep_ratio=0.75)],
                        calibration={"files": [str(testbed / "calib")], "num_samples": 4, "seq_len": 32})
    original = moecompress.PruneFrequencyStage.run

    def spy(self, context):
        seen["threads"], seen["dtype"] = torch.get_num_threads(), next(context.model.parameters()).dtype
        seen["device"] = context.device
        return original(self, context)

    moecompress.PruneFrequencyStage.run = spy
    try:
        report = pipeline.run(model_folder("moe-ref-q3"), tmp_path / "out", threads=2, dtype="float32",
                              device="cpu", progress=False, execution="in_memory")
    finally:
        moecompress.PruneFrequencyStage.run = original
    assert seen == {"threads": 2, "dtype": torch.float32, "device": "cpu"}
    assert torch.get_num_threads() == before  # put back after the run
    assert report["model"]["bits_per_parameter"] == pytest.approx(32.0)
    with pytest.raises(moecompress.RecipeError, match="threads must be at least 1"):
        pipeline.run(model_folder("moe-ref-q3"), tmp_path / "out2", threads=0, progress=False)
    doc = Pipeline.run.__doc__
    for parameter in ("source", "output_dir", "device", "dtype", "threads", "overwrite", "execution", "progress",
                      "verbose", "source_name"):
        assert f"        {parameter}:" in doc, parameter


# ----- compress on a path and on a loaded model; the native format after a bare import ----------------------------
@pytest.fixture(scope="module")
def native_folder(tmp_path_factory, testbed):
    """An RTN-quantised (native format) q3, compressed from its path."""
    out = tmp_path_factory.mktemp("native") / "rtn"
    report = moecompress.compress(model_folder("moe-ref-q3"), [moecompress.RTNStage(bits=4, group_size=16)], out,
                                  calibration={"files": [str(testbed / "calib")], "num_samples": 4, "seq_len": 32},
                                  progress=False)
    assert report["model"]["source"] == str(model_folder("moe-ref-q3"))
    return out


@pytest.mark.parametrize("transformers_first", [False, True])
def test_native_format_loads_after_a_bare_import(native_folder, transformers_first):
    imports = ("import transformers.quantizers.auto\nimport moecompress" if transformers_first else
               "import moecompress\nassert 'torch' not in sys.modules  # registered lazily\nimport transformers")
    done = _python(f"""
import sys
{imports}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(native_folder)!r})
experts = model.model.layers[0].mlp.experts
import torch
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
print(type(experts).__name__, int(experts.expert_bits[0]), bool(torch.isfinite(logits).all()))
""")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PackedExperts", "4", "True"]


README_EXAMPLE = "# moecompress.compress on a model you have loaded"


def readme_example() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(block for block in blocks if block.startswith(README_EXAMPLE))
    assert len(example.strip().splitlines()) <= 12, "the README example should stay about ten lines"
    return example


def test_the_readme_example_compresses_a_loaded_model(tmp_path):
    example = readme_example().replace('"runs/', f'"{tmp_path}/runs/')
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    out = next((tmp_path / "runs").iterdir())
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["source"].endswith("moe-ref-q3")  # the loaded model's name, not the temporary copy
    assert [stage["method"] for stage in report["stages"]] == ["prune_reap", "gptq"]
    assert report["model"]["parameters_after"] < report["model"]["parameters_before"]
    assert not [path for path in (tmp_path / "runs").iterdir() if ".input-" in path.name]  # the copy is removed
    assert (out / "README.md").is_file() and (out / "run.log").is_file()
    assert "gptq" in done.stderr and "layers" in done.stderr  # the same progress as the CLI


def test_compress_a_loaded_model_equals_compressing_its_folder(tmp_path, testbed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_folder("moe-ref-mx")
    recipe = {"calibration": {"files": [str(testbed / "calib")], "num_samples": 4, "seq_len": 32},
              "stages": [{"method": "prune_frequency", "keep_ratio": 0.75}]}
    from_folder = moecompress.compress(source, recipe, tmp_path / "a", progress=False)
    model = AutoModelForCausalLM.from_pretrained(source)
    loaded = moecompress.compress(model, recipe, tmp_path / "b", tokenizer=AutoTokenizer.from_pretrained(source),
                                  progress=False)
    assert loaded["stages"][0]["decisions"] == from_folder["stages"][0]["decisions"]
    assert loaded["calibration"]["sha256"] == from_folder["calibration"]["sha256"]
    again = moecompress.compress(model, recipe, tmp_path / "b", tokenizer=AutoTokenizer.from_pretrained(source),
                                 progress=False)  # the same model and recipe: the finished run is reused
    assert again["timings"] == loaded["timings"]
    with pytest.raises(moecompress.CheckpointError, match="a checkpoint folder, a hub id or a loaded"):
        moecompress.compress(42, recipe, tmp_path / "c")
