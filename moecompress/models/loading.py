"""Load an MoE checkpoint (a local folder or a hub id) with clear errors, never writing into the source.

Order of checks, cheapest first, so that a bad input fails before gigabytes are read:
1. the folder exists and has a ``config.json``; 2. the config is a supported MoE family (dense or unknown
models get :class:`UnsupportedModelError` naming the supported families); 3. every safetensors file the folder
has (or its index names) exists and has a readable header whose tensors fit in the file; 4. the model loads;
5. it has MoE blocks. Models a remap merge saved with :func:`moecompress.models.edits.materialize_expert_id_map`
are compacted again after loading.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
import transformers

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
):
    """Load ``source`` (folder or hub id) as a causal LM. Returns ``(model, tokenizer)``, model in eval mode.

    ``tokenizer`` is None when a local folder has no tokenizer files (e.g. a tiny test model). Raises
    :class:`CheckpointError` for a missing folder, a missing ``config.json``, a missing or corrupt safetensors
    file, and :class:`UnsupportedModelError` for a dense model or an MoE family without an adapter.
    """
    config = load_config(source)
    adapter_for(config)  # a dense or unknown model fails here, before any weight is read
    local = local_checkpoint_folder(source)
    if local is not None:
        validate_safetensors(local)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dtype, experts_implementation=experts_implementation, device_map=None
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"could not load the weights of {source}: {error}. Check that the checkpoint is complete and was saved "
            "by transformers (or by moecompress's export)."
        ) from error
    model.to(device)
    model.eval()
    find_moe_blocks(model)  # a config that claims MoE but built no MoE block (e.g. num_experts=0) fails here
    restore_expert_id_map(model)
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


def validate_safetensors(folder: Path) -> list[Path]:
    """Check every safetensors file of ``folder`` (and every file its index names) without loading tensors.

    Reads each header (8-byte length + JSON) and checks that the tensors it lists fit in the file, which catches
    truncated downloads and files that are not safetensors at all. Returns the files checked.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({error}); re-save the model.") from error
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
    for path in files:
        _check_safetensors_header(path)
    return files


def _check_safetensors_header(path: Path) -> None:
    file_size = path.stat().st_size
    problem = None
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
                    data_size = file_size - 8 - header_length
                    ends = [
                        entry["data_offsets"][1]
                        for name, entry in header.items()
                        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
                    ]
                    if ends and max(ends) > data_size:
                        problem = f"it is truncated ({data_size} data bytes, tensors need {max(ends)})"
    if problem is not None:
        raise CheckpointError(f"{path} is corrupt: {problem}. Re-download or re-save this checkpoint file.")


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


def _load_tokenizer(source: str | Path, local: Path | None):
    if local is not None and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"the tokenizer of {source} cannot be loaded: {error}") from error


__all__ = ["load_config", "load_model", "local_checkpoint_folder", "validate_safetensors"]
