"""Reading a native moecompress folder tensor by tensor, for the exporters.

Both exporters (:mod:`moecompress.export.compressed_tensors`, :mod:`moecompress.export.hf`) stream: they read one
MoE layer's packed experts (or one plain tensor) at a time with ``safetensors.safe_open`` through a
:class:`NativeCheckpoint`, convert it, and hand it to a :class:`moecompress.checkpoint.shards.ShardWriter`. Nothing
ever holds the model.

Every floating-point tensor read (scales, norms, plain weights) is checked for NaN and infinity, so a damaged folder
is refused naming the tensor instead of being exported with NaN in it; integer tensors (packed codes, widths) were
checked against the format's dtypes when the folder was validated.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from moecompress.checkpoint.expert_names import expert_projection_names  # noqa: F401  (the exporters import it from here)
from moecompress.checkpoint.fingerprint import all_finite
from moecompress.checkpoint.headers import read_weight_map
from moecompress.checkpoint.native import build_meta_model
from moecompress.checkpoint.validation import validate_checkpoint
from moecompress.errors import CheckpointError
from moecompress.kernels.layout import PackedLinearWeight

# Files besides the weights that a consumer needs: tokenizer, generation defaults, chat template.
COPIED_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                        "chat_template*", "vocab.*", "merges.txt", "*.model", "preprocessor_config.json")
# Packed-experts buffers of moecompress.kernels.backend.PackedExperts: `{prefix}.{name}`.
_PACKED_EXPERTS_KEY = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?:expert_bits|expert_slot_w\d+|(?:gate_up_proj|down_proj)_(?:packed|scale|zero_point)_w\d+)$"
)


@dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer whose routed experts are packed (from the native ``quantization_config``).

    prefix: checkpoint key prefix of the experts module (``model.layers.3.mlp.experts``); expert_bits ``[E]``.
    """

    layer: int
    prefix: str
    expert_bits: tuple[int, ...]
    group_size: int
    symmetric: bool


@dataclass(frozen=True)
class PackedLinearSpec:
    """One packed linear (attention, shared expert, dense MLP) from the native ``quantization_config``."""

    path: str
    bits: int
    group_size: int
    symmetric: bool


