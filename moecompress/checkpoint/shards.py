"""Writing checkpoints shard by shard: one decoder layer at a time (the streamed compress run, :class:`LayerFiles`
and :func:`write_checkpoint`), or a stream of tensors cut into shards of a given size (the exports,
:class:`ShardWriter`).

A streamed run never holds the whole model: each decoder layer is loaded, edited, quantised and staged on disk by
:class:`LayerFiles` (``layer-00003.safetensors``: the layer's state dict under its in-memory names, and
``layer-00003.json``: what the run recorded about it), then released. :func:`write_checkpoint` then turns the staged
layers into an ordinary Hugging Face folder, one shard per decoder layer plus one for everything else (embeddings,
final norm, ``lm_head``, read from the source checkpoint), each shard written under a temporary name and renamed:

* keys are reverted to the checkpoint layout with transformers' own ``revert_weight_conversion``, as
  ``save_pretrained`` does (fused experts -> per-expert keys where the family's checkpoints use them);
* ``model.safetensors.index.json`` maps every key to its shard; ``config.json`` comes from the edited model's
  config (with the native ``quantization_config`` when the layers hold packed modules or differ in expert count).

Over several ranks (:mod:`moecompress.distributed`), shard ``i`` is written by rank ``i % world size``; rank 0
gathers the ranks' key maps and writes the index, ``config.json`` and the tokenizer once.

The staged files make a stopped run resumable: a layer whose files are complete (its JSON is written last) is not
processed again (only reloaded, to propagate the calibration inputs through it). A staged layer found damaged on
resume (its JSON unreadable, its safetensors file missing, truncated or of another size than recorded) is a
:class:`CheckpointError` naming the file and the fix, never a traceback or a silently different model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from moecompress.checkpoint.headers import INDEX_FILE, read_safetensors_header
from moecompress.checkpoint.lazy import release_module
from moecompress.distributed import World, current_world
from moecompress.errors import CheckpointError
from moecompress.folders import write_text_atomic
from moecompress.models.families import decoder_layers


_FILE_BYTES = "_staged_file_bytes"  # in a staged layer's JSON: the size its safetensors file was written with


class LayerFiles:
    """Finished decoder layers staged on disk, valid for one ``fingerprint`` (what decided their content: stage
    options, calibration data, earlier decisions). A folder with another fingerprint is emptied."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        marker = self.folder / "fingerprint.txt"
        if self.folder.exists() and (not marker.is_file() or marker.read_text() != fingerprint):
            shutil.rmtree(self.folder)  # another configuration: start over
        self.folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)

    def _stem(self, layer_index: int) -> Path:
        return self.folder / f"layer-{layer_index:05d}"

    def save(self, layer_index: int, layer: nn.Module, metadata: dict[str, Any]) -> None:
        """Stage ``layer``'s state dict and ``metadata``; the JSON is written last, so its presence marks the layer
        complete even if the process dies in between."""
        stem = self._stem(layer_index)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in layer.state_dict().items()}
        save_file(tensors, f"{stem}.safetensors.tmp")
        os.replace(f"{stem}.safetensors.tmp", f"{stem}.safetensors")
        record = {**metadata, _FILE_BYTES: Path(f"{stem}.safetensors").stat().st_size}
        Path(f"{stem}.json.tmp").write_text(json.dumps(record))
        os.replace(f"{stem}.json.tmp", f"{stem}.json")

    def metadata(self, layer_index: int) -> dict[str, Any] | None:
        """What :meth:`save` recorded for the layer, or None when it is not (completely) staged; a staged layer
        whose files are damaged is a :class:`CheckpointError` saying which file and what to do."""
        stem = self._stem(layer_index)
        path = Path(f"{stem}.json")
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as error:
            raise self._damaged(path, f"its record is unreadable ({error})") from None
        tensors = Path(f"{stem}.safetensors")
        if not tensors.is_file():
            raise self._damaged(tensors, "it is missing")
        expected = record.pop(_FILE_BYTES, None)
        if expected is not None and tensors.stat().st_size != expected:
            raise self._damaged(tensors, f"it has {tensors.stat().st_size} bytes, {expected} were written")
        try:
            read_safetensors_header(tensors)
        except CheckpointError as error:
            raise self._damaged(tensors, str(error).split(" is corrupt: ", 1)[-1].rstrip(".")) from None
        return record

    def _damaged(self, path: Path, problem: str) -> CheckpointError:
        return CheckpointError(
            f"{path}, a decoder layer staged by the stopped run, is damaged: {problem}. Delete the folder "
            f"{self.folder} (its layers are made again; or delete the whole partial folder to start the run over), "
            "then re-run the same command")

    def tensors(self, layer_index: int, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The staged state dict of the layer (names relative to the layer)."""
        return load_file(f"{self._stem(layer_index)}.safetensors", device=device)

    def remove(self, layer_index: int) -> None:
        stem = self._stem(layer_index)
        Path(f"{stem}.safetensors").unlink(missing_ok=True)
        Path(f"{stem}.json").unlink(missing_ok=True)


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_checkpoint(model: nn.Module, layer_files: LayerFiles, checkpoint, folder: Path, *,
                     dtype: torch.dtype, tokenizer=None, source_folder: Path | None = None,
                     world: World | None = None) -> dict[str, int]:
    """Write ``model`` (a meta skeleton whose structure matches the staged layers) into ``folder`` from the staged
    decoder layers and the source ``checkpoint`` (a :class:`moecompress.checkpoint.lazy.LazyCheckpoint`, for
    the tensors outside the decoder layers). The staged layers are kept (the caller removes them once the whole
    folder is written: a run stopped in between resumes from them). Over several ranks each writes its shards and
    rank 0 the index (every rank must call this). Returns ``{shard file: bytes}``.
    """
    world = world or current_world()
    layers = decoder_layers(model)
    layers_path = next(name for name, module in model.named_modules() if module is layers)
    total = len(layers) + 1
    weight_map: dict[str, str] = {}
    for layer_index in range(len(layers)):
        if (layer_index + 1) % world.size != world.rank:
            continue
        name = shard_name(layer_index + 1, total)
        if layer_files.metadata(layer_index) is None:
            raise FileNotFoundError(f"decoder layer {layer_index} was not staged in {layer_files.folder}")
        prefix = f"{layers_path}.{layer_index}."
        state = {prefix + key: tensor for key, tensor in layer_files.tensors(layer_index).items()}
        weight_map.update(_write_shard(model, state, folder, name))
    if world.is_main:  # shard 0: the tensors outside the decoder layers
        weight_map.update(_write_shard(model, _outside_layers_state(model, layers, checkpoint, dtype), folder,
                                       shard_name(0, total)))
    weight_map = {key: name for part in world.all_gather_objects(weight_map) for key, name in part.items()}
    if not world.is_main:
        return {f: (folder / f).stat().st_size for f in sorted(set(weight_map.values()))}
    index = {"metadata": {"total_size": sum((folder / f).stat().st_size for f in set(weight_map.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    write_text_atomic(folder / INDEX_FILE, json.dumps(index, indent=2))
    model.config.save_pretrained(folder)
    if source_folder is not None and (source_folder / "generation_config.json").is_file():
        shutil.copyfile(source_folder / "generation_config.json", folder / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return {f: (folder / f).stat().st_size for f in sorted(set(weight_map.values()))}


def _outside_layers_state(model: nn.Module, layers: nn.ModuleList, checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Embeddings, final norm, ``lm_head``, ...: read from the source checkpoint (they are never edited), minus
    the tied copies ``save_pretrained`` leaves out."""
    state: dict[str, torch.Tensor] = {}
    for path, module in _modules_outside(model, layers):
        if not module.state_dict():
            continue
        prefix = f"{path}." if path else ""
        if _tied_to_embeddings(model, path):
            continue
        checkpoint.load_module(module, prefix, dtype=dtype, device="cpu")
        state.update({prefix + key: tensor.detach().clone() for key, tensor in module.state_dict().items()})
        release_module(module)
    return state


def _modules_outside(root: nn.Module, layers: nn.ModuleList, path: str = "") -> list[tuple[str, nn.Module]]:
    """The largest submodules of ``root`` that do not contain the decoder layers (``[(path, module)]``)."""
    found = []
    for name, child in root.named_children():
        child_path = f"{path}.{name}" if path else name
        if child is layers:
            continue
        if any(module is layers for module in child.modules()):
            found += _modules_outside(child, layers, child_path)
        else:
            found.append((child_path, child))
    if any(True for _ in root.named_parameters(recurse=False)) or any(True for _ in root.named_buffers(recurse=False)):
        raise NotImplementedError(f"{type(root).__name__} holds tensors outside its submodules; not streamable")
    return found


def _tied_to_embeddings(model: nn.Module, path: str) -> bool:
    """Is the module at ``path`` the output embedding of a model that ties it to the input embedding?"""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(model.config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
        return False
    output = model.get_output_embeddings()
    return output is not None and output is model.get_submodule(path)


def _write_shard(model: nn.Module, state: dict[str, torch.Tensor], folder: Path, name: str) -> dict[str, str]:
    """Write ``state`` (in-memory names) as shard ``name`` in the checkpoint layout; returns ``{key: name}``."""
    state = revert_weight_conversion(model, state)
    temp = folder / f".{name}.tmp"
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(temp), metadata={"format": "pt"})
    os.replace(temp, folder / name)
    return {key: name for key in state}


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
