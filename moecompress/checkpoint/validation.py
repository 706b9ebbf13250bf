"""Load an MoE checkpoint (a local folder or a hub id) with clear errors, never writing into the source.

Order of checks, cheapest first, so that a bad input fails before gigabytes are read:
1. the folder exists and has a ``config.json``; 2. the config is a supported MoE family (dense or unknown
models get :class:`UnsupportedModelError` naming the supported families); 3. :func:`validate_checkpoint`: every
safetensors file the folder has (or its index names) exists and has a readable header whose tensors fit in the
file, and the tensors the headers list are exactly the ones the config's model needs, with its shapes (a missing
tensor, or weights of another architecture than the config names, fail here); 4. the model loads, and a load that
leaves any weight newly initialised is an error; 5. it has MoE blocks. Models a remap merge saved with
:func:`moecompress.models.edits.materialize_expert_id_map` are compacted again after loading.

:func:`validate_checkpoint` is the one validation every command runs (``inspect``, ``eval`` and ``compress``, the
latter through :func:`moecompress.calibration.checkpoint.resolve_checkpoint`); :func:`checkpoint_fingerprint` is
the cheap identity of a checkpoint that a compression run records to know whether a stopped run may be resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import torch
import transformers
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from moecompress.errors import CheckpointError
from moecompress.models.edits import restore_expert_id_map
from moecompress.models.families import adapter_for, find_moe_blocks

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    experts_implementation: str = "eager",
    odp: bool = True,
):
    """Load ``source`` (folder or hub id) as a causal LM. Returns ``(model, tokenizer)``, model in eval mode.

    ``odp``: apply the MC-MoE online dynamic pruning the checkpoint's config records (``mcmoe_odp``); False (or the
    environment variable ``MOECOMPRESS_ODP=0``) runs every routed expert.

    ``tokenizer`` is None when a local folder has no tokenizer files (e.g. a tiny test model). Raises
    :class:`CheckpointError` for a missing folder, a missing ``config.json``, a missing or corrupt safetensors
    file, and :class:`UnsupportedModelError` for a dense model or an MoE family without an adapter.
    """
    config = load_config(source)
    adapter_for(config)  # a dense or unknown model fails here, before any weight is read
    local = local_checkpoint_folder(source)
    if local is not None:
        validate_checkpoint(local, config)
    try:
        model, loading_info = transformers.AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dtype, experts_implementation=experts_implementation, device_map=None,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"could not load the weights of {source}: {error}. Check that the checkpoint is complete and was saved "
            "by transformers (or by moecompress's export)."
        ) from error
    _refuse_newly_initialised_weights(source, loading_info)
    model.to(device)
    model.eval()
    find_moe_blocks(model)  # a config that claims MoE but built no MoE block (e.g. num_experts=0) fails here
    restore_expert_id_map(model)
    from moecompress.quantization.odp import apply_odp_from_config  # quantization builds on models: import when used

    apply_odp_from_config(model, odp)
    return model, _load_tokenizer(source, local)


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


def _refuse_newly_initialised_weights(source, loading_info: dict) -> None:
    """transformers initialises a weight the checkpoint lacks (or holds with another shape) at random and only logs
    it; a model with random weights must never be scored or compressed, so that is an error here."""
    missing = sorted(loading_info.get("missing_keys") or ())
    mismatched = sorted(str(entry[0] if isinstance(entry, (tuple, list)) else entry)
                        for entry in loading_info.get("mismatched_keys") or ())
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} weight(s) missing from the checkpoint ({_first(missing)})")
        if mismatched:
            problems.append(f"{len(mismatched)} weight(s) with another shape than the config gives ({_first(mismatched)})")
        raise CheckpointError(
            f"loading {source} would leave weights newly initialised: {'; '.join(problems)}. The checkpoint is "
            "incomplete or its config.json names another architecture than its weights; re-save or re-download it."
        )


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
    files, shapes = _check_safetensors_files(folder)
    if weights_vs_config:
        _check_weights_fit_config(folder, config, shapes)
    return files


def validate_safetensors(folder: Path) -> list[Path]:
    """The same as :func:`validate_checkpoint` (the name callers such as ``inspect`` already use)."""
    return validate_checkpoint(folder)


def _check_safetensors_files(folder: Path) -> tuple[list[Path], dict[str, tuple[int, ...]]]:
    """Check every safetensors file of ``folder`` (and every file its index names) without loading tensors.

    Reads each header (8-byte length + JSON) and checks that the tensors it lists fit in the file, which catches
    truncated downloads and files that are not safetensors at all. Returns the files and ``{key on disk: shape}``.
    """
    files = sorted(folder.glob("*.safetensors"))
    index_path = folder / "model.safetensors.index.json"
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
    shapes, file_of = {}, {}
    for path in files:
        for key, entry in _read_safetensors_header(path).items():
            shapes[key], file_of[key] = tuple(entry["shape"]), path.name
    if weight_map is not None:
        wrong = sorted(key for key, name in weight_map.items() if file_of.get(key) != name)
        if wrong:
            raise CheckpointError(f"{index_path} maps {len(wrong)} tensor(s) to a shard that does not hold them "
                                  f"({_first(wrong)}); the index and the shards are from different saves, re-save "
                                  "or re-download the checkpoint.")
        shapes = {key: shape for key, shape in shapes.items() if key in weight_map}  # what loaders read
    return files, shapes


def _check_weights_fit_config(folder: Path, config: transformers.PretrainedConfig,
                              shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare the tensors on disk (``{key: shape}``) with the ones the config's model needs, keys mapped the way
    transformers' loader maps them (its conversion mapping: renames, per-expert tensors fused into one)."""
    model = _meta_model(config)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
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
    incomplete, misfit = _fused_expert_problems(mapped, shapes, expected)
    missing, wrong_shape = missing + incomplete, wrong_shape + misfit
    problems = [f"{len(names)} {label} ({_first(names)})" for label, names in (
        ("tensor(s) the model needs are missing", missing),
        ("tensor(s) belong to no part of the model", unexpected),
        ("tensor(s) do not fit the config's shapes", wrong_shape),
    ) if names]
    if problems:
        raise CheckpointError(
            f"the weights in {folder} do not fit its config.json ({config.model_type}, {type(model).__name__}): "
            f"{'; '.join(problems)}. The checkpoint is incomplete or damaged, or config.json names another "
            "architecture than the weights; re-download or re-save it."
        )


