"""The grouped Triton kernels of variable-width experts (TRITON_INTERPRET=1 on CPU, set by conftest without a GPU)
against the torch path, on tiny shapes: prefill blocks and decode (one pair per block), widths that do not fill
a tile, and an expert nobody routes to."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moecompress.kernels.backend import BACKEND_NAME
from moecompress.kernels.runtime import triton_available
from moecompress.kernels.variable_width import VariableWidthExperts


def _experts(widths, hidden=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    gate = [torch.randn(w, hidden, generator=generator) / 4 for w in widths]
    up = [torch.randn(w, hidden, generator=generator) / 4 for w in widths]
    down = [torch.randn(hidden, w, generator=generator) / 4 for w in widths]
    return VariableWidthExperts.from_dense(gate, up, down, nn.SiLU())


@pytest.mark.parametrize("tokens", [3, 40])  # decode (BLOCK_M 1) and prefill (blocks of 16)
def test_triton_variable_width_experts_match_the_torch_path(tokens):
    if not triton_available("cpu") and not torch.cuda.is_available():
        pytest.fail("Triton cannot run: conftest should set TRITON_INTERPRET=1 without a GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = _experts([5, 37, 16, 1, 20]).to(device)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, 24, generator=generator).to(device)
    index = torch.randint(0, 4, (tokens, 2), generator=generator)  # expert 4 is never routed
    index[:, 1] = (index[:, 0] + 1 + torch.randint(0, 3, (tokens,), generator=generator)) % 4
    weights = torch.softmax(torch.randn(tokens, 2, generator=generator), dim=-1)
    index, weights = index.to(device), weights.to(device)
    expected = module(hidden, index, weights)  # no config: the torch path
    module.config = type("Config", (), {"_experts_implementation": BACKEND_NAME})()
    assert module._use_triton(hidden.device)
    torch.testing.assert_close(module(hidden, index, weights), expected, rtol=1e-4, atol=1e-5)
