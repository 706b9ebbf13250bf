"""Lazy, per-module weight loading from safetensors into a meta-device skeleton.

The skeleton is the model class built from its config with parameters on the ``meta`` device (no memory) and real
buffers (rotary frequencies are computed, not stored). :class:`LazyCheckpoint` then loads one module's weights at a
time (one decoder layer, the embeddings) straight from the safetensors files, and :func:`release_module` sends
them back to ``meta`` when the layer is done. Peak memory is therefore about one decoder layer plus the cached
activations, whatever the checkpoint size.

Checkpoints saved by transformers store experts per expert (``mlp.experts.3.gate_proj.weight``; Mixtral:
``block_sparse_moe.experts.3.w1.weight``), while the modules hold fused 3-D tensors. :func:`fuse_expert_tensors`
does the fuse on load, in the storage layout the uniform view declares for the family (gate rows then up rows).
A compressed-tensors folder is read as the plain checkpoint it decompresses to
(:mod:`moecompress.checkpoint.compressed_input`).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moecompress.checkpoint.headers import INDEX_FILE, read_weight_map
from moecompress.checkpoint.validation import compressed_tensors_reader, disk_key_renames, is_compressed_tensors
from moecompress.errors import CheckpointError

# Checkpoint spellings that transformers' conversion mapping renames on load (``conversion_mapping.py``).
KEY_RENAMES = ((".block_sparse_moe.", ".mlp."),)
# Per-expert projection names on disk -> canonical role.
EXPERT_PROJECTION_ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_PER_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?experts)\.(?P<expert>\d+)\.(?P<projection>\w+)\.(?P<kind>weight|bias)$")


class LazyCheckpoint:
    """Index of a safetensors checkpoint: which file holds which (renamed) key; tensors are read on demand."""

    def __init__(self, folder: str | Path, model: nn.Module | None = None) -> None:
        """``model``: the (meta) model the tensors are for; its keys are then mapped the way transformers maps them
        on load (:func:`moecompress.checkpoint.validation.disk_key_renames`), else only ``block_sparse_moe -> mlp``."""
        self.folder = Path(folder)
        if not (self.folder / INDEX_FILE).is_file() and not any(self.folder.glob("*.safetensors")):
            raise CheckpointError(f"{self.folder} has no .safetensors files; moecompress reads safetensors checkpoints "
                                  "(convert .bin checkpoints with transformers' save_pretrained first)")
        self.compressed = None  # a compressed-tensors folder's reader: its modules are decompressed on read
        if is_compressed_tensors(json.loads((self.folder / "config.json").read_text())):
            self.compressed = compressed_tensors_reader(self.folder)
            weight_map = self.compressed.weight_map  # plain keys: what the compressed modules decompress to
        else:
            weight_map = read_weight_map(self.folder)
        self.files: dict[str, tuple[str, str]] = {}  # model key -> (file name, key on disk)
        renames = disk_key_renames(model, weight_map) if model is not None else {}
        for disk_key, file_name in weight_map.items():
            self.files[renames.get(disk_key) or rename_key(disk_key)] = (file_name, disk_key)
        self._handles: dict[str, object] = {}  # open files while one module loads (closed after: see load_module)

    def keys_under(self, prefix: str) -> list[str]:
        return [key for key in self.files if key.startswith(prefix)]

    def read(self, key: str) -> torch.Tensor:
        file_name, disk_key = self.files[key]
        if self.compressed is not None:
            return self.compressed.read(disk_key)
        return self._open(file_name).get_tensor(disk_key)

    def _open(self, file_name: str):
        """The open ``safe_open`` handle of one file (kept until :meth:`close` or the end of :meth:`load_module`)."""
        handle = self._handles.get(file_name)
        if handle is None:
            handle = self._handles[file_name] = safe_open(str(self.folder / file_name), framework="pt")
        return handle

    def close(self) -> None:
        """Drop open file handles (their memory maps keep pages resident)."""
        self._handles.clear()
        if self.compressed is not None:
            self.compressed.close()

    def load_module(self, module: nn.Module, prefix: str, *, dtype: torch.dtype, device: torch.device | str,
                    expert_ids: Sequence[int] | None = None) -> None:
        """Materialise ``module``'s parameters and persistent buffers from the checkpoint (``prefix`` = its path + '.').

        Fused expert tensors are allocated once in the target dtype and filled expert by expert as they are read,
        so loading a layer needs about its own size, not two or three copies of it. ``expert_ids``: the original
        ids of the experts a pruned (meta) layer keeps, in storage order: only their per-expert tensors are read,
        and tensors that run over experts (router rows, selection bias) are sliced to them.
        """
        expected = module.state_dict()
        per_expert = per_expert_keys(key[len(prefix):] for key in self.keys_under(prefix))
        loaded: dict[str, torch.Tensor] = {}
        try:
            for key, target in expected.items():
                # Tensors the skeleton holds in float32 while the model is in a lower dtype are the ones
                # transformers keeps in float32 (``_keep_in_fp32_modules``: DeepSeek-V3's router since 5.24), and
                # from_pretrained loads them so: compute with them in float32 too, as the full model does.
                keep_fp32 = target.dtype == torch.float32
                wanted_dtype = (torch.float32 if keep_fp32 else dtype) if target.is_floating_point() else target.dtype
                if prefix + key in self.files:
                    tensor = self.read(prefix + key)
                    if expert_ids is not None and tuple(tensor.shape) != tuple(target.shape):
                        tensor = _select_experts(prefix + key, tensor, target, expert_ids)
                    _check_shape(prefix + key, tensor, target)
                    loaded[key] = tensor.to(device=device, dtype=wanted_dtype)
                    continue
                fused = fused_target(key)
                if fused is None or fused[0] not in per_expert:
                    raise CheckpointError(
                        f"checkpoint {self.folder} lacks {prefix}{key}; the checkpoint does not match its config "
                        "(re-save it with transformers)"
                    )
                experts_prefix, tensor_name = fused
                loaded[key] = self._fill_fused(prefix + experts_prefix, per_expert[experts_prefix], tensor_name,
                                               target, wanted_dtype, device, expert_ids)
        finally:
            # safetensors memory-maps each file; pages read stay mapped (and count as resident) while a handle is
            # open, so close them after every module to keep the pass's memory at one layer
            self.close()
        module.load_state_dict(loaded, strict=True, assign=True)

    def _fill_fused(self, experts_path: str, roles: dict, tensor_name: str, target: torch.Tensor, dtype, device,
                    expert_ids: Sequence[int] | None = None):
        """One fused tensor (``gate_up_proj [E, 2I, d]``, ``down_proj [E, d, I]`` or their biases) from per-expert
        keys, concatenated layout (gate rows, then up rows); row ``i`` holds expert ``expert_ids[i]`` when given."""
        is_bias = tensor_name.endswith("_bias")
        parts = ("gate", "up") if tensor_name.startswith("gate_up_proj") else ("down",)
        suffix = "_bias" if is_bias else ""
        num_experts = target.shape[0]
        wanted = list(range(num_experts)) if expert_ids is None else [int(e) for e in expert_ids]
        if len(wanted) != num_experts:
            raise CheckpointError(f"{experts_path}: {len(wanted)} expert ids for a fused tensor of {num_experts} experts")
        for part in parts:
            found = set(roles.get(part + suffix, {}))
            if not set(wanted) <= found or (expert_ids is None and len(found) != num_experts):
                raise CheckpointError(f"{experts_path}: per-expert {part} weights are incomplete on disk (expected "
                                      f"experts 0..{num_experts - 1}, found {len(found)}); the checkpoint is corrupt")
        fused = torch.empty(target.shape, dtype=dtype, device=device)
        for row, expert in enumerate(wanted):
            offset = 0
            for part in parts:
                tensor = self.read(f"{experts_path}.{roles[part + suffix][expert]}")
                rows = tensor.shape[0]
                if offset + rows > fused.shape[1] or tuple(tensor.shape[1:]) != tuple(fused.shape[2:]):
                    raise CheckpointError(f"{experts_path}.{expert}: {part} has shape {tuple(tensor.shape)}, which does "
                                          f"not fit the fused {tensor_name} {tuple(target.shape)}; checkpoint and config differ")
                fused[row, offset:offset + rows].copy_(tensor)
                offset += rows
            if offset != fused.shape[1]:
                raise CheckpointError(f"{experts_path}.{expert}: per-expert tensors fill {offset} of {fused.shape[1]} rows "
                                      f"of {tensor_name}; checkpoint and config differ")
        return fused


def _select_experts(key: str, full: torch.Tensor, target: torch.Tensor, expert_ids: Sequence[int]) -> torch.Tensor:
    """Slice the one axis of ``full`` that runs over experts down to ``expert_ids`` (a pruned layer's router rows,
    selection bias, or a fused experts tensor stored fused on disk)."""
    differing = [dim for dim, (a, b) in enumerate(zip(full.shape, target.shape)) if a != b]
    if full.dim() != target.dim() or len(differing) != 1 or target.shape[differing[0]] != len(expert_ids):
        raise CheckpointError(f"{key} has shape {tuple(full.shape)} on disk, which does not slice by expert to "
                              f"{tuple(target.shape)}; the checkpoint does not match its config")
    return full.index_select(differing[0], torch.tensor(list(expert_ids), dtype=torch.long))


def per_expert_keys(keys) -> dict[str, dict[str, dict[int, str]]]:
    """``{experts prefix: {role (gate/up/down, +_bias): {expert: key suffix after the prefix}}}``."""
    grouped: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    for key in keys:
        match = _PER_EXPERT_KEY.match(key)
        role = EXPERT_PROJECTION_ROLES.get(match.group("projection")) if match else None
        if role is None:
            continue
        suffix = "" if match.group("kind") == "weight" else "_bias"
        grouped[match.group("prefix")][role + suffix][int(match.group("expert"))] = key[len(match.group("prefix")) + 1:]
    return grouped


def fused_target(key: str) -> tuple[str, str] | None:
    """``mlp.experts.gate_up_proj`` -> (``mlp.experts``, ``gate_up_proj``); None for other keys."""
    prefix, _, name = key.rpartition(".")
    if name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        return prefix, name
    return None


def _check_shape(key: str, tensor: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"{key} has shape {tuple(tensor.shape)} on disk but the config gives "
                              f"{tuple(target.shape)}; the checkpoint does not match its config")


def rename_key(key: str) -> str:
    for old, new in KEY_RENAMES:
        key = key.replace(old, new)
    return key


def fuse_expert_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert keys -> fused ``experts.gate_up_proj [E, 2I, d]`` (gate rows, then up rows) and
    ``experts.down_proj [E, d, I]``; keys that are already fused or not expert weights pass through."""
    grouped: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    fused: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _PER_EXPERT_KEY.match(key)
        role = EXPERT_PROJECTION_ROLES.get(match.group("projection")) if match else None
        if match is None or role is None:
            fused[key] = tensor
            continue
        suffix = "" if match.group("kind") == "weight" else "_bias"
        grouped[match.group("prefix")][role + suffix][int(match.group("expert"))] = tensor
    for prefix, roles in grouped.items():
        experts = sorted(roles.get("gate", {}))
        for role in ("gate", "up", "down"):
            if sorted(roles.get(role, {})) != experts or not experts or experts != list(range(len(experts))):
                raise CheckpointError(f"{prefix}: per-expert {role} weights are incomplete on disk "
                                      f"(found experts {sorted(roles.get(role, {}))[:8]}...); the checkpoint is corrupt")
        fused[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([roles["gate"][e], roles["up"][e]], 0) for e in experts])
        fused[f"{prefix}.down_proj"] = torch.stack([roles["down"][e] for e in experts])
        if "gate_bias" in roles:
            fused[f"{prefix}.gate_up_proj_bias"] = torch.stack(
                [torch.cat([roles["gate_bias"][e], roles["up_bias"][e]], 0) for e in experts])
        if "down_bias" in roles:
            fused[f"{prefix}.down_proj_bias"] = torch.stack([roles["down_bias"][e] for e in experts])
    return fused


def build_skeleton(folder: str | Path, *, dtype: torch.dtype | None = None):
    """The causal-LM class of ``folder`` with parameters on ``meta`` and real buffers. Returns ``(model, config)``."""
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as error:
        raise CheckpointError(f"could not read the config of {folder} ({error}); is it a Hugging Face model folder?") from None
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()  # from_config under init_empty_weights leaves tied embeddings as two meta tensors
    model.eval()
    return model, config


def release_module(module: nn.Module) -> None:
    """Drop ``module``'s weights back to the meta device (frees their memory)."""
    module.to_empty(device="meta")
