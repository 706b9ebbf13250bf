"""Packed experts as a transformers experts backend.

:class:`PackedExperts` replaces a fused experts module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) with
packed low-bit weights, possibly a different bit-width per expert. Its forward follows the model's
``config._experts_implementation``, like transformers' own experts classes:

* ``"moecompress_packed"`` (registered in ``ExpertsInterface`` by :func:`register_packed_experts_backend`): the Triton
  grouped kernel when Triton can run on the activations' device (a GPU, or ``TRITON_INTERPRET=1`` on CPU), else the
  torch reference; a launch failing with "0 active drivers" drops to the torch path once, with a warning.
* anything else (``eager``; ``grouped_mm`` cannot read packed weights): the torch reference (dequantise per expert).

State-dict names (one stack per bit-width ``b`` present in the layer; ``E_b`` experts of that width):
    ``expert_bits`` int32 ``[E]``
    ``expert_slot_w{b}`` int32 ``[E]`` (slot in the stack, -1 if the expert has another width)
    ``gate_up_proj_packed_w{b}`` int32 ``[E_b, 2I, ceil(H*b/32)]``, ``gate_up_proj_scale_w{b}`` ``[E_b, 2I, G_H]``,
    ``gate_up_proj_zero_point_w{b}`` int8 ``[E_b, 2I, G_H]`` (asymmetric only), and the same for ``down_proj``
    (``[E_b, H, ceil(I*b/32)]``, ``[E_b, H, G_I]``).
Each matrix row is a compressed-tensors pack-quantized row, so per-expert ``gate_proj``/``up_proj``/``down_proj``
``weight_packed``/``weight_scale``/``weight_zero_point`` keys are slices (:meth:`PackedExperts.expert_linear`).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moecompress.errors import MoECompressError, UnsupportedModelError
from moecompress.kernels.layout import PackedLinearWeight, num_groups, packed_width
from moecompress.kernels.reference import moe_experts_reference
from moecompress.kernels.runtime import is_missing_driver_error, triton_available

BACKEND_NAME = "moecompress_packed"


def _is_silu(act_fn: Callable) -> bool:
    if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ in ("SiLU", "SiLUActivation"):
        return True
    return act_fn is F.silu


class PackedExperts(nn.Module):
    """Routed experts of one MoE block with packed weights. forward(hidden ``[T, H]``, index/weights ``[T, k]``)."""

    def __init__(
        self,
        gate_up: list[PackedLinearWeight],
        down: list[PackedLinearWeight],
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        config=None,
    ) -> None:
        super().__init__()
        if not gate_up or len(gate_up) != len(down):
            raise MoECompressError("PackedExperts needs one packed gate_up and one packed down weight per expert")
        self.num_experts = len(gate_up)
        self.intermediate_dim = gate_up[0].shape[0] // 2
        self.hidden_dim = gate_up[0].shape[1]
        self.group_size = gate_up[0].group_size
        self.symmetric = gate_up[0].symmetric
        for expert, (gu, dn) in enumerate(zip(gate_up, down)):
            if gu.shape != (2 * self.intermediate_dim, self.hidden_dim) or dn.shape != (self.hidden_dim, self.intermediate_dim):
                raise MoECompressError(f"expert {expert}: shapes {gu.shape}/{dn.shape} differ from expert 0's")
            if gu.bits != dn.bits or {gu.group_size, dn.group_size} != {self.group_size} or (
                gu.symmetric, dn.symmetric) != (self.symmetric, self.symmetric):
                raise MoECompressError(
                    f"expert {expert}: gate_up and down must share bits, and all experts of a layer one group size "
                    "and symmetry; quantize the layer with one scheme per expert"
                )
        self.act_fn = act_fn
        self.config = config
        self.fuse_silu_glu = _is_silu(act_fn)
        # Python ints decide the layout: under a meta-device context (a loader's skeleton) tensors hold no data
        widths = [w.bits for w in gate_up]
        self.register_buffer("expert_bits", torch.tensor(widths, dtype=torch.int32))
        for width in sorted(set(widths)):
            members = [e for e in range(self.num_experts) if widths[e] == width]
            slot = torch.full((self.num_experts,), -1, dtype=torch.int32)
            slot[members] = torch.arange(len(members), dtype=torch.int32)
            self.register_buffer(f"expert_slot_w{width}", slot)
            for name, weights in (("gate_up_proj", gate_up), ("down_proj", down)):
                self.register_buffer(f"{name}_packed_w{width}", torch.stack([weights[e].packed for e in members]))
                self.register_buffer(f"{name}_scale_w{width}", torch.stack([weights[e].scales for e in members]))
                if not self.symmetric:
                    self.register_buffer(f"{name}_zero_point_w{width}", torch.stack([weights[e].zeros for e in members]))
        self._driver_missing = False

    @classmethod
    def skeleton(cls, expert_bits: list[int], hidden_dim: int, intermediate_dim: int, *, group_size: int,
                 symmetric: bool, act_fn, config=None, scale_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "meta") -> "PackedExperts":
        """Empty packed experts of the given shapes and widths (on ``meta`` by default), for a loader to fill.

        expert_bits ``[E]`` widths; every tensor has the shape a quantised module of that layout saves.
        """
        def empty(bits: int, out_features: int, in_features: int) -> PackedLinearWeight:
            groups = num_groups(in_features, group_size)
            return PackedLinearWeight(
                torch.empty(out_features, packed_width(in_features, bits), dtype=torch.int32, device=device),
                torch.empty(out_features, groups, dtype=scale_dtype, device=device),
                None if symmetric else torch.empty(out_features, groups, dtype=torch.int8, device=device),
                bits, group_size, (out_features, in_features),
            )

        gate_up = [empty(bits, 2 * intermediate_dim, hidden_dim) for bits in expert_bits]
        down = [empty(bits, hidden_dim, intermediate_dim) for bits in expert_bits]
        return cls(gate_up, down, act_fn, config)

    # ----- packed views -----------------------------------------------------------------------------------------
    @property
    def bit_widths(self) -> list[int]:
        """Distinct widths, from the buffer names (no device read: forward stays CUDA-graph capturable)."""
        return sorted(int(name.rsplit("_w", 1)[1]) for name, _ in self.named_buffers() if name.startswith("expert_slot_w"))

    def stack(self, name: str, width: int) -> PackedLinearWeight:
        """All experts of one width for ``gate_up_proj`` or ``down_proj``: packed ``[E_b, N, K]``."""
        out_features, in_features = (
            (2 * self.intermediate_dim, self.hidden_dim) if name == "gate_up_proj" else (self.hidden_dim, self.intermediate_dim)
        )
        zeros = None if self.symmetric else getattr(self, f"{name}_zero_point_w{width}")
        return PackedLinearWeight(
            getattr(self, f"{name}_packed_w{width}"), getattr(self, f"{name}_scale_w{width}"), zeros,
            width, self.group_size, (out_features, in_features),
        )

    def expert_linear(self, expert: int, name: str) -> PackedLinearWeight:
        """One expert's ``gate_up_proj`` ``[2I, H]`` or ``down_proj`` ``[H, I]`` (slice ``rows()`` for gate/up)."""
        width = int(self.expert_bits[expert])
        slot = int(getattr(self, f"expert_slot_w{width}")[expert])
        return self.stack(name, width).select(slot)

    def parameter_counts(self) -> dict[int, int]:
        """``{id(buffer): weights it encodes}``: each packed stack counts its ``E_b x out x in`` weights; scales, zero
        points and bookkeeping buffers count 0 (they are overhead, counted in bytes, not parameters)."""
        counts = {id(buffer): 0 for buffer in self.buffers(recurse=False)}
        for width in self.bit_widths:
            for name in ("gate_up_proj", "down_proj"):
                stack = self.stack(name, width)
                counts[id(stack.packed)] = stack.packed.shape[0] * stack.shape[0] * stack.shape[1]
        return counts

    def expert_stacks(self, name: str):
        from moecompress.kernels.triton_moe import PackedExpertStack  # imports triton (the optional kernels extra)

        return [PackedExpertStack(self.stack(name, w), getattr(self, f"expert_slot_w{w}")) for w in self.bit_widths]

    def extra_repr(self) -> str:
        counts = {w: int((self.expert_bits == w).sum()) for w in self.bit_widths}
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"experts_per_bit_width={counts}, group_size={self.group_size}, symmetric={self.symmetric}"
        )

    # ----- compute ----------------------------------------------------------------------------------------------
    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward_reference(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """Torch path: dequantise each hit expert and run the eager loop."""
        gate_up = [self.expert_linear(e, "gate_up_proj") for e in range(self.num_experts)]
        down = [self.expert_linear(e, "down_proj") for e in range(self.num_experts)]
        return moe_experts_reference(hidden_states, top_k_index, top_k_weights, gate_up, down, self._apply_gate)

    def forward_triton(self, hidden_states, top_k_index, top_k_weights, config: dict[str, int] | None = None):
        """Triton path (raises when Triton cannot launch)."""
        from moecompress.kernels.triton_moe import moe_experts_triton  # imports triton (the optional kernels extra)

        return moe_experts_triton(
            hidden_states, top_k_index, top_k_weights,
            self.expert_stacks("gate_up_proj"), self.expert_stacks("down_proj"),
            self.num_experts, self.intermediate_dim,
            fuse_silu_glu=self.fuse_silu_glu, apply_gate=self._apply_gate, config=config,
        )

    def forward_packed(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """Kernels where Triton can run, the torch path otherwise."""
        if not self._driver_missing and triton_available(hidden_states.device):
            try:
                return self.forward_triton(hidden_states, top_k_index, top_k_weights)
            except RuntimeError as error:
                if not is_missing_driver_error(error):
                    raise
                self._driver_missing = True
                warnings.warn("Triton found no GPU driver; packed experts run on the torch reference path", stacklevel=2)
        return self.forward_reference(hidden_states, top_k_index, top_k_weights)

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """``moecompress_packed``: kernels; ``eager`` / ``grouped_mm`` / ...: the torch path; another backend
        registered in ``ExpertsInterface`` (moecompress's calibration backend) receives this module, so statistics
        and Hessians can be collected on a quantised model through its uniform view."""
        implementation = getattr(self.config, "_experts_implementation", None)
        if implementation == BACKEND_NAME:
            return packed_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if implementation not in _TORCH_PATH_IMPLEMENTATIONS:
            # heavy (pulls torch.distributed.tensor): `import moecompress` registers the native format through this
            # module and must stay light
            from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

            if implementation in ALL_EXPERTS_FUNCTIONS:
                return ALL_EXPERTS_FUNCTIONS[implementation](self, hidden_states, top_k_index, top_k_weights)
        return self.forward_reference(hidden_states, top_k_index, top_k_weights)


# transformers' own backends read fused float tensors, which packed experts do not have: the torch path stands in.
_TORCH_PATH_IMPLEMENTATIONS = (None, "eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe")


def packed_experts_forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The ``moecompress_packed`` experts backend: ``self`` is the experts module of a block.

    Packed experts run on the kernels; experts left unpacked (a layer kept in full precision) run their class's
    eager forward, the fastest torch path on CPU and correct everywhere.
    """
    if isinstance(self, PackedExperts):
        return self.forward_packed(hidden_states, top_k_index, top_k_weights)
    eager_forward = getattr(type(self).forward, "__wrapped__", None)
    if eager_forward is None:
        raise UnsupportedModelError(
            f"{type(self).__name__} is not a transformers experts class; set experts_implementation='eager'"
        )
    return eager_forward(self, hidden_states, top_k_index, top_k_weights)


def register_packed_experts_backend() -> str:
    """Register ``moecompress_packed`` in transformers' ``ExpertsInterface`` (idempotent); returns the name."""
    # heavy (pulls torch.distributed.tensor): only when a packed model is built, not on `import moecompress`
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(BACKEND_NAME, packed_experts_forward)
    return BACKEND_NAME
