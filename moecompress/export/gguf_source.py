"""What the GGUF exporter reads: a native moecompress folder (packed experts and linears, with their codes for the
exact paths) or an unquantized Hugging Face folder (an original model, or a moecompress output with no packed
weights), one tensor at a time.

Both give weights by their checkpoint names: :meth:`SourceModel.tensor` for plain tensors (norms, routers,
embeddings), :meth:`SourceModel.linear` for a linear's weight (packed or not) and :meth:`SourceModel.expert` for one
routed expert's gate / up / down projection. Experts are found per layer from the keys: a packed-experts module
(``...experts.expert_bits``) or per-expert keys (``...experts.{e}.{projection}.weight``, transformers' checkpoint
layout, with Mixtral's ``w1 / w3 / w2`` names from :func:`expert_projection_names`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moecompress.checkpoint.headers import read_weight_map
from moecompress.checkpoint.native_reader import NativeCheckpoint, expert_projection_names
from moecompress.checkpoint.validation import validate_safetensors
from moecompress.errors import CheckpointError
from moecompress.kernels.layout import PackedLinearWeight

_PACKED_EXPERTS = re.compile(r"^(?P<prefix>model\.layers\.(?P<layer>\d+)\..+\.experts)\.expert_bits$")
_PER_EXPERT = re.compile(r"^(?P<prefix>model\.layers\.(?P<layer>\d+)\..+\.experts)\.(?P<expert>\d+)\.(?P<name>\w+)\.weight$")


@dataclass
class Matrix:
    """One weight ``[out, in]``: its float32 values and, when the source holds it packed, the packed form (whose
    dequantization the values are)."""

    values: torch.Tensor
    packed: PackedLinearWeight | None = None

    def take_rows(self, index: torch.Tensor) -> "Matrix":
        """Rows reordered (a permutation or a subset): values and packed codes, scales and zero points alike."""
        if self.packed is None:
            return Matrix(self.values[index])
        packed = self.packed
        reordered = PackedLinearWeight(packed.packed[index], packed.scales[index],
                                       None if packed.zeros is None else packed.zeros[index], packed.bits,
                                       packed.group_size, (len(index), packed.shape[1]))
        return Matrix(self.values[index], reordered)


@dataclass(frozen=True)
class ExpertStack:
    """The routed experts of one MoE layer: key ``prefix`` (``model.layers.3.mlp.experts``), how many, and their
    packed widths (None: float weights) with the layer's scheme."""

    layer: int
    prefix: str
    count: int
    bits: tuple[int, ...] | None
    symmetric: bool = True
    group_size: int = 0


