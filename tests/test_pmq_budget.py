"""PMQ beyond the per-layer reference: whole-model target sizes (bytes as packed), one knapsack across layers,
one width per layer, the reference code's block-output error, candidate 0 (drop), and the mcmoe_code preset."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.analysis.block_outputs import MoEBlockInputs  # noqa: F401  (registers moe_block_inputs)
from moecompress.calibration import LayerwiseRunner, load_calibration
from moecompress.checkpoint import load_model
from moecompress.errors import RecipeError
from moecompress.models import find_moe_blocks
from moecompress.models.edits import keep_experts
from moecompress.models.summary import model_summary
from moecompress.pipeline import Pipeline
from moecompress.quantization.packing import quantize_rtn
from moecompress.quantization.pmq import (
    LayerCosts,
    PMQStage,
    TargetSize,
    allocate_model,
    block_output_errors,
    packed_expert_bytes,
    parse_target_size,
)
from moecompress.quantization.stages import RTNStage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, expected", [
    ("4.5GiB", TargetSize("bytes", 4.5 * 2**30)), ("1.2MB", TargetSize("bytes", 1.2e6)),
    ("800 KiB", TargetSize("bytes", 800 * 1024)), ("123B", TargetSize("bytes", 123)),
    ("2.5bpp", TargetSize("bpp", 2.5)), ("3bpp-experts", TargetSize("bpp_experts", 3.0)),
])
def test_target_sizes_parse(text, expected):
    assert parse_target_size(text) == expected


@pytest.mark.parametrize("text", ["4.5 parsecs", "GiB", "-1MB", ""])
def test_bad_target_sizes_say_how_to_write_one(text):
    with pytest.raises(ValueError, match="write e.g."):
        parse_target_size(text)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric, group_size", [(True, 32), (False, 128), (False, -1)])
def test_expert_bytes_are_what_the_packed_format_stores(bits, symmetric, group_size):
    hidden, intermediate = 96, 40
    gate_up = quantize_rtn(torch.randn(2 * intermediate, hidden, dtype=torch.bfloat16), bits, group_size, symmetric)
    down = quantize_rtn(torch.randn(hidden, intermediate, dtype=torch.bfloat16), bits, group_size, symmetric)
    assert packed_expert_bytes(hidden, intermediate, bits, group_size, symmetric, 2) == gate_up.nbytes() + down.nbytes()
    assert packed_expert_bytes(hidden, intermediate, 0, group_size, symmetric, 2) == 0


def _layer(layer, importance, pinned=(), min_kept=1):
    costs = np.asarray(importance, dtype=float)[:, None] * np.array([8.0, 4.0, 2.0, 1.0])[None, :]  # widths 0,2,3,4
    return LayerCosts(layer, costs, np.array([0.0, 2.0, 3.0, 4.0]), list(pinned), min_kept)


def test_one_knapsack_across_layers_spreads_bytes_by_the_objective():
    # layer 1's experts matter ten times more: under one budget it gets the wider widths
    layers = [_layer(0, [1, 1, 1, 1]), _layer(1, [10, 10, 10, 10])]
    candidates = [0, 2, 3, 4]
    widths = allocate_model([_layer(0, [1, 1, 1, 1], min_kept=4), _layer(1, [10, 10, 10, 10], min_kept=4)],
                            candidates, budget=24, budget_kind="bytes", at_least_one=[], granularity="expert")
    assert sum(widths[0]) + sum(widths[1]) <= 24 and 0 not in widths[0] + widths[1]
    assert min(widths[1]) >= max(widths[0])
    # brute force over the 4^8 assignments agrees on the objective
    best = min((cost for cost, _ in _all_assignments(layers, candidates, 24, min_kept=4)))
    chosen = sum(layers[i].costs[e, candidates.index(w)] for i in (0, 1) for e, w in enumerate(widths[i]))
    assert chosen == pytest.approx(best)


def _all_assignments(layers, candidates, budget, min_kept):
    import itertools

    for choice in itertools.product(range(len(candidates)), repeat=8):
        per_layer = [choice[:4], choice[4:]]
        if any(sum(1 for c in layer if candidates[c] != 0) < min_kept for layer in per_layer):
            continue
        if sum(candidates[c] for c in choice) > budget:
            continue
        yield sum(layers[i].costs[e, c] for i in (0, 1) for e, c in enumerate(per_layer[i])), choice


def test_drop_candidate_keeps_top_k_and_super_experts():
    layers = [_layer(0, [5, 1, 1, 1], pinned=[0], min_kept=2)]
    widths = allocate_model(layers, [0, 2, 3, 4], budget=6, budget_kind="bytes", at_least_one=[],
                            granularity="expert")[0]
    assert widths[0] == 4  # the pinned super expert: the widest
    assert sum(1 for w in widths if w) >= 2 and sum(widths) <= 6


def test_layer_granularity_gives_each_layer_one_width():
    layers = [_layer(0, [1, 2, 3, 4]), _layer(1, [40, 30, 20, 10]), _layer(2, [1, 1, 1, 1], pinned=[2])]
    layers = [LayerCosts(entry.layer, entry.costs[:, 1:], entry.expert_bytes[1:], entry.pinned) for entry in layers]
    widths = allocate_model(layers, [2, 3, 4], budget=8 * 3 + 4 * 3 + 4 * 2, budget_kind="bits", at_least_one=[],
                            granularity="layer")
    assert all(len(set(values)) == 1 for values in widths.values())
    assert widths[2] == [4] * 4  # the layer holding a super expert is pinned
    assert widths[1][0] > widths[0][0]  # the important layer gets the wider width


@pytest.fixture(scope="module")
def mx_block_inputs(testbed):
    model, tokenizer = load_model(model_folder("moe-ref-mx"), dtype=torch.float32)
    calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=4, seq_len=32, seed=0)
    statistics = LayerwiseRunner(model).run(calibration, ["moe_block_inputs"],
                                            options={"moe_block_inputs": {"max_tokens": 64}}).layers
    return model, statistics


def test_block_output_errors_equal_the_block_rerun_with_one_expert_quantised(mx_block_inputs):
    model, statistics = mx_block_inputs
    view = find_moe_blocks(model)[1]
    inputs = statistics[view.layer_index]["moe_block_inputs"]
    errors = block_output_errors(view, inputs, [0, 2, 4], 32, False)
    full = view.forward(inputs)
    expert = 5
    for column, bits in ((1, 2), (2, 4)):
        edited = copy.deepcopy(model)
        edited_view = find_moe_blocks(edited)[1]
        with torch.no_grad():
            fused = edited_view.experts.gate_up_proj
            fused[expert] = quantize_rtn(fused[expert], bits, 32, False).dequantize(torch.float32)
            down = edited_view.experts.down_proj
            down[expert] = quantize_rtn(down[expert], bits, 32, False).dequantize(torch.float32)
            direct = torch.linalg.norm(full - edited_view.forward(inputs))
        assert float(errors[expert, column]) == pytest.approx(float(direct), rel=1e-4)
    dropped = copy.deepcopy(model)
    keep_experts(dropped, {view.layer_index: [e for e in range(view.num_experts) if e != expert]})
    with torch.no_grad():
        direct = torch.linalg.norm(full - find_moe_blocks(dropped)[1].forward(inputs))
    assert float(errors[expert, 0]) == pytest.approx(float(direct), rel=1e-4)
    # fewer bits, more error (equal, zero, for an expert no cached token reaches)
    assert bool((errors[:, 0] >= errors[:, 1]).all() and (errors[:, 1] >= errors[:, 2]).all())


def _calibration(testbed):
    return {"files": [str(testbed / "calib")], "num_samples": 4, "seq_len": 32}


@pytest.mark.parametrize("granularity", ["expert", pytest.param("layer", marks=pytest.mark.slow)])
def test_target_size_bounds_the_saved_model(testbed, tmp_path, granularity):
    source = model_folder("moe-ref-mx")
    original, _ = load_model(source)
    summary = model_summary(original)
    routed_parameters = summary["parameters"]["routed_experts"]
    # everything else as it is, the routed experts at 3.1 bits per weight with their scales (2 bits + a bf16 scale
    # per 32 weights is 2.5)
    target = summary["bytes"]["total"] - summary["bytes"]["routed_experts"] + int(3.1 * routed_parameters / 8)
    pipeline = Pipeline([PMQStage({"target_size": f"{target}B", "candidates": [2, 3, 4], "group_size": 32,
                                   "granularity": granularity}),
                         RTNStage({"bits": 4, "group_size": 32})], calibration=_calibration(testbed))
    report = pipeline.run(source, tmp_path / "out")
    allocated = report["stages"][0]["decisions"]["bit_widths"]
    reloaded, _ = load_model(tmp_path / "out")
    size = model_summary(reloaded)["bytes"]["total"]
    assert size <= target
    assert size >= 0.97 * target  # the budget is spent, not just respected
    for view in find_moe_blocks(reloaded):
        assert view.experts.expert_bits.tolist() == allocated[str(view.layer_index)]
    if granularity == "layer":
        assert all(len(set(widths)) == 1 for widths in allocated.values())
    else:
        assert len({bits for widths in allocated.values() for bits in widths}) > 1


def test_joint_budget_drops_experts_and_quantises_the_rest(testbed, tmp_path):
    source = model_folder("moe-ref-mx")
    pipeline = Pipeline([PMQStage({"target_size": "2.4bpp-experts", "candidates": [0, 2, 3, 4], "group_size": 32,
                                   "at_least_one": []}),
                         RTNStage({"bits": 4, "group_size": 32})], calibration=_calibration(testbed))
    report = pipeline.run(source, tmp_path / "out")
    allocated = report["stages"][0]["decisions"]["bit_widths"]
    assert report["stages"][0]["metrics"]["dropped_experts"] > 0
    reloaded, _ = load_model(tmp_path / "out")
    for view in find_moe_blocks(reloaded):
        widths = allocated[str(view.layer_index)]
        assert view.experts.expert_bits.tolist() == [bits for bits in widths if bits]
        assert view.num_experts >= view.routing.top_k
    for layer, expert in report["super_experts"]:
        assert reloaded is not None and layer in {v.layer_index for v in find_moe_blocks(reloaded)}
    summary = model_summary(reloaded)
    assert summary["bytes"]["routed_experts"] * 8 <= 2.4 * model_summary(load_model(source)[0])["parameters"][
        "routed_experts"]


def test_mcmoe_code_preset_runs_the_reference_choices(testbed, tmp_path):
    stage = PMQStage({"preset": "mcmoe_code", "avg_bits": 2.5, "block_output_tokens": 64})
    assert (stage.options.eps_mode, stage.options.candidates, stage.options.at_least_one) == \
        ("block_output", [1, 2, 3], [2, 3])
    assert (stage.options.beta, stage.options.symmetric, stage.options.group_size) == (1.5, False, 128)
    options = {key: value for key, value in stage.describe().items() if key != "method"}
    assert PMQStage(options).options == stage.options  # a report's recipe parses back
    pipeline = Pipeline([stage, RTNStage({"bits": 4, "group_size": 128, "symmetric": False})],
                        calibration=_calibration(testbed))
    report = pipeline.run(model_folder("moe-ref-mx"), tmp_path / "out")
    allocated = report["stages"][0]["decisions"]["bit_widths"]
    for widths in allocated.values():
        assert sum(widths) <= 2.5 * len(widths) and {2, 3} <= set(widths) <= {1, 2, 3}
    reloaded, _ = load_model(tmp_path / "out")
    assert [view.experts.expert_bits.tolist() for view in find_moe_blocks(reloaded)] == list(allocated.values())


@pytest.mark.parametrize("options, message", [
    ({"avg_bits": 3, "target_size": "1MB"}, "exactly one budget"),
    ({}, "exactly one budget"),
    ({"target_size": "3 furlongs"}, "write e.g."),
    ({"avg_bits": 3, "preset": "mcmoe_code", "beta": 2}, "fixes"),
    ({"avg_bits": 3, "candidates": [0, 2, 4], "granularity": "layer"}, "granularity: expert"),
    ({"avg_bits": 3, "candidates": [0]}, "at least one nonzero"),
])
def test_bad_budget_options_are_recipe_errors(options, message):
    from moecompress.recipe import parse_recipe

    with pytest.raises(RecipeError, match=message):
        parse_recipe({"stages": [{"method": "mcmoe_pmq", **options}]})


def test_an_impossible_target_size_is_refused_before_any_work():
    from moecompress.pipeline import RunContext

    model, _ = load_model(model_folder("moe-ref-mx"))
    context = RunContext(model=model, tokenizer=None, source="", output_dir=None)
    with pytest.raises(RecipeError, match="even the narrowest candidate needs .* raise target_size"):
        PMQStage({"target_size": "0.5bpp-experts", "group_size": 32}).check(context)
