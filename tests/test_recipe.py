"""Recipe parsing and validation: every bad input gets a RecipeError naming the place and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecompress.errors import RecipeError
from moecompress.pipeline import Pipeline
from moecompress.pruning.frequency import FrequencyPruning
from moecompress.recipe import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_valid_recipe_parses_and_resolves_paths_against_the_recipe_folder(tmp_path):
    path = _write(tmp_path, """
calibration: {files: [calib, /abs/data.jsonl], num_samples: 16, seq_len: 128, seed: 3}
stages:
  - method: prune_frequency
    num_experts_to_keep: 24
""")
    recipe = load_recipe(path)
    assert recipe.calibration.files == [str((tmp_path / "calib").resolve()), "/abs/data.jsonl"]
    assert (recipe.calibration.num_samples, recipe.calibration.seq_len, recipe.calibration.seed) == (16, 128, 3)
    assert len(recipe.stages) == 1 and isinstance(recipe.stages[0], FrequencyPruning)
    assert recipe.stages[0].options.num_experts_to_keep == 24
    assert recipe.to_dict()["stages"] == [{"method": "prune_frequency", "num_experts_to_keep": 24}]


def test_empty_stage_list_is_a_valid_profile_recipe(tmp_path):
    recipe = load_recipe(_write(tmp_path, "stages: []\n"))
    assert recipe.stages == [] and recipe.calibration.num_samples == 64


def test_python_api_builds_the_same_pipeline_as_the_recipe(tmp_path):
    from_yaml = Pipeline.from_recipe(_write(tmp_path, """