def _meta_model(config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    """The causal LM ``config`` builds, on the meta device (names and shapes only, no memory)."""
    from moecompress.export.native import build_meta_model  # export builds on models: imported when used

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


def _first(names, count: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:count]) + (f", ... {len(names) - count} more" if len(names) > count else "")


def checkpoint_fingerprint(folder: Path, *, sample_bytes: int = 65_536, samples_per_file: int = 4) -> str:
    """sha256 identity of a checkpoint folder without reading all its data: ``config.json`` (parsed; key order and
    the ``transformers_version`` field ignored), and for every safetensors file its name, its header (names, dtypes,
    shapes, offsets) and ``samples_per_file`` blocks of ``sample_bytes`` spread over its data (so two trainings of
    one architecture, whose headers are equal, differ). Cost: a few small reads per file, whatever its size. Call
    it on a folder :func:`validate_checkpoint` accepted.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            digest.update(path.name.encode() + b"\0" + handle.read(header_length))
            data_start, file_size = 8 + header_length, path.stat().st_size
            span = max(file_size - data_start - sample_bytes, 0)
            for index in range(samples_per_file):
                handle.seek(data_start + span * index // max(samples_per_file - 1, 1))
                digest.update(handle.read(sample_bytes))
    return digest.hexdigest()


def _read_safetensors_header(path: Path) -> dict[str, dict]:
    """``{key: {"dtype", "shape", "data_offsets"}}`` of one safetensors file; :class:`CheckpointError` when the file
    is too short, its header length or JSON is broken, an entry is malformed, or its tensors overrun the file."""
    file_size = path.stat().st_size
    problem, entries = None, {}
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            problem = "the file is shorter than a safetensors header"
        else:
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > file_size - 8 or header_length > 100_000_000:
                problem = "its header length field is larger than the file"
            else:
                try:
                    header = json.loads(handle.read(header_length))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    problem = "its header is not valid JSON"
                else:
                    entries = header if isinstance(header, dict) else {}
                    entries = {name: entry for name, entry in entries.items() if name != "__metadata__"}
                    malformed = [name for name, entry in entries.items() if not _is_tensor_entry(entry)]
                    data_size = file_size - 8 - header_length
                    ends = [entry["data_offsets"][1] for name, entry in entries.items() if name not in malformed]
                    if not isinstance(header, dict) or malformed:
                        problem = f"its header has malformed entries ({_first(malformed) or 'not a mapping'})"
                    elif ends and max(ends) > data_size:
                        problem = f"it is truncated ({data_size} data bytes, tensors need {max(ends)})"
    if problem is not None:
        raise CheckpointError(f"{path} is corrupt: {problem}. Re-download or re-save this checkpoint file.")
    return entries


def _is_tensor_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
            and all(isinstance(size, int) for size in entry["shape"])
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2)


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


def has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` holds any of the files a tokenizer is loaded from."""
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)


def _load_tokenizer(source: str | Path, local: Path | None):
    if local is not None and not has_tokenizer_files(local):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"the tokenizer of {source} cannot be loaded: {error}") from error


__all__ = ["checkpoint_fingerprint", "has_tokenizer_files", "load_config", "load_model", "local_checkpoint_folder",
           "validate_checkpoint", "validate_safetensors"]
