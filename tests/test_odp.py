"""MC-MoE ODP: the rule against a direct per-token computation, token importance against the stated formula, the
hooked MoE blocks (float and packed experts) against a direct block computation, and persistence / switching off."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import testbed_model_path as model_folder

from moecompress.checkpoint import load_model
from moecompress.models import find_moe_blocks
from moecompress.pipeline import Pipeline
from moecompress.quantization.odp import (
    ODPStage,
    install_odp,
    odp_routing,
    odp_state,
    remove_odp,
    skipped_fractions,
    token_importance,
)
from moecompress.quantization.packing import pack_model_experts
from moecompress.quantization.stages import RTNStage

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rule_skips_small_secondary_experts_per_rank_and_keeps_the_total():
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(50, 4, generator=generator)
    index = torch.stack([torch.randperm(8, generator=generator)[:4] for _ in range(50)])
    thresholds = [0.6, 0.5, 0.4]
    protected = torch.zeros(50, dtype=torch.bool)
    protected[:5] = True
    new_index, new_weights, skip = odp_routing(index, weights, thresholds, 8, protected)
    for token in range(50):
        order = sorted(range(4), key=lambda slot: -float(weights[token, slot]))
        top = float(weights[token, order[0]])
        expected_skip = {order[rank] for rank in range(1, 4) if float(weights[token, order[rank]]) < thresholds[rank - 1] * top}
        if token < 5:
            expected_skip = set()  # protected tokens keep every expert
        assert {slot for slot in range(4) if bool(skip[token, slot])} == expected_skip
        kept = [slot for slot in range(4) if slot not in expected_skip]
        for slot in range(4):
            if slot in expected_skip:
                assert int(new_index[token, slot]) == 8 and float(new_weights[token, slot]) == 0.0
            else:
                assert int(new_index[token, slot]) == int(index[token, slot])
        total, kept_total = float(weights[token].sum()), float(weights[token, kept].sum())
        for slot in kept:
            assert float(new_weights[token, slot]) == pytest.approx(float(weights[token, slot]) * total / kept_total)
    assert bool(skip[5:].any())


def test_importance_is_the_attention_each_token_receives_times_its_magnitude():
    generator = torch.Generator().manual_seed(1)
    batch, heads, length, hidden = 2, 3, 6, 5
    scores = torch.randn(batch, heads, length, length, generator=generator)
    scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    attention = scores.softmax(dim=-1)
    inputs = torch.randn(batch, length, hidden, generator=generator)
    paper, code = token_importance(inputs, attention, "paper"), token_importance(inputs, attention, "code")
    for b in range(batch):
        for j in range(length):
            averaged = attention[b].mean(dim=0)
            received = sum(float(averaged[i, j]) for i in range(j, length)) / (length - j)
            assert float(paper[b, j]) == pytest.approx(float(inputs[b, j].abs().sum()) * received, rel=1e-5)
            # the reference's row sum is 1 under softmax: magnitude / (L - j)
            assert float(code[b, j]) == pytest.approx(float(inputs[b, j].abs().sum()) / (length - j), rel=1e-5)


def _direct_block_outputs(view, inputs, attention, thresholds, protect_fraction):
    """The ODP block output computed per token from the view: route, apply the rule, sum the surviving experts."""
    batch, length, _ = inputs.shape
    flat = inputs.reshape(batch * length, -1)
    routing = view.route(flat)
    averaged = attention.float().mean(dim=1)  # [B, L, L]
    output = torch.zeros_like(flat, dtype=torch.float32)
    protected_tokens = set()
    for b in range(batch):
        importance = []
        for j in range(length):
            received = float(averaged[b, j:, j].sum()) / (length - j)
            importance.append(float(inputs[b, j].abs().sum()) * received)
        ranked = sorted(range(length), key=lambda j: -importance[j])
        protected_tokens |= {b * length + j for j in ranked[: int(protect_fraction * length)]}
    for token in range(batch * length):
        weights = routing.top_k_weights[token].tolist()
        experts = routing.top_k_index[token].tolist()
        order = sorted(range(len(weights)), key=lambda slot: -weights[slot])
        kept = [order[0]] + [slot for rank, slot in enumerate(order[1:], start=1)
                             if token in protected_tokens or weights[slot] >= thresholds[rank - 1] * weights[order[0]]]
        scale = sum(weights) / sum(weights[slot] for slot in kept)
        for slot in kept:
            output[token] += weights[slot] * scale * view.expert_forward(experts[slot], flat[token:token + 1])[0].float()
    return output.reshape(batch, length, -1), protected_tokens


@pytest.mark.parametrize("name, packed", [("moe-ref-mx", False), ("moe-ref-mx", True), ("moe-ref-q3", False)])
def test_hooked_blocks_equal_a_direct_computation(testbed, name, packed):
    model, tokenizer = load_model(model_folder(name), dtype=torch.float32)
    if packed:  # the torch path of the packed experts (the kernels' sentinel handling is tested in test_kernels)
        pack_model_experts(model, 4, group_size=32, set_implementation=False)
    ids = tokenizer(["def add(a, b):\n    return a + b\n", "In the beginning God created the heaven"],
                    return_tensors="pt", padding="max_length", max_length=12, truncation=True).input_ids
    views = find_moe_blocks(model)
    top_k = views[0].routing.top_k
    thresholds = {view.layer_index: [0.7 - 0.1 * rank for rank in range(top_k - 1)] for view in views}  # per rank
    install_odp(model, {"thresholds": thresholds, "protect_fraction": 0.25})
    captured = {}
    hooks = [view.block.register_forward_hook(
        lambda module, args, output, layer=view.layer_index: captured.__setitem__(
            layer, (args[0].detach(), (output[0] if isinstance(output, tuple) else output).detach())))
        for view in views]
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    for hook in hooks:
        hook.remove()
    fractions = skipped_fractions(model)
    for view in views[:3]:
        inputs, hooked = captured[view.layer_index]
        with torch.no_grad():
            expected, protected = _direct_block_outputs(view, inputs, attentions[view.layer_index],
                                                        thresholds[view.layer_index], 0.25)
            full = view.forward(inputs.reshape(-1, inputs.shape[-1])).float()
        torch.testing.assert_close(hooked.float(), expected, atol=1e-4, rtol=1e-4)
        for token in protected:  # protected tokens keep all experts: the full block output
            torch.testing.assert_close(hooked.reshape(-1, hooked.shape[-1])[token].float(), full[token],
                                       atol=1e-4, rtol=1e-4)
        assert 0 < fractions[view.layer_index] < (top_k - 1) / top_k  # some secondary experts skipped, no top one


def test_the_stage_saves_odp_and_a_reload_applies_it_unless_switched_off(testbed, tmp_path, monkeypatch):
    pipeline = Pipeline([RTNStage({"bits": 4, "group_size": 32}), ODPStage({"protect_fraction": 0.05})],
                        calibration={"files": [str(testbed / "calib")], "num_samples": 4, "seq_len": 32})
    report = pipeline.run(model_folder("moe-ref-mx"), tmp_path / "out")
    thresholds = report["stages"][1]["decisions"]["thresholds"]
    assert all(0.05 < values[0] < 1 for values in thresholds.values())  # medians of w_1/w_0 on calibration
    ids = torch.tensor([[5, 17, 300, 42, 8, 99, 1000, 7]])
    model, _ = load_model(tmp_path / "out", dtype=torch.float32)
    state = odp_state(model)
    assert state is not None and {str(k): v.thresholds for k, v in state.layers.items()} == thresholds
    with torch.no_grad():
        with_odp = model(ids).logits
    assert any(fraction > 0 for fraction in skipped_fractions(model).values())
    plain, _ = load_model(tmp_path / "out", dtype=torch.float32, odp=False)
    assert odp_state(plain) is None
    with torch.no_grad():
        without = plain(ids).logits
    assert not torch.allclose(with_odp, without)
    remove_odp(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, without)
    # a plain transformers load of the native checkpoint applies it too, and the environment switch turns it off
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert odp_state(native) is not None
    monkeypatch.setenv("MOECOMPRESS_ODP", "0")
    assert odp_state(load_model(tmp_path / "out", dtype=torch.float32)[0]) is None
