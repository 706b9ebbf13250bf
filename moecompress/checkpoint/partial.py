"""Assembling a model from part of a checkpoint: only the experts it keeps are read (PreMoe's task-adaptive retrieval).

The model is built on the ``meta`` device first (edited by ``keep_experts`` when it keeps fewer experts), then every
tensor is filled from the cheapest source: tensors another assembled model already holds (shared, never copied),
expert rows already in memory, full router tensors kept from an earlier assembly, and only then the safetensors
files, reading just the kept experts' rows (:func:`assemble`, :func:`build_reduced_model`). Bytes read are counted
per tensor (:class:`CountingCheckpoint`): page-cache effects aside, this is what a cold disk must deliver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moecompress.checkpoint.headers import header_tensor_bytes
from moecompress.checkpoint.lazy import LazyCheckpoint, build_skeleton, fused_target, per_expert_keys
from moecompress.errors import RetrievalError
from moecompress.models.edits import keep_experts
from moecompress.models.families import find_moe_blocks
from moecompress.models.view import MoEBlockView


# ----- reading checkpoints, counting bytes ----------------------------------------------------------------------------
class CountingCheckpoint(LazyCheckpoint):
    """A safetensors checkpoint whose reads are counted: ``bytes_read`` sums the stored bytes of every tensor (or
    expert row) taken from the files. ``total_bytes`` is the size of every tensor in the checkpoint."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder)
        self.bytes_read = 0
        self.total_bytes = sum(header_tensor_bytes(self.folder / name) for name in sorted({f for f, _ in self.files.values()}))

    def read(self, key: str) -> torch.Tensor:
        tensor = super().read(key)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def has(self, key: str) -> bool:
        return key in self.files

    def read_row(self, key: str, row: int) -> torch.Tensor:
        """Row ``row`` of a tensor stored fused on disk (``[E, ...]``): only that row's bytes are read."""
        file_name, disk_key = self.files[key]
        handle = self._open(file_name)
        tensor = handle.get_slice(disk_key)[row:row + 1][0]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


_EXPERT_TENSOR_NAMES = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def new_skeleton(folder: str | Path, dtype: torch.dtype | None) -> nn.Module:
    """The full model of ``folder`` on the ``meta`` device (no weights), eager experts."""
    model, _ = build_skeleton(folder, dtype=dtype)
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        setter("eager")
    return model


@dataclass
class MoELayout:
    """Where one MoE layer lives in a model: the block's module path and its routed experts' module path."""

    layer: int
    block_path: str
    experts_path: str
    view: MoEBlockView


def moe_layouts(model: nn.Module) -> dict[int, MoELayout]:
    names = module_names(model)
    return {view.layer_index: MoELayout(view.layer_index, names[id(view.block)], names[id(view.experts)], view)
            for view in find_moe_blocks(model)}


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict(keep_vars=True).items()}


