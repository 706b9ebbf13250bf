"""MC-MoE PMQ: costs from the spec's formula, the per-layer knapsack, and the bit map the quantiser then uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import testbed_model_path as model_folder

from moecompress.calibration import LayerwiseRunner, load_calibration
from moecompress.checkpoint import load_model
from moecompress.errors import RecipeError
from moecompress.models import find_moe_blocks
from moecompress.pipeline import Pipeline
from moecompress.quantization.packing import quantize_rtn
from moecompress.quantization.pmq import PMQStage, allocate_layer, hessian_errors, layer_errors, pmq_costs
from moecompress.quantization.stages import GPTQStage

pytestmark = pytest.mark.usefixtures("one_thread")


def test_costs_follow_the_formula():
    counts, mass = torch.tensor([10.0, 30.0, 60.0]), torch.tensor([2.0, 3.0, 5.0])
    errors = torch.tensor([[4.0, 1.0], [9.0, 2.0], [16.0, 3.0]])
    costs = pmq_costs(counts, mass, errors, alpha=1.0, beta=2.0, gamma=0.5)
    expected = (counts / 100)[:, None] * ((mass / 10) ** 2)[:, None] * errors.sqrt() * 1000
    assert np.allclose(costs, expected.numpy())


def test_the_allocation_gives_important_experts_more_bits_within_the_budget():
    # eight experts; the error halves per extra bit; importance grows with the expert id
    importance = np.arange(1, 9, dtype=float)
    costs = importance[:, None] * np.array([4.0, 2.0, 1.0])[None, :]
    widths = allocate_layer(costs, [2, 3, 4], avg_bits=2.5, at_least_one=[3, 4], pinned=[0])
    assert sum(widths) <= 2.5 * 8
    assert widths[0] == 4  # pinned (a super expert) at the widest candidate
    assert 3 in widths and 4 in widths
    unpinned = widths[1:]
    assert unpinned == sorted(unpinned)  # more important experts never get fewer bits
    brute = min((c for c in np.ndindex(*(3,) * 7)
                 if 4 + sum((2, 3, 4)[i] for i in c) <= 20 and 1 in c),  # expert 0, pinned at 4 bits, is the 4-bit one
                key=lambda c: sum(costs[e + 1, i] for e, i in enumerate(c)))
    assert unpinned == [(2, 3, 4)[i] for i in brute]


@pytest.mark.parametrize("scale_search", ["minmax", "mse"])
def test_hessian_errors_equal_a_direct_computation(testbed, scale_search):
    model, tokenizer = load_model(model_folder("moe-ref-mx"), dtype=torch.float32)
    calibration = load_calibration(tokenizer, files=[testbed / "calib"], num_samples=4, seq_len=32, seed=0)
    statistics = LayerwiseRunner(model).run(calibration, ["expert_input_hessian", "down_proj_hessian"]).layers
    view = find_moe_blocks(model)[0]
    layer = statistics[view.layer_index]
    errors = hessian_errors(view, layer["expert_input_hessian"], layer["down_proj_hessian"], [2, 4], 32, True,
                            scale_search)
    weights = view.expert_weights(3)
    gate_up, down = torch.cat([weights.gate, weights.up]).detach(), weights.down.detach()
    for column, bits in enumerate([2, 4]):
        d_gate_up = gate_up - quantize_rtn(gate_up, bits, 32, scale_search=scale_search).dequantize(torch.float32)
        d_down = down - quantize_rtn(down, bits, 32, scale_search=scale_search).dequantize(torch.float32)
        direct = torch.trace(d_gate_up @ layer["expert_input_hessian"][3] @ d_gate_up.T) + \
            torch.trace(d_down @ layer["down_proj_hessian"][3] @ d_down.T)
        assert float(errors[3, column]) == pytest.approx(float(direct), rel=1e-4)
    assert bool((errors[:, 0] > errors[:, 1]).all())  # fewer bits, more error, for every expert


def test_hessian_norm_is_the_norm_of_the_output_change_on_the_routed_tokens():
    """eps_mode hessian_norm: sqrt(sum_lin ||dW X^T||_F^2) with the routed inputs X (H = X^T X), here computed
    from explicit inputs; it grows like sqrt(tokens), the squared form like tokens."""
    from types import SimpleNamespace

    generator = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator),
                      torch.randn(16, 8, generator=generator))
    view = SimpleNamespace(num_experts=1, expert_weights=lambda e: SimpleNamespace(gate=gate, up=up, down=down))
    inputs, hidden = torch.randn(50, 16, generator=generator), torch.randn(50, 8, generator=generator)
    errors = {}
    for repeat in (1, 4):  # the same tokens seen 4 times
        x, h = inputs.repeat(repeat, 1), hidden.repeat(repeat, 1)
        errors[repeat] = hessian_errors(view, (x.T @ x)[None], (h.T @ h)[None], [2, 3], 16, True)
        gate_up = torch.cat([gate, up])
        for column, bits in enumerate([2, 3]):
            d_gate_up = gate_up - quantize_rtn(gate_up, bits, 16).dequantize(torch.float32)
            d_down = down - quantize_rtn(down, bits, 16).dequantize(torch.float32)
            norm = torch.sqrt(torch.linalg.norm(d_gate_up @ x.T) ** 2 + torch.linalg.norm(d_down @ h.T) ** 2)
            assert float(errors[repeat][0, column].sqrt()) == pytest.approx(float(norm), rel=1e-4)
    assert torch.allclose(errors[4], 4 * errors[1], rtol=1e-5)
    stage = PMQStage({"avg_bits": 2.5, "eps_mode": "hessian_norm", "candidates": [2, 3], "group_size": 16})
    statistics = {"expert_input_hessian": (x.T @ x)[None], "down_proj_hessian": (h.T @ h)[None]}
    assert torch.allclose(layer_errors(view, statistics, stage.options), errors[4].sqrt())
    assert stage.statistics == ("expert_token_counts", "routing_weight_sums_raw", "expert_input_hessian",
                                "down_proj_hessian")


def test_pmq_then_gptq_quantises_each_expert_at_its_allocated_width(testbed, tmp_path):
    pipeline = Pipeline([PMQStage({"avg_bits": 2.5, "candidates": [2, 3, 4], "group_size": 32}),
                         GPTQStage({"bits": 4, "group_size": 32, "agq": True})],
                        calibration={"files": [str(testbed / "calib")], "num_samples": 4, "seq_len": 32})
    report = pipeline.run(model_folder("moe-ref-mx"), tmp_path / "out")
    allocated = report["stages"][0]["decisions"]["bit_widths"]
    quantised = report["stages"][1]["decisions"]["bit_widths"]
    assert quantised == allocated
    for widths in allocated.values():
        assert sum(widths) <= 2.5 * len(widths) and {3, 4} <= set(widths)
    for layer, expert in report["super_experts"]:
        assert allocated[str(layer)][expert] == 4
    model, _ = load_model(tmp_path / "out", dtype=torch.float32)
    for view in find_moe_blocks(model):
        assert view.experts.expert_bits.tolist() == allocated[str(view.layer_index)]


def test_replay_puts_the_bit_map_back_for_a_resumed_run():
    from moecompress.pipeline import RunContext, StageResult

    context = RunContext(model=None, tokenizer=None, source="", output_dir=None)
    stage = PMQStage({"avg_bits": 3})
    assert stage.replay(context, StageResult(decisions={"bit_widths": {"1": [2, 4, 3]}}))
    assert context.bit_map == {(1, 0): 2, (1, 1): 4, (1, 2): 3}


@pytest.mark.parametrize("options, message", [
    ({"avg_bits": 1.5}, "below the narrowest"),
    ({"avg_bits": 3, "candidates": [2, 5]}, "cannot be packed"),
    ({"avg_bits": 3, "at_least_one": [8]}, "not among the candidates"),
])
def test_bad_pmq_options_are_recipe_errors(options, message):
    from moecompress.recipe import parse_recipe

    with pytest.raises(RecipeError, match=message):
        parse_recipe({"stages": [{"method": "mcmoe_pmq", **options}]})
