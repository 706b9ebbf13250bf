"""Reading a native moecompress folder tensor by tensor, and writing an export folder shard by shard.

Both exporters (:mod:`moecompress.export.compressed_tensors`, :mod:`moecompress.export.hf`) stream: they read one
MoE layer's packed experts (or one plain tensor) at a time with ``safetensors.safe_open``, convert it, and hand it
to a :class:`ShardWriter`, which flushes a shard once it holds ``max_shard_bytes``. Nothing ever holds the model.

The output is built in ``OUT/.export-partial`` and moved into ``OUT`` only when complete
(:func:`staged_output`): a failed export leaves ``OUT`` as it was (removed again if this export created it), and
nothing is ever written into the input folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecompress.errors import CheckpointError, UsageError
from moecompress.models.loading import validate_checkpoint
from moecompress.quantization.packing import PackedLinearWeight

INDEX_FILE = "model.safetensors.index.json"
PARTIAL_NAME = ".export-partial"
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
        """One tensor, read from its shard (the shard's handle stays open; tensors are not kept)."""
        name = self.file_of.get(key)
        if name is None:
            raise CheckpointError(f"{self.folder}: tensor {key} is missing; the folder is damaged, re-run the compression")
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name].get_tensor(key)

    def has(self, key: str) -> bool:
        return key in self.file_of

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
            from moecompress.export.native import build_meta_model
            import transformers

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
        index = self.folder / INDEX_FILE
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        file_of = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                file_of.update({key: path.name for key in handle.keys()})
        return file_of

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


class ShardWriter:
    """Collects tensors and writes ``model-0000i-of-0000N.safetensors`` shards of about ``max_shard_bytes``.

    ``finish()`` renames the shards to their final names (N is known only at the end) and writes the index."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 << 30) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0
        self.written: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.written:
            raise CheckpointError(f"export wrote tensor {key} twice; this is a moecompress bug, please report it")
        tensor = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[key] = tensor
        self.written.add(key)
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.folder / f".shard-{len(self.shards):05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give every shard its final name and write the index; returns the file names."""
        self.flush()
        count = len(self.shards)
        names = (["model.safetensors"] if count == 1
                 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        weight_map = {}
        for number, (name, keys) in enumerate(zip(names, self.shards)):
            os.replace(self.folder / f".shard-{number:05d}.safetensors", self.folder / name)
            weight_map.update({key: name for key in keys})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names


def check_output_folder(source: Path, out: Path) -> None:
    """``out`` must not be the input, inside it or contain it, and must be empty or new."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if out == source or source in out.parents:
        raise UsageError(f"--out {out} is inside the input folder {source}; export never writes into its input, pick "
                         "another folder")
    if out in source.parents:
        raise UsageError(f"--out {out} contains the input folder {source}; pick a folder beside it")
    if out.exists() and (not out.is_dir() or any(path.name != PARTIAL_NAME for path in out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty; pick a new folder or remove it")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield ``OUT/.export-partial`` to write into; on success its files move into ``OUT``. On failure the partial
    folder is removed, and ``OUT`` too if this export created it: nothing is left behind."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL_NAME
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        for path in sorted(partial.iterdir()):
            os.replace(path, out / path.name)
        partial.rmdir()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def expert_projection_names(model_type: str) -> tuple[str, str, str]:
    """Checkpoint names of an expert's gate, up and down projections (``w1, w3, w2`` for Mixtral), read from
    transformers' conversion mapping (the per-expert layout it fuses on load); ``gate_proj, up_proj, down_proj``
    for families without one."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    gate, up, down = "gate_proj", "up_proj", "down_proj"
    for converter in get_checkpoint_conversion_mapping(model_type) or []:
        sources = getattr(converter, "_original_source_patterns", None) or []
        targets = getattr(converter, "_original_target_patterns", None) or []
        names = [re.search(r"experts\.\*\.(\w+)\.weight$", source) for source in sources]
        if not targets or not all(names):
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(names) == 2:
            gate, up = names[0].group(1), names[1].group(1)
        elif targets[0].endswith("experts.down_proj") and len(names) == 1:
            down = names[0].group(1)
    return gate, up, down


def folder_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in ``folder`` (what a consumer downloads for the weights)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