class ExpertRows:
    """Expert rows already in memory: ``rows[(layer, original expert)][tensor name]`` = that expert's slice of a fused
    tensor (``gate_up_proj [2I, d]``, ...). Built from a reduced model and its kept-expert map."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    @classmethod
    def of_model(cls, model: nn.Module, kept_experts: Mapping[int, Sequence[int]]) -> "ExpertRows":
        rows = cls()
        for view in find_moe_blocks(model):
            kept = sorted(kept_experts.get(view.layer_index, range(view.num_experts)))
            for position, expert in enumerate(kept):
                rows.rows[(view.layer_index, expert)] = {
                    name: getattr(view.experts, name)[position]
                    for name in _EXPERT_TENSOR_NAMES if isinstance(getattr(view.experts, name, None), torch.Tensor)
                }
        return rows

    def get(self, layer: int, expert: int, name: str) -> torch.Tensor | None:
        return self.rows.get((layer, expert), {}).get(name)


@dataclass
class AssemblySources:
    """Where tensors come from when a model is assembled, cheapest first.

    resident: tensors already in memory by model key (another model's non-expert tensors: shared, never copied);
        used only for keys that do not depend on which experts are kept.
    full_router_tensors: full (all experts) router / selection-bias tensors by key, kept in memory so that a swap
        slices them again without reading.
    expert_rows: expert rows already in memory (:class:`ExpertRows`).
    """

    checkpoint: CountingCheckpoint
    resident: Mapping[str, torch.Tensor] = field(default_factory=dict)
    full_router_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_rows: ExpertRows = field(default_factory=ExpertRows)


def assemble(model: nn.Module, sources: AssemblySources, *, full_shapes: Mapping[str, tuple[int, ...]],
             expert_ids: Mapping[int, Sequence[int]], dtype: torch.dtype, device: torch.device | str,
             wanted: Callable[[str], bool] = lambda key: True) -> dict[str, int]:
    """Materialise the ``wanted`` tensors of the meta-device ``model`` (possibly already reduced by ``keep_experts``).

    full_shapes: shapes of the *unreduced* model's state (a key whose target shape differs runs over experts and is
        sliced from the full tensor with ``expert_ids``). expert_ids[layer]: original ids of the experts the layer's
        fused tensors hold, in storage order (sorted; ``range(E)`` for a full layer).
    Returns how many experts came from memory and from disk.
    """
    layouts = moe_layouts(model)
    experts_paths = {layout.experts_path: layout for layout in layouts.values()}
    block_prefixes = [(layout.block_path + ".", layout) for layout in layouts.values()]
    loaded: dict[str, torch.Tensor] = {}
    counts = {"experts_from_memory": 0, "experts_read": 0}
    seen: set[int] = set()
    for key, target in model.state_dict(keep_vars=True).items():
        if id(target) in seen or not wanted(key):  # tied weights: load once, re-tie after
            continue
        seen.add(id(target))
        wanted_dtype = dtype if target.is_floating_point() else target.dtype
        fused = fused_target(key)
        if fused is not None and fused[0] in experts_paths:
            layout = experts_paths[fused[0]]
            loaded[key] = _fill_expert_tensor(sources, layout, fused[1], list(expert_ids[layout.layer]), target,
                                              wanted_dtype, device, counts)
            continue
        block = next((layout for prefix, layout in block_prefixes if key.startswith(prefix)), None)
        if block is not None and tuple(target.shape) != tuple(full_shapes[key]):
            full = sources.full_router_tensors.get(key)
            if full is None:  # a full-size resident copy (the prompt scorer's router) saves the read
                resident = sources.resident.get(key)
                full = resident if resident is not None and tuple(resident.shape) == tuple(full_shapes[key]) else None
            if full is None:
                full = sources.checkpoint.read(key)
            sources.full_router_tensors[key] = full
            loaded[key] = _select_experts_along_axis(key, full, tuple(target.shape), list(expert_ids[block.layer]))
            loaded[key] = loaded[key].to(device=device, dtype=wanted_dtype)
            continue
        resident = sources.resident.get(key)
        if resident is not None and tuple(resident.shape) == tuple(target.shape) and resident.dtype == wanted_dtype:
            loaded[key] = resident
            continue
        if not sources.checkpoint.has(key):
            raise RetrievalError(f"checkpoint {sources.checkpoint.folder} lacks {key}; it does not match its config "
                                 "(re-save it with transformers)")
        tensor = sources.checkpoint.read(key)
        if tuple(tensor.shape) != tuple(full_shapes[key]):
            raise RetrievalError(f"{key} has shape {tuple(tensor.shape)} on disk but the config gives "
                                 f"{tuple(full_shapes[key])}; the checkpoint does not match its config")
        loaded[key] = tensor.to(device=device, dtype=wanted_dtype)
    sources.checkpoint.close()
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()  # assigning the embeddings untied them from a tied lm_head (a no-op when not tied)
    return counts


def _select_experts_along_axis(key: str, full: torch.Tensor, target_shape: tuple[int, ...], kept: list[int]) -> torch.Tensor:
    """Slice the one dimension of a router-side tensor that runs over experts (router rows, selection bias)."""
    differing = [dim for dim, (a, b) in enumerate(zip(full.shape, target_shape)) if a != b]
    if len(full.shape) != len(target_shape) or len(differing) != 1 or target_shape[differing[0]] != len(kept):
        raise RetrievalError(f"{key}: cannot slice {tuple(full.shape)} to {target_shape} by expert; "
                             "this family's router layout is not supported by selective loading")
    return full.index_select(differing[0], torch.tensor(kept, dtype=torch.long))


def _fill_expert_tensor(sources: AssemblySources, layout: MoELayout, name: str, expert_ids: list[int],
                        target: torch.Tensor, dtype: torch.dtype, device, counts: dict[str, int]) -> torch.Tensor:
    """One fused experts tensor holding ``expert_ids`` (in order): rows from memory where held, else from disk."""
    checkpoint = sources.checkpoint
    if target.shape[0] != len(expert_ids):
        raise RetrievalError(f"{layout.experts_path}.{name}: {target.shape[0]} rows for {len(expert_ids)} experts")
    fused = torch.empty(target.shape, dtype=dtype, device=device)
    disk_fused_key = f"{layout.experts_path}.{name}"
    per_expert = None
    for position, expert in enumerate(expert_ids):
        row = sources.expert_rows.get(layout.layer, expert, name)
        counted = name == "down_proj"  # count experts once, not once per fused tensor
        if row is not None:
            fused[position].copy_(row)
            counts["experts_from_memory"] += counted
            continue
        counts["experts_read"] += counted
        if checkpoint.has(disk_fused_key):  # stored fused on disk: read just this expert's row
            fused[position].copy_(checkpoint.read_row(disk_fused_key, expert))
            continue
        if per_expert is None:
            per_expert = _per_expert_roles(checkpoint, layout.experts_path)
        fused[position].copy_(_read_per_expert_row(checkpoint, layout, name, expert, per_expert))
    return fused


def _per_expert_roles(checkpoint: CountingCheckpoint, experts_path: str) -> dict[str, dict[int, str]]:
    """``{role: {expert: key suffix}}`` of the per-expert keys of one experts module on disk."""
    grouped = per_expert_keys(checkpoint.keys_under(experts_path + "."))
    if experts_path not in grouped:
        raise RetrievalError(f"checkpoint {checkpoint.folder} has neither fused nor per-expert tensors for {experts_path}; "
                             "the checkpoint does not match its config")
    return grouped[experts_path]


def _read_per_expert_row(checkpoint: CountingCheckpoint, layout: MoELayout, name: str, expert: int,
                         roles: Mapping[str, Mapping[int, str]]) -> torch.Tensor:
    """Expert ``expert``'s row of fused ``name`` from per-expert keys: ``gate_up_proj`` = gate rows then up rows
    (the layout transformers' own loading builds), ``down_proj`` as stored."""
    if layout.view.storage != "concatenated":
        raise RetrievalError(f"{layout.experts_path}: per-expert checkpoints of the {layout.view.storage!r} expert "
                             "layout are not supported by selective loading")
    suffix = "_bias" if name.endswith("_bias") else ""
    parts = ("gate", "up") if name.startswith("gate_up_proj") else ("down",)
    pieces = []
    for part in parts:
        key_suffix = roles.get(part + suffix, {}).get(expert)
        if key_suffix is None:
            raise RetrievalError(f"{layout.experts_path}: expert {expert} has no {part}{suffix} tensor on disk; "
                                 "the checkpoint is corrupt")
        pieces.append(checkpoint.read(f"{layout.experts_path}.{key_suffix}"))
    return torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0]