class NativeCheckpoint:
    """A native moecompress output folder, opened for streaming (validated first: headers, shards, shapes).

    Raises :class:`CheckpointError` for a folder that is not a moecompress output, a damaged shard, or a
    ``quantization_config`` of another tool.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is not a folder; pass the --out folder of `moecompress compress`")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.folder} has no config.json; pass the --out folder of `moecompress compress`")
        try:
            self.config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{config_path} is not valid JSON ({error}); re-run the compression") from None
        self.quantization = self.config.get("quantization_config")
        if self.quantization is not None and self.quantization.get("quant_method") != "moecompress":
            raise CheckpointError(
                f"{self.folder} is already a {self.quantization.get('quant_method')!r} checkpoint; export reads "
                "moecompress outputs (the --out folder of `moecompress compress`)")
        if not self.is_moecompress_output():
            raise CheckpointError(
                f"{self.folder} is not a moecompress output (no moecompress quantization_config, edit record or "
                "report.json); export the --out folder of `moecompress compress`, not an original model")
        validate_checkpoint(self.folder)  # truncated / missing shards, shapes vs config: one clear error
        self.file_of = self._key_files()
        self._handles: dict[str, object] = {}
        self._layer_cache: tuple[str, dict[str, torch.Tensor]] = ("", {})

    # ----- what the folder holds --------------------------------------------------------------------------------
    def is_moecompress_output(self) -> bool:
        return (self.quantization is not None or bool(self.record)
                or (self.folder / "report.json").is_file())

    @property
    def text_config(self) -> dict:
        """The language model's config (the top level, or ``text_config`` of a vision-language model)."""
        return self.config.get("text_config") or self.config

    @property
    def record(self) -> dict:
        """``config.moecompress``: what the edits recorded (per-layer expert counts, variable widths, ...)."""
        return self.text_config.get("moecompress") or self.config.get("moecompress") or {}

    @property
    def model_type(self) -> str:
        return str(self.text_config.get("model_type") or self.config.get("model_type") or "")

    @property
    def expert_layers(self) -> list[ExpertLayer]:
        """Layers with packed experts, in layer order (their key prefix found among the checkpoint's keys)."""
        layers = (self.quantization or {}).get("layers") or {}
        prefixes = self._packed_prefixes()
        found = []
        for layer_key, spec in sorted(layers.items(), key=lambda item: int(item[0])):
            prefix = prefixes.get(int(layer_key))
            if prefix is None:
                raise CheckpointError(f"{self.folder}: quantization_config lists packed experts in layer {layer_key} "
                                      "but the safetensors hold none; the folder is damaged, re-run the compression")
            found.append(ExpertLayer(int(layer_key), prefix, tuple(int(b) for b in spec["expert_bits"]),
                                     int(spec["group_size"]), bool(spec["symmetric"])))
        return found

    @property
    def packed_linears(self) -> list[PackedLinearSpec]:
        linears = (self.quantization or {}).get("linears") or {}
        return [PackedLinearSpec(path, int(spec["bits"]), int(spec["group_size"]), bool(spec["symmetric"]))
                for path, spec in sorted(linears.items())]

    @property
    def is_quantized(self) -> bool:
        return bool(self.expert_layers or self.packed_linears)

    # ----- tensors ----------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.file_of)

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard (the shard's handle stays open; tensors are not kept); a floating-point
        tensor holding NaN or inf is an error (a damaged folder is never exported)."""
        tensor = self.tensor_handle(key).get_tensor(key)
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(f"{self.folder / self.file_of[key]}: tensor {key} holds NaN or infinite values; the "
                                  "folder is damaged, re-run the compression that wrote it (nothing was exported)")
        return tensor

    def has(self, key: str) -> bool:
        return key in self.file_of

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from its shard's header (no data read)."""
        return tuple(self.tensor_handle(key).get_slice(key).get_shape())

    def tensor_handle(self, key: str):
        """The open ``safe_open`` handle of the shard holding ``key``."""
        name = self.file_of.get(key)
        if name is None:
            raise CheckpointError(f"{self.folder}: tensor {key} is missing; the folder is damaged, re-run the compression")
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]

    def expert_weight(self, layer: ExpertLayer, expert: int, name: str) -> PackedLinearWeight:
        """Expert ``expert``'s packed ``gate_up_proj`` ``[2I, H]`` or ``down_proj`` ``[H, I]`` of ``layer``."""
        bits = layer.expert_bits[expert]
        slot = int(self._layer_tensor(layer, f"expert_slot_w{bits}")[expert])
        packed = self._layer_tensor(layer, f"{name}_packed_w{bits}")[slot]
        scales = self._layer_tensor(layer, f"{name}_scale_w{bits}")[slot]
        zeros = None if layer.symmetric else self._layer_tensor(layer, f"{name}_zero_point_w{bits}")[slot]
        if name == "gate_up_proj":
            in_features = int(self.text_config["hidden_size"])
        else:  # down_proj's input is the intermediate size: half of gate_up's rows
            in_features = int(self._layer_tensor(layer, f"gate_up_proj_packed_w{bits}").shape[-2]) // 2
        return PackedLinearWeight(packed, scales, zeros, bits, layer.group_size, (packed.shape[0], in_features))

    def _layer_tensor(self, layer: ExpertLayer, name: str) -> torch.Tensor:
        """A packed-experts buffer of ``layer``; the current layer's buffers stay cached (one layer in memory)."""
        if self._layer_cache[0] != layer.prefix:
            self._layer_cache = (layer.prefix, {})
        cache = self._layer_cache[1]
        if name not in cache:
            cache[name] = self.tensor(f"{layer.prefix}.{name}")
        return cache[name]

    def linear_weight(self, spec: PackedLinearSpec) -> PackedLinearWeight:
        packed = self.tensor(f"{spec.path}.weight_packed")
        scales = self.tensor(f"{spec.path}.weight_scale")
        zeros = None if spec.symmetric else self.tensor(f"{spec.path}.weight_zero_point")
        in_features = self.linear_in_features(spec.path)
        return PackedLinearWeight(packed, scales, zeros, spec.bits, spec.group_size, (packed.shape[0], in_features))

    def linear_in_features(self, path: str) -> int:
        """A packed linear's input width, from the model skeleton's shapes (a meta model: no memory)."""
        if not hasattr(self, "_linear_inputs"):
            config = transformers.AutoConfig.from_pretrained(self.folder)
            model = build_meta_model(config)
            self._linear_inputs = {spec.path: model.get_submodule(spec.path).in_features for spec in self.packed_linears}
        return self._linear_inputs[path]

    def _packed_prefixes(self) -> dict[int, str]:
        prefixes = {}
        for key in self.file_of:
            match = _PACKED_EXPERTS_KEY.match(key)
            if match:
                layer = re.search(r"layers\.(\d+)\.", match["prefix"])
                if layer:
                    prefixes[int(layer.group(1))] = match["prefix"]
        return prefixes

    def _key_files(self) -> dict[str, str]:
        return read_weight_map(self.folder)

    def copy_side_files(self, destination: Path) -> list[str]:
        """Copy the tokenizer, generation config and chat template files; returns their names."""
        copied = []
        for pattern in COPIED_FILE_PATTERNS:
            for path in sorted(self.folder.glob(pattern)):
                if path.is_file() and path.name not in copied:
                    shutil.copy2(path, destination / path.name)
                    copied.append(path.name)
        return copied

    def close(self) -> None:
        self._handles.clear()
        self._layer_cache = ("", {})


def is_packed_experts_key(key: str) -> bool:
    return bool(_PACKED_EXPERTS_KEY.match(key))
