"""Is this a checkpoint moecompress can read? The one validation every command runs, reading headers only.

Order of checks, cheapest first, so that a bad input fails before gigabytes are read: the folder (or hub id)
resolves and has a ``config.json``; :func:`validate_checkpoint`: every safetensors file the folder has (or its index
names) exists and has a readable header whose tensors fit in the file, and the tensors the headers list are exactly
the ones the config's model needs, with its shapes (a missing tensor, or weights of another architecture than the
config names, fail here). Keys are mapped the way transformers maps them on load (its conversion mapping), and the
same mapping serves readers that load tensors themselves (:func:`disk_key_renames`).

``inspect``, ``eval`` and ``compress`` (the latter through :func:`resolve_checkpoint`) all run it. A
compressed-tensors folder is checked as the plain checkpoint it decompresses to
(:mod:`moecompress.checkpoint.compressed_input`: one ``weight`` per compressed module, shaped by its
``weight_shape``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import transformers
from huggingface_hub import snapshot_download
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from moecompress.checkpoint.headers import INDEX_FILE, first_names, read_safetensors_header
from moecompress.checkpoint.native import build_meta_model
from moecompress.errors import CheckpointError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def local_checkpoint_folder(source: str | Path) -> Path | None:
    """``source`` as a local folder, None for a hub id; a path-looking source that does not exist is an error."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; give the checkpoint folder that holds config.json and the weights.")
    text = str(source)
    looks_like_hub_id = text.count("/") <= 1 and not text.startswith((".", "/", "~")) and os.sep + os.sep not in text
    if not looks_like_hub_id:
        raise CheckpointError(f"checkpoint folder {path} does not exist; check the path.")
    return None


def load_config(source: str | Path) -> transformers.PretrainedConfig:
    """The transformers config of ``source`` with clear errors for a missing folder or config."""
    local = local_checkpoint_folder(source)
    if local is not None and not (local / "config.json").is_file():
        raise CheckpointError(
            f"{local} has no config.json; point to a checkpoint folder saved with save_pretrained (config.json, "
            "*.safetensors, tokenizer files)."
        )
    try:
        return transformers.AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        if local is None:
            raise CheckpointError(
                f"{source!s} is neither an existing folder nor a hub id that can be loaded: {error}. Give a "
                "checkpoint folder, or a hub id that is cached (no network: HF_HUB_OFFLINE may be set)."
            ) from error
        raise CheckpointError(f"{local}/config.json cannot be read: {error}") from error


def resolve_checkpoint(source: str | Path) -> Path:
    """A local folder with ``config.json`` and safetensors, or a hub id resolved through the local HF cache; either
    way checked by :func:`validate_checkpoint` (headers, shards, weights vs config)
    before any tensor is read, so a damaged checkpoint is one clear :class:`CheckpointError`, not a traceback
    halfway through a pass."""
    path = local_checkpoint_folder(source)  # None for a hub id; a clear error for a bad path
    if path is not None:
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; point at a Hugging Face model folder")
    else:
        try:
            path = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as error:  # hub errors come in many types; one clear message instead
            raise CheckpointError(
                f"{source!r} is not a local folder and could not be fetched from the hub ({type(error).__name__}: "
                f"{error}); check the path or hub id, or download the model first (offline mode uses only the local "
                "cache)"
            ) from None
    validate_checkpoint(path)
    return path


def validate_checkpoint(folder: Path, config: transformers.PretrainedConfig | None = None, *,
                        weights_vs_config: bool = True) -> list[Path]:
    """The one checkpoint validation of every command; reads headers only, never tensor data. Returns the files.

    Raises :class:`CheckpointError` naming the file or tensor and the fix for: a missing or unreadable
    ``config.json``; an unreadable index, or one naming missing shards or tensors its shard lacks; no safetensors
    file; a truncated file or corrupt header; and weights that do not fit the config: tensors the config's model
    needs that no file holds (transformers would initialise them at random), tensors no part of the model takes,
    per-expert tensors missing for some experts, or shapes other than the config gives. A checkpoint whose
    config.json names another architecture than its weights fails on those. ``weights_vs_config=False`` checks the
    files only (for moecompress's own outputs whose layers differ, which plain transformers cannot build).
    """
    folder = Path(folder)
    config = config if config is not None else load_config(folder)
    files, shapes, dtypes = _check_safetensors_files(folder)
    if is_compressed_tensors(config):
        reader = compressed_tensors_reader(folder)
        shapes = reader.shapes()  # the plain checkpoint it decompresses to
        reader.close()
        dtypes = {key: dtype for key, dtype in dtypes.items() if key in shapes}  # stored as they load
    if weights_vs_config:
        _check_weights_fit_config(folder, config, shapes, dtypes)
    return files


def compressed_tensors_reader(folder: Path):
    """A compressed-tensors folder as the plain checkpoint it decompresses to
    (:class:`moecompress.checkpoint.compressed_input.CompressedTensorsFolder`)."""
    # reads compressed-tensors (heavy): only for such a folder
    from moecompress.checkpoint.compressed_input import CompressedTensorsFolder

    return CompressedTensorsFolder(folder)