def build_reduced_model(sources: AssemblySources, kept_experts: Mapping[int, Sequence[int]], *,
                        top_k: int | None = None, dtype: torch.dtype | None = None, device="cpu") -> tuple[nn.Module, dict]:
    """The model with only ``kept_experts[layer]`` in each MoE layer, reading only those experts' tensors.

    Equals ``keep_experts(full_model, kept_experts, top_k=top_k)`` (the edit is applied to the ``meta`` skeleton
    first, then every tensor is filled: non-expert ones from ``sources.resident`` or disk, router rows sliced from
    the full router, expert rows from ``sources.expert_rows`` or disk). Returns ``(model, counts)``.
    """
    model = new_skeleton(sources.checkpoint.folder, dtype)
    dtype = dtype or model.dtype
    full_shapes = state_shapes(model)
    keep_experts(model, {int(layer): list(kept) for layer, kept in kept_experts.items()}, top_k=top_k)
    expert_ids = {view.layer_index: sorted(int(e) for e in kept_experts.get(view.layer_index, range(view.num_experts)))
                  for view in find_moe_blocks(model)}
    counts = assemble(model, sources, full_shapes=full_shapes, expert_ids=expert_ids, dtype=dtype, device=device)
    model.eval()
    still_meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if still_meta:
        raise RetrievalError(f"the reduced model still lacks {still_meta[:3]}; the checkpoint does not match its config")
    return model, counts


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` of every materialised state tensor of ``model`` (to share with another assembly)."""
    return {key: tensor for key, tensor in model.state_dict(keep_vars=True).items() if not tensor.is_meta}


def shareable_tensors(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a reduced model that do not depend on which experts it holds (safe to share with the next)."""
    layouts = moe_layouts(model)
    expert_prefixes = tuple(layout.experts_path + "." for layout in layouts.values())
    return {key: tensor for key, tensor in tensors.items() if not key.startswith(expert_prefixes)}
