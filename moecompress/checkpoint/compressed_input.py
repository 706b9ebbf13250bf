"""compressed-tensors folders as input: ours (``moecompress export --format compressed-tensors``) and
llm-compressor's, read as the plain checkpoint they decompress to.

A compressed module ``M`` is stored as ``M.weight_packed`` (``pack-quantized``) or a quantized ``M.weight``
(``int-quantized`` / ``naive-quantized`` / ``float-quantized``), with ``M.weight_scale``, ``M.weight_shape`` and,
asymmetric, ``M.weight_zero_point``. :class:`CompressedTensorsFolder` presents such a folder as the plain checkpoint
it decompresses to: one virtual key ``M.weight`` per compressed module, whose tensor is decompressed on read by the
library's own compressor for that format (``BaseCompressor.get_value_from_registry(format).decompress``, what
transformers calls) with the scheme of the config group whose targets match ``M`` (compressed-tensors'
``match_name``; a class-name target such as ``Linear`` covers the module otherwise, as it was a Linear when
compressed). Unlike transformers, every module gets its own group's scheme, so per-layer mixed exports read exactly
too, and the scales are taken in float32: the weights are our dequantized weights bit for bit (transformers decodes
them in the scales' dtype, bf16).

Per-expert projections are renamed to the family's checkpoint names (llm-compressor writes Mixtral's experts as
``block_sparse_moe.experts.{j}.gate_proj``; transformers' Mixtral mapping reads ``w1`` / ``w3`` / ``w2``), so the
validation and the lazy reader fuse them as for any plain checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from compressed_tensors.utils.match import is_match, match_name
from safetensors import safe_open
from torch import nn

from moecompress.checkpoint.expert_names import expert_projection_names
from moecompress.checkpoint.headers import read_weight_map
from moecompress.errors import CheckpointError

# Tensors of one compressed module besides its weight (compressed-tensors' names).
_COMPRESSION_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                      "weight_global_scale")
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts\.\d+)\.(?P<projection>\w+)\.(?P<rest>weight|bias)$")
_ROLES = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}


class CompressedTensorsFolder:
    """A compressed-tensors checkpoint folder seen as plain tensors (see the module docstring).

    ``weight_map``: ``{plain key: file}`` (virtual ``M.weight`` keys for compressed modules, every other tensor as
    stored, per-expert names in the family's spelling); :meth:`read` returns one tensor, decompressed if needed.
    """

    def __init__(self, folder: str | Path, config: dict | None = None) -> None:
        self.folder = Path(folder)
        config = config if config is not None else json.loads((self.folder / "config.json").read_text())
        text_config = config.get("text_config") or config
        try:
            self.quantization = QuantizationConfig.model_validate(config["quantization_config"])
        except Exception as error:  # pydantic's errors are long: one line naming the fix
            raise CheckpointError(f"{self.folder}/config.json: the compressed-tensors quantization_config cannot be "
                                  f"read ({type(error).__name__}: {str(error).splitlines()[0]}); re-export the "
                                  "folder") from None
        names = expert_projection_names(str(text_config.get("model_type") or config.get("model_type") or ""))
        disk = read_weight_map(self.folder)
        compressed = sorted({key.rsplit(".", 1)[0] for key in disk
                             if key.endswith((".weight_packed", ".weight_scale"))})
        self.modules: dict[str, dict[str, tuple[str, str]]] = {}  # plain module name -> {part: (file, disk key)}
        self.weight_map: dict[str, str] = {}
        self._disk_key: dict[str, str] = {}  # plain key -> key on disk (uncompressed tensors)
        for module in compressed:
            parts = {name: (disk[f"{module}.{name}"], f"{module}.{name}") for name in (*_COMPRESSION_PARTS, "weight")
                     if f"{module}.{name}" in disk}
            plain = _family_spelling(f"{module}.weight", names)
            self.modules[plain] = parts
            self.weight_map[plain] = parts.get("weight_packed", parts.get("weight"))[0]
        taken = {part[1] for parts in self.modules.values() for part in parts.values()}
        for key, file in disk.items():
            if key not in taken:
                plain = _family_spelling(key, names)
                self.weight_map[plain], self._disk_key[plain] = file, key
        self._handles: dict[str, object] = {}

    # ----- reading ------------------------------------------------------------------------------------------------
    def read(self, key: str) -> torch.Tensor:
        """The tensor of plain key ``key``: a compressed module's weight decompressed (float32, exact), any other
        tensor as stored."""
        if key in self.modules:
            return self.decompress(key)
        return self._tensor(self.weight_map[key], self._disk_key[key])

    def decompress(self, key: str) -> torch.Tensor:
        """Module ``key`` (``M.weight``) decompressed by compressed-tensors with its own group's scheme; the scales
        in float32, so the product is exact (see the module docstring)."""
        parts = self.modules[key]
        state = {name: self._tensor(file, disk_key) for name, (file, disk_key) in parts.items()}
        scheme = self.scheme_for(parts.get("weight_packed", parts.get("weight"))[1].rsplit(".", 1)[0])
        for name in ("weight_scale", "weight_global_scale"):
            if name in state and state[name].is_floating_point():
                state[name] = state[name].float()
        compressor = BaseCompressor.get_value_from_registry(scheme.format or self.quantization.format)
        try:
            weight = compressor.decompress(state, scheme)["weight"]
        except Exception as error:  # a damaged module: one line naming it
            raise CheckpointError(f"{self.folder}: compressed-tensors cannot decompress {key} with its config group "
                                  f"({type(error).__name__}: {error}); the folder is damaged or its config.json "
                                  "does not describe its tensors") from None
        return weight.float()

    def scheme_for(self, module: str) -> QuantizationScheme:
        """The config group of a compressed module: the first whose targets name it (exact name or ``re:``), else
        the first with a class-name target (``Linear``), as compressed-tensors matches a Linear module."""
        groups = list(self.quantization.config_groups.values())
        for group in groups:
            if any(match_name(module, target) for target in group.targets):
                return group
        linear = nn.Linear(1, 1, device="meta")
        for group in groups:
            if is_match(module, linear, group.targets):
                return group
        raise CheckpointError(f"{self.folder}: the compressed module {module} matches no config group of its "
                              "quantization_config; the folder is damaged or was edited")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{plain key: shape}``: a compressed weight's shape from its ``weight_shape`` (a tiny tensor) or, without
        one, its quantized ``weight``; other tensors from the headers."""
        shapes = {}
        for key, file in self.weight_map.items():
            parts = self.modules.get(key)
            if parts is None:
                shapes[key] = tuple(self._handle(file).get_slice(self._disk_key[key]).get_shape())
            elif "weight_shape" in parts:
                shapes[key] = tuple(int(size) for size in self._tensor(*parts["weight_shape"]).tolist())
            else:
                shapes[key] = tuple(self._handle(parts["weight"][0]).get_slice(parts["weight"][1]).get_shape())
        return shapes

    def _tensor(self, file: str, disk_key: str) -> torch.Tensor:
        return self._handle(file).get_tensor(disk_key)

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self._handles[file]

    def close(self) -> None:
        self._handles.clear()


def _family_spelling(key: str, names: tuple[str, str, str]) -> str:
    """``...experts.3.gate_proj.weight`` -> ``...experts.3.w1.weight`` for a family that spells it ``w1``."""
    match = _PER_EXPERT.match(key)
    if match is None or match["projection"] not in _ROLES:
        return key
    return f"{match['prefix']}.{names[_ROLES[match['projection']]]}.{match['rest']}"