def is_compressed_tensors(config) -> bool:
    """Is ``config`` (a transformers config, or config.json as a dict) a compressed-tensors checkpoint's?"""
    quantization = config.get("quantization_config") if isinstance(config, dict) else \
        getattr(config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict() if hasattr(quantization, "to_dict") else {}
    return isinstance(quantization, dict) and quantization.get("quant_method") == "compressed-tensors"


def validate_safetensors(folder: Path) -> list[Path]:
    """The same as :func:`validate_checkpoint` (the name callers such as ``inspect`` already use)."""
    return validate_checkpoint(folder)


def _check_safetensors_files(folder: Path) -> tuple[list[Path], dict[str, tuple[int, ...]], dict[str, str]]:
    """Check every safetensors file of ``folder`` (and every file its index names) without loading tensors.

    Reads each header (8-byte length + JSON) and checks that the tensors it lists fit in the file, which catches
    truncated downloads and files that are not safetensors at all. Returns the files, ``{key on disk: shape}`` and
    ``{key on disk: safetensors dtype name}``.
    """
    files = sorted(folder.glob("*.safetensors"))
    index_path = folder / INDEX_FILE
    weight_map = None
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("`weight_map` is not a mapping")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({error}); re-save the model.") from None
        missing = sorted({name for name in weight_map.values() if not (folder / name).is_file()})
        if missing:
            raise CheckpointError(
                f"{folder}: the index names missing safetensors files {missing}; the checkpoint is incomplete, "
                "copy or download the missing shards."
            )
    if not files:
        raise CheckpointError(
            f"{folder} has no *.safetensors weights; moecompress reads safetensors checkpoints only (convert .bin "
            "files with save_pretrained)."
        )
    shapes, dtypes, file_of = {}, {}, {}
    for path in files:
        for key, entry in read_safetensors_header(path).items():
            shapes[key], dtypes[key], file_of[key] = tuple(entry["shape"]), entry["dtype"], path.name
    if weight_map is not None:
        wrong = sorted(key for key, name in weight_map.items() if file_of.get(key) != name)
        if wrong:
            raise CheckpointError(f"{index_path} maps {len(wrong)} tensor(s) to a shard that does not hold them "
                                  f"({first_names(wrong)}); the index and the shards are from different saves, re-save "
                                  "or re-download the checkpoint.")
        shapes = {key: shape for key, shape in shapes.items() if key in weight_map}  # what loaders read
    return files, shapes, dtypes


def _check_weights_fit_config(folder: Path, config: transformers.PretrainedConfig,
                              shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> None:
    """Compare the tensors on disk (``{key: shape}``, ``{key: dtype}``) with the ones the config's model needs, keys
    mapped the way transformers' loader maps them (its conversion mapping: renames, per-expert tensors fused into
    one). Dtypes: a tensor the model holds as integers (packed codes, expert widths, zero points of the native
    format) must be stored as exactly that integer dtype, a floating-point one as some floating-point dtype (the
    loader casts between those); anything else is a header that lies about its data."""
    model = _meta_model(config)
    state = model.state_dict()
    expected = {key: tuple(tensor.shape) for key, tensor in state.items()}
    mapped = _disk_keys_as_model_keys(model, list(shapes), expected)
    missing = set(expected) - {target for target, _ in mapped.values()} - set(model.all_tied_weights_keys or {})
    ignore_missing = _pattern(model._keys_to_ignore_on_load_missing)
    missing = sorted(key for key in missing if not (ignore_missing and ignore_missing.search(key)))
    ignore_unexpected = _pattern({*(model._keys_to_ignore_on_load_unexpected or ()), r"rotary_emb\.inv_freq",
                                  r"(^|\.)position_ids$"})
    unexpected = sorted(key for key, (target, _) in mapped.items()
                        if target not in expected and not ignore_unexpected.search(key))
    wrong_shape = [f"{key} {list(shapes[key])} vs {list(expected[target])}" for key, (target, pattern) in mapped.items()
                   if pattern is None and target in expected and shapes[key] != expected[target]]
    wrong_dtype = [f"{key} stored as {dtypes[key]}, the model holds {str(state[target].dtype).removeprefix('torch.')}"
                   for key, (target, pattern) in mapped.items()
                   if pattern is None and target in expected and key in dtypes
                   and not _dtype_fits(dtypes[key], state[target].dtype)]
    incomplete, misfit = _fused_expert_problems(mapped, shapes, expected)
    missing, wrong_shape = missing + incomplete, wrong_shape + misfit
    problems = [f"{len(names)} {label} ({first_names(names)})" for label, names in (
        ("tensor(s) the model needs are missing", missing),
        ("tensor(s) belong to no part of the model", unexpected),
        ("tensor(s) do not fit the config's shapes", wrong_shape),
        ("tensor(s) stored in a dtype that does not hold their values", wrong_dtype),
    ) if names]
    if problems:
        raise CheckpointError(
            f"the weights in {folder} do not fit its config.json ({config.model_type}, {type(model).__name__}): "
            f"{'; '.join(problems)}. The checkpoint is incomplete or damaged, or config.json names another "
            "architecture than the weights; re-download or re-save it."
        )


# safetensors dtype names of torch's integer dtypes (what the native format's integer tensors must be stored as).
_INTEGER_DTYPE_NAMES = {torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                        torch.bool: "BOOL"}
_FLOAT_DTYPE_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0")


def _dtype_fits(stored: str, held: torch.dtype) -> bool:
    if held.is_floating_point:
        return stored in _FLOAT_DTYPE_NAMES
    return _INTEGER_DTYPE_NAMES.get(held, stored) == stored


def _meta_model(config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    """The causal LM ``config`` builds, on the meta device (names and shapes only, no memory)."""
    try:
        return build_meta_model(config)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"transformers cannot build a causal LM from this config.json ({config.model_type}): "
                              f"{error}; fix or re-download config.json") from None


def _disk_keys_as_model_keys(model, disk_keys: list[str], expected: dict) -> dict[str, tuple[str, str | None]]:
    """``{key on disk: (model key, converter source pattern or None)}`` through transformers' own conversion
    mapping (``rename_source_key``, as ``convert_and_load_state_dict_in_model`` calls it)."""
    weight_mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in weight_mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in weight_mapping if isinstance(entry, WeightConverter)]
    prefix = model.base_model_prefix
    mapped = {}
    for key in disk_keys:
        target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:  # as the loader does: a key that needed no renaming
            target, pattern = rename_source_key(key, [], [], prefix, expected)
        mapped[key] = (target, pattern)
    return mapped


def disk_key_renames(model, disk_keys) -> dict[str, str]:
    """``{key on disk: key in model's naming}`` for a reader that loads tensors itself (the lazy calibration pass):
    transformers' own renamings (``block_sparse_moe.gate`` -> ``mlp.router``, ...), and the target of every
    one-to-one converter; keys that a converter *merges* (per-expert ``experts.3.w1`` -> fused ``gate_up_proj``)
    keep their per-expert form under the renamed prefix, for the reader to fuse them expert by expert."""
    expected = dict(model.state_dict())
    weight_mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in weight_mapping if isinstance(entry, WeightRenaming)]
    renamed = {}
    for key, (target, pattern) in _disk_keys_as_model_keys(model, list(disk_keys), expected).items():
        if pattern is not None and "*" in pattern:  # a merging converter: rename only
            target, _ = rename_source_key(key, renamings, [], model.base_model_prefix, expected)
        renamed[key] = target
    return renamed