class SourceModel:
    """A model folder opened for the GGUF export (validated: headers, shards; a native folder also against its
    ``quantization_config``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"{self.folder} has no config.json; pass a model folder (the --out of `moecompress "
                                  "compress`, or a Hugging Face checkpoint folder)")
        self.config = json.loads((self.folder / "config.json").read_text())
        method = (self.config.get("quantization_config") or {}).get("quant_method")
        if method not in (None, "moecompress"):
            raise CheckpointError(f"{self.folder} is a {method!r} checkpoint; GGUF export reads moecompress outputs or "
                                  "unquantized Hugging Face folders")
        self.native = NativeCheckpoint(self.folder) if method == "moecompress" else None
        if self.native is None:
            validate_safetensors(self.folder)
        self.file_of = self.native.file_of if self.native else read_weight_map(self.folder)
        self._handles: dict[str, object] = {}
        self._packed_linears = {spec.path: spec for spec in self.native.packed_linears} if self.native else {}
        self.projection_names = dict(zip(("gate", "up", "down"), expert_projection_names(self.model_type)))

    # ----- what the folder holds ----------------------------------------------------------------------------------
    @property
    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config

    @property
    def model_type(self) -> str:
        return str(self.text_config.get("model_type") or self.config.get("model_type") or "")

    @property
    def record(self) -> dict:
        """``config.moecompress``: what moecompress's edits recorded (per-layer expert counts, variable widths)."""
        return self.text_config.get("moecompress") or self.config.get("moecompress") or {}

    @property
    def is_quantized(self) -> bool:
        return bool(self.native and self.native.is_quantized)

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype of the float weights (the embedding's)."""
        return self.tensor_dtype("model.embed_tokens.weight")

    def tensor_dtype(self, key: str) -> torch.dtype:
        """A tensor's dtype, from its header (no data read)."""
        name = self._handle(key).get_slice(key).get_dtype()
        return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(name, torch.float32)

    def keys(self) -> list[str]:
        return list(self.file_of)

    def expert_stacks(self) -> dict[int, ExpertStack]:
        """``{layer: ExpertStack}`` for every MoE layer, in layer order."""
        stacks: dict[int, ExpertStack] = {}
        packed = {layer.layer: layer for layer in (self.native.expert_layers if self.native else [])}
        per_expert: dict[int, tuple[str, set[int]]] = {}
        for key in self.file_of:
            match = _PER_EXPERT.match(key)
            if match:
                entry = per_expert.setdefault(int(match["layer"]), (match["prefix"], set()))
                entry[1].add(int(match["expert"]))
        for layer, (prefix, experts) in per_expert.items():
            if experts != set(range(len(experts))):
                raise CheckpointError(f"{self.folder}: the experts of layer {layer} are not numbered 0..{len(experts) - 1}"
                                      "; the folder is damaged, re-run the compression")
            stacks[layer] = ExpertStack(layer, prefix, len(experts), None)
        for layer, spec in packed.items():
            stacks[layer] = ExpertStack(layer, spec.prefix, len(spec.expert_bits), spec.expert_bits, spec.symmetric,
                                        spec.group_size)
        return dict(sorted(stacks.items()))

    # ----- tensors ------------------------------------------------------------------------------------------------
    def _handle(self, key: str):
        if self.native is not None:  # one reader of a native folder's shards: NativeCheckpoint's
            return self.native.tensor_handle(key)
        name = self.file_of.get(key)
        if name is None:
            raise CheckpointError(f"{self.folder}: tensor {key} is missing; the folder is damaged")
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]

    def tensor(self, key: str) -> torch.Tensor:
        """A plain tensor as stored (from a native folder through :meth:`NativeCheckpoint.tensor`, which refuses NaN
        and inf, as every export of a native folder does)."""
        if self.native is not None:
            return self.native.tensor(key)
        return self._handle(key).get_tensor(key)

    def tensor_shape(self, key: str) -> list[int]:
        """A plain tensor's shape, from its header."""
        return list(self._handle(key).get_slice(key).get_shape())

    def linear_shape(self, path: str) -> tuple[int, int]:
        """``(out, in)`` of linear ``path``, packed or not."""
        if path in self._packed_linears:
            return (self.tensor_shape(f"{path}.weight_packed")[0], self.native.linear_in_features(path))
        out_features, in_features = self.tensor_shape(f"{path}.weight")
        return out_features, in_features

    def expert_shape(self, stack: "ExpertStack", projection: str) -> tuple[int, int]:
        """``(out, in)`` of one expert's projection."""
        if stack.bits is None:
            out_features, in_features = self.tensor_shape(f"{stack.prefix}.0.{self.projection_names[projection]}.weight")
            return out_features, in_features
        return tuple(self.expert(stack, 0, projection).values.shape)

    def linear(self, path: str) -> Matrix:
        """The weight of linear ``path`` (``model.layers.0.self_attn.q_proj``): packed or plain."""
        spec = self._packed_linears.get(path)
        if spec is None:
            return Matrix(self.tensor(f"{path}.weight").float())
        packed = self.native.linear_weight(spec)
        return Matrix(packed.dequantize(torch.float32), packed)

    def linear_scheme(self, path: str) -> tuple[int, bool, int] | None:
        """``(bits, symmetric, group_size)`` of a packed linear, None for a float one."""
        spec = self._packed_linears.get(path)
        return None if spec is None else (spec.bits, spec.symmetric, spec.group_size)

    def expert(self, stack: ExpertStack, expert: int, projection: str) -> Matrix:
        """Expert ``expert``'s ``gate`` / ``up`` ``[I, H]`` or ``down`` ``[H, I]`` projection."""
        if stack.bits is None:
            return Matrix(self.tensor(f"{stack.prefix}.{expert}.{self.projection_names[projection]}.weight").float())
        layer = next(layer for layer in self.native.expert_layers if layer.prefix == stack.prefix)
        if projection == "down":
            packed = self.native.expert_weight(layer, expert, "down_proj")
        else:
            gate_up = self.native.expert_weight(layer, expert, "gate_up_proj")
            middle = gate_up.shape[0] // 2
            packed = gate_up.rows(0, middle) if projection == "gate" else gate_up.rows(middle, 2 * middle)
        return Matrix(packed.dequantize(torch.float32), packed)

    def close(self) -> None:
        self._handles.clear()
        if self.native is not None:
            self.native.close()