calibration: {files: bundled, num_samples: 8, seq_len: 64}
stages: [{method: prune_frequency, keep_ratio: 0.75}]
"""))
    in_code = Pipeline([FrequencyPruning({"keep_ratio": 0.75})], calibration={"files": ["bundled"], "num_samples": 8, "seq_len": 64})
    assert from_yaml.recipe.to_dict() == in_code.recipe.to_dict()
    assert from_yaml.recipe.sha256 == in_code.recipe.sha256
    other = Pipeline([FrequencyPruning({"keep_ratio": 0.5})], calibration={"files": ["bundled"], "num_samples": 8, "seq_len": 64})
    assert other.recipe.sha256 != in_code.recipe.sha256


@pytest.mark.parametrize(
    "text, message",
    [
        ("stages: [{method: prune_frequence, num_experts_to_keep: 4}]", r"stages\[0\]: unknown method 'prune_frequence'; known methods: .*prune_frequency"),
        ("stages: [{method: prune_frequency, num_experts_to_keep: 4, keep: 3}]", r"stages\[0\] \(prune_frequency\): unknown key 'keep' \(allowed: num_experts_to_keep, keep_ratio, top_k, layer_budget, group_balanced, progressive\)"),
        ("stages: [{method: prune_frequency, num_experts_to_keep: many}]", r"stages\[0\] \(prune_frequency\): num_experts_to_keep: .*valid integer.*'many'"),
        ("stages: [{method: prune_frequency, keep_ratio: 1.5}]", r"keep_ratio: .*less than or equal to 1"),
        ("stages: [{method: prune_frequency, num_experts_to_keep: 0}]", r"num_experts_to_keep: .*greater than or equal to 1"),
        ("stages: [{method: prune_frequency}]", r"exactly one of `num_experts_to_keep` or `keep_ratio`"),
        ("stages: [{num_experts_to_keep: 3}]", r"stages\[0\] must be a mapping with a `method` key"),
        ("stages: {method: prune_frequency}", r"`stages` must be a list"),
        ("stage: []", r"unknown recipe key\(s\) \['stage'\]"),
        ("calibration: {num_samples: ten}", r"calibration: num_samples: .*valid integer"),
        ("calibration: {seq_len: 1}", r"calibration: seq_len: .*greater than or equal to 2"),
        ("calibration: {files: [a.jsonl], dataset: wikitext}", r"either `files` or `dataset`"),
        ("calibration: {sample_count: 3}", r"unknown key 'sample_count'"),
        ("- a\n- b", r"a recipe must be a mapping"),
    ],
)
def test_bad_recipes_are_rejected_with_a_clear_message(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, text))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "stages: [\n"))
    with pytest.raises(RecipeError, match="must be a mapping"):
        parse_recipe({"calibration": [1, 2]})


def test_shipped_recipes_are_valid():
    import moecompress.evals  # noqa: F401  (registers the evaluate stage)

    profile = load_recipe(REPO / "recipes" / "profile.yaml")
    assert profile.stages == []
    demo = load_recipe(REPO / "recipes" / "demo.yaml")
    assert [stage.method for stage in demo.stages] == ["prune_reap", "mcmoe_pmq", "gptq", "evaluate"]
    assert demo.stages[0].options.num_experts_to_keep == 24 and demo.stages[2].options.agq
    assert [export.format for export in demo.exports] == ["compressed-tensors"]
    assert Path(demo.calibration.files[0]).is_dir()  # ../demo/calib, resolved against recipes/


def test_every_bundled_recipe_parses_and_the_presets_stream_as_documented():
    """recipes/*.yaml are what users start from: each must validate, and the streamed preset must stream."""
    import moecompress.evals  # noqa: F401  (registers the evaluate stage)
    from moecompress.streaming import stream_plan

    recipes = {path.name: load_recipe(path) for path in sorted((REPO / "recipes").glob("*.yaml"))}
    assert {"demo.yaml", "fit_30b_in_12gb.yaml", "w4_streamed.yaml"} <= set(recipes)
    assert stream_plan(recipes["w4_streamed.yaml"].stages)[0] is not None
    plan, reason = stream_plan(recipes["fit_30b_in_12gb.yaml"].stages)
    assert plan is None and "mcmoe_pmq" in reason  # documented: PMQ runs in memory
    fit = recipes["fit_30b_in_12gb.yaml"]
    assert fit.stages[1].options.target_size == "12GiB" and fit.exports[0].format == "compressed-tensors"


def test_camera_p_is_the_issue_name_of_prune_camera():
    import moecompress.pruning  # noqa: F401
    from moecompress.pruning.camera_p import CameraPruning

    recipe = parse_recipe({"stages": [{"method": "camera_p", "ratio": 0.2, "mode": "physical"}]})
    stage = recipe.stages[0]
    assert isinstance(stage, CameraPruning) and stage.method == "camera_p"
    assert stage.options.ratio == 0.2 and stage.options.mode == "physical"


def test_quantising_after_a_remap_merge_is_refused_before_any_stage_runs():
    """A `router_rule: remap` merge keeps the full router and maps it onto merged experts; quantised experts cannot
    hold that map, so the recipe (and the same pipeline built in Python) fails at once, naming the fix."""
    from moecompress.pruning.uncurl import UncurlMerging
    from moecompress.quantization.stages import GPTQStage

    recipe = {"stages": [{"method": "merge_uncurl", "num_experts_to_keep": 4}, {"method": "gptq", "bits": 4}]}
    with pytest.raises(RecipeError, match="router_rule: collapse"):
        parse_recipe(recipe)
    with pytest.raises(RecipeError, match="router_rule: collapse"):
        Pipeline([UncurlMerging({"num_experts_to_keep": 4}), GPTQStage({"bits": 4})])
    # collapse (a plain smaller model) stays allowed
    parse_recipe({"stages": [{"method": "merge_uncurl", "num_experts_to_keep": 4, "router_rule": "collapse"},
                             {"method": "gptq", "bits": 4}]})


def test_the_recommended_recipes_budget_per_original_expert_parameter():
    """Each recommended recipe prunes, then sizes the kept experts: its two numbers must give the size it is named
    for per ORIGINAL routed-expert parameter (keep_ratio x target per kept parameter)."""
    for name, size in (("recommended_3bit.yaml", 3.0), ("recommended_2p5bit.yaml", 2.5)):
        prune, pmq, gptq = load_recipe(REPO / "recipes" / name).stages
        assert (prune.method, pmq.method, gptq.method) == ("prune_reap", "mcmoe_pmq", "gptq")
        per_kept = float(pmq.options.target_size.removesuffix("bpp-experts"))
        assert abs(prune.options.keep_ratio * per_kept - size) < 1e-3, name
        assert pmq.options.eps_mode == "hessian" and 0 not in pmq.options.candidates  # drops: REAP's, not PMQ's
    for name, size in (("pmqH_3p0.yaml", 3.0), ("pmqH_2p5.yaml", 2.5)):  # the same chain without pruning (ds)
        recipe = load_recipe(REPO / "recipes" / "candidates" / name)
        pmq, gptq = recipe.stages
        assert (pmq.method, gptq.method) == ("mcmoe_pmq", "gptq") and recipe.calibration.files == ["bundled"]
        assert pmq.options.target_size == f"{size}bpp-experts" and pmq.options.eps_mode == "hessian"


@pytest.mark.slow
def test_the_recommended_2p5bit_recipe_keeps_its_size_on_a_real_model(tmp_path):
    """Compress the bundled model: the routed experts it writes take at most 2.5 bits per routed-expert parameter
    of the model it started from (packed codes, scales and zero points counted; pruned experts 0)."""
    import moecompress
    from moecompress.checkpoint import load_model
    from moecompress.models.summary import model_summary

    source = REPO / "demo" / "models" / "moe-ref-q3"
    original_parameters = model_summary(load_model(source)[0])["parameters"]["routed_experts"]
    moecompress.compress(source, REPO / "recipes" / "recommended_2p5bit.yaml", tmp_path / "out", threads=1)
    stored = model_summary(load_model(tmp_path / "out")[0])
    bits_per_parameter = 8 * stored["bytes"]["routed_experts"] / original_parameters
    assert 2.3 < bits_per_parameter <= 2.5, bits_per_parameter