def _fused_expert_problems(mapped: dict, shapes: dict, expected: dict) -> tuple[list[str], list[str]]:
    """Per-expert tensors fused into one model tensor (``experts.*.gate_proj`` -> ``experts.gate_up_proj [E, ...]``):
    every source pattern must give one tensor per expert (else: incomplete), and the stacked (and concatenated)
    shapes must fill it (else: misfit). Returns ``(incomplete, misfit)`` descriptions."""
    sources: dict[str, dict[str, list[tuple[int, ...]]]] = {}
    for key, (target, pattern) in mapped.items():
        if pattern is not None and "*" in pattern and target in expected:
            sources.setdefault(target, {}).setdefault(pattern, []).append(shapes[key])
    incomplete, misfit = [], []
    for target, by_pattern in sorted(sources.items()):
        target_shape = expected[target]
        short = {pattern: len(found) for pattern, found in by_pattern.items() if len(found) != target_shape[0]}
        if short:
            incomplete.append(f"{target}: " + ", ".join(f"{count} of {target_shape[0]} experts' {pattern}"
                                                         for pattern, count in short.items()))
            continue
        per_expert = [set(found) for found in by_pattern.values()]
        if any(len(found) != 1 for found in per_expert):
            misfit.append(f"{target}: per-expert tensors of different shapes on disk")
            continue
        shapes_found = [next(iter(found)) for found in per_expert]
        stacked = ((target_shape[0], *shapes_found[0]) if len(shapes_found) == 1 else
                   (target_shape[0], sum(shape[0] for shape in shapes_found), *shapes_found[0][1:]))
        if stacked != target_shape:
            misfit.append(f"{target} {list(target_shape)} vs per-expert {[list(shape) for shape in shapes_found]}")
    return incomplete, misfit


def _pattern(patterns) -> re.Pattern | None:
    patterns = list(patterns or ())
    return re.compile("|".join(f"({pattern})" for pattern in patterns)) if patterns else None


def has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` holds any of the files a tokenizer is loaded from."""
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


__all__ = ["compressed_tensors_reader", "disk_key_renames", "has_tokenizer_files", "is_compressed_tensors", "load_config",
           "local_checkpoint_folder", "resolve_checkpoint",
           "validate_checkpoint", "validate_safetensors"]
