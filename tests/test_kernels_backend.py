"""PackedExperts as a transformers experts backend on the Qwen3-MoE test-bed model."""

from __future__ import annotations

import warnings

import conftest
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moecompress.errors import MoECompressError
from moecompress.kernels.backend import BACKEND_NAME, PackedExperts, packed_experts_forward
from moecompress.kernels.runtime import triton_available
from moecompress.quantization.packing import pack_model_experts, quantize_rtn


def _load(testbed):
    return AutoModelForCausalLM.from_pretrained(
        conftest.testbed_model_path("moe-ref-q3"), experts_implementation="eager", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def reference_logits(testbed):
    model = _load(testbed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(conftest.testbed_model_path("moe-ref-q3"))
    input_ids = tokenizer("def main(argv):\n    parser = argparse.ArgumentParser()", return_tensors="pt").input_ids
    with torch.no_grad():
        return input_ids, model(input_ids).logits


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_packed_experts_track_the_original_model(testbed, reference_logits) -> None:
    """8-bit packed experts barely move the logits, 4-bit a little more (measured 0.0025 and 0.052 relative)."""
    input_ids, original = reference_logits
    errors = {}
    for bits in (8, 4):
        model = _load(testbed)
        modules = pack_model_experts(model, bits, group_size=64)
        assert len(modules) == 6 and all(isinstance(m, PackedExperts) for m in modules)
        assert model.config._experts_implementation == BACKEND_NAME
        model.set_experts_implementation("eager")  # torch reference path: fast on CPU
        with torch.no_grad():
            logits = model(input_ids).logits
        errors[bits] = _relative_error(logits, original)
        assert (logits.argmax(-1) == original.argmax(-1)).float().mean() >= 0.75
    assert errors[8] < 0.01
    assert errors[4] < 0.1
    assert errors[8] < errors[4]


def test_triton_backend_equals_torch_path_after_set_experts_implementation(testbed, reference_logits) -> None:
    """Mixed bits per expert; the registered backend runs the kernels and gives the torch path's logits."""
    if not triton_available("cpu"):
        if not torch.cuda.is_available():  # conftest sets TRITON_INTERPRET=1 without a GPU: this must run here
            pytest.fail("Triton's interpreter is not active on CPU: TRITON_INTERPRET=1 must be set before kernel imports")
        pytest.skip("runs under TRITON_INTERPRET=1 on CPU; on a GPU, tests/test_kernels.py checks the kernels on CUDA")
    input_ids, _ = reference_logits
    model = _load(testbed)
    bits = lambda layer, expert: (4, 8, 3, 2)[expert % 4]  # noqa: E731
    pack_model_experts(model, bits, group_size=64, symmetric=False)
    assert BACKEND_NAME in ALL_EXPERTS_FUNCTIONS
    last_token = input_ids[:, -1:]  # one decode token keeps the interpreter fast
    calls = []
    original = PackedExperts.forward_triton
    PackedExperts.forward_triton = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        with torch.no_grad():
            kernel_logits = model(last_token).logits
    finally:
        PackedExperts.forward_triton = original
    assert len(calls) == 6  # every MoE layer ran on the kernel
    model.set_experts_implementation("eager")
    with torch.no_grad():
        torch_logits = model(last_token).logits
    torch.testing.assert_close(kernel_logits, torch_logits, atol=1e-4, rtol=1e-4)


def test_missing_driver_falls_back_to_torch_once(testbed) -> None:
    experts = PackedExperts([quantize_rtn(torch.randn(16, 8), 4, 8)] * 2, [quantize_rtn(torch.randn(8, 8), 4, 8)] * 2,
                            torch.nn.SiLU())
    calls = []

    def no_driver(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    experts.forward_triton = no_driver
    hidden, index, weights = torch.randn(3, 8), torch.tensor([[0, 1]] * 3), torch.rand(3, 2)
    with pytest.warns(UserWarning, match="no GPU driver"):
        out = packed_experts_forward(experts, hidden, index, weights)
    torch.testing.assert_close(out, experts.forward_reference(hidden, index, weights))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed_experts_forward(experts, hidden, index, weights)
    assert len(calls) == 1 or not triton_available("cpu")


def test_bits_map_must_cover_every_expert(testbed) -> None:
    model = _load(testbed)
    with pytest.raises(MoECompressError, match="layer 0, expert 1"):
        pack_model_experts(model, {(0, 0): 4})
    with pytest.raises(MoECompressError, match="5 bits"):
        pack_model_experts(model, 5)


def test_expert_linear_slices_are_compressed_tensors_rows(testbed) -> None:
    """Each expert's gate/up/down is a plain row slice of the stacks, ready for per-expert export."""
    model = _load(testbed)
    view_weights = model.model.layers[2].mlp.experts.gate_up_proj[5].detach().clone()
    packed = pack_model_experts(model, 4, group_size=32, set_implementation=False)[2]
    gate_up = packed.expert_linear(5, "gate_up_proj")
    expected = quantize_rtn(view_weights, 4, 32)
    assert torch.equal(gate_up.packed, expected.packed) and torch.equal(gate_up.scales, expected.scales)
    intermediate = packed.intermediate_dim
    gate_state = gate_up.rows(0, intermediate).to_compressed_tensors()
    assert gate_state["weight_packed"].shape == (intermediate, 256 * 4 // 32)
    assert "gate_up_proj_packed_w4" in packed.state_dict()
