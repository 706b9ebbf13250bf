"""PreMoe TAER: task-adaptive expert retrieval (methods.md section 1, "TAER"; choices (g) 2, 3, 5).

Three parts, used by ``moecompress store build``, ``moecompress retrieve`` and :class:`RetrievedModel`:

* **Pattern store.** One TCESS matrix ``[L_moe, E]`` per task (statistic ``tcess_markers`` from one calibration pass
  over that task's text), saved with the model's fingerprint, the TCESS options, the default ``key_layers`` and the
  super experts (found on the same passes), written atomically (:class:`PatternStore`).
* **Query.** A prompt runs through the full model only up to the router of the last key layer (no routed expert of
  that layer is ever loaded); its mean TCESS markers at the ``key_layers`` form the query key, and the stored
  pattern nearest under L2 is chosen (exact search: a store holds a handful of patterns, FAISS is not needed)
  (:class:`PromptScorer`). One key layer: the raw TCESS vector, as in the paper. Several: each layer's vector
  L2-normalised, then concatenated (choice (g) 2).
* **Reduced model.** Each MoE layer keeps its super experts plus the top-``K`` experts of the *stored* pattern, and
  the model is assembled from the safetensors files reading **only the kept experts' tensors** (plus every
  non-expert tensor; routers are read whole and sliced). The result is exactly ``keep_experts`` applied to the full
  model (router rows sliced, DeepSeek group routing off unless the kept experts still form the original groups),
  built on the ``meta`` device first so nothing else is ever read (:func:`build_reduced_model`). Bytes read are
  counted per tensor (the bytes of each tensor taken from the files; page-cache effects aside this is what a cold
  disk must deliver).

:class:`RetrievedModel` holds a reduced model and swaps to another pattern when the task changes: experts it already
holds are moved over in memory, every non-expert tensor is shared, and only the experts it lacks are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moecompress.analysis.super_experts import STATISTIC as SUPER_EXPERT_STATISTIC
from moecompress.analysis.super_experts import find_super_experts
from moecompress.calibration.checkpoint import (LazyCheckpoint, fused_target, per_expert_keys, build_skeleton,
                                                resolve_checkpoint)
from moecompress.calibration.data import load_calibration, separator_token_id
from moecompress.calibration.runner import collect_statistics
from moecompress.calibration.statistics import LayerStatistics, tcess_markers
from moecompress.pipeline import move_into_place
from moecompress.errors import MoECompressError
from moecompress.models import decoder_layers, find_moe_blocks, keep_experts
from moecompress.models.view import MoEBlockView

STORE_FORMAT = "moecompress-premoe-taer"
STORE_VERSION = 1
STORE_JSON = "store.json"
STORE_TENSORS = "patterns.safetensors"

# TCESS options (methods.md section 1 (g) 1): our recommended defaults and the official code's setting.
TCESS_PRESETS: dict[str, dict] = {
    "recommended": {"top_k": None, "threshold": 0.0, "phi": "peu"},  # k = model top-k, r = 0, phi = max(s, sigmoid(s))
    "premoe_code": {"top_k": 1, "threshold": -1.0, "phi": "identity"},  # k = 1, filter off, raw logit
}


class RetrievalError(MoECompressError):
    """A pattern store or a retrieval request is unusable (wrong model, unknown task, impossible budget)."""


# ----- TCESS options --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TcessOptions:
    """PreMoe token markers ``(top_k, threshold, phi)``; ``top_k=None`` means the model's own top-k."""

    top_k: int | None = None
    threshold: float = 0.0
    phi: str = "peu"

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise RetrievalError(f"TCESS top_k must be at least 1 (got {self.top_k}); leave it unset for the model's top-k")
        if self.phi not in ("identity", "peu"):
            raise RetrievalError(f"TCESS phi must be 'identity' or 'peu' (got {self.phi!r})")
        if self.threshold >= 1.0:
            raise RetrievalError(f"TCESS threshold must be below 1 (got {self.threshold}); -1 or 0 turns the filter off")

    @classmethod
    def preset(cls, name: str) -> "TcessOptions":
        if name not in TCESS_PRESETS:
            raise RetrievalError(f"unknown TCESS preset {name!r}; choose one of {sorted(TCESS_PRESETS)}")
        return cls(**TCESS_PRESETS[name])

    def to_dict(self) -> dict:
        return {"top_k": self.top_k, "threshold": self.threshold, "phi": self.phi}

    def markers(self, logits: torch.Tensor, model_top_k: int) -> torch.Tensor:
        """logits ``[T, E]`` fp32 -> markers ``[T, E]`` (the calibration statistic's own function)."""
        return tcess_markers(logits, self.top_k or model_top_k, self.threshold, self.phi)


# ----- reading checkpoints, counting bytes ----------------------------------------------------------------------------
class CountingCheckpoint(LazyCheckpoint):
    """A safetensors checkpoint whose reads are counted: ``bytes_read`` sums the stored bytes of every tensor (or
    expert row) taken from the files. ``total_bytes`` is the size of every tensor in the checkpoint."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder)
        self.bytes_read = 0
        self.total_bytes = sum(_header_tensor_bytes(self.folder / name) for name in sorted({f for f, _ in self.files.values()}))

    def read(self, key: str) -> torch.Tensor:
        tensor = super().read(key)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def has(self, key: str) -> bool:
        return key in self.files

    def read_row(self, key: str, row: int) -> torch.Tensor:
        """Row ``row`` of a tensor stored fused on disk (``[E, ...]``): only that row's bytes are read."""
        from safetensors import safe_open

        file_name, disk_key = self.files[key]
        handle = self._handles.get(file_name)
        if handle is None:
            handle = self._handles[file_name] = safe_open(str(self.folder / file_name), framework="pt")
        tensor = handle.get_slice(disk_key)[row:row + 1][0]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        """Drop open file handles (their memory maps keep pages resident)."""
        self._handles.clear()


def _header_tensor_bytes(path: Path) -> int:
    """Sum of the tensors' data sizes from a safetensors header (no tensor read)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return sum(entry["data_offsets"][1] - entry["data_offsets"][0]
               for name, entry in header.items() if name != "__metadata__")


def checkpoint_fingerprint(folder: str | Path) -> str:
    """sha256 of ``config.json``, every safetensors header (names, dtypes, shapes) and the router weights.

    Cheap (no expert is read) and specific enough that a store built for one model is not used with another:
    TCESS depends on the routers, so two checkpoints with the same shapes but other routers differ.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    digest.update(json.dumps(config, sort_keys=True).encode())
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        described = {name: [entry["dtype"], entry["shape"]] for name, entry in header.items() if name != "__metadata__"}
        digest.update(json.dumps(described, sort_keys=True).encode())
    skeleton, _ = build_skeleton(folder)
    checkpoint = CountingCheckpoint(folder)
    names = _module_names(skeleton)
    for view in find_moe_blocks(skeleton):
        router = view.router_linear if view.router_linear is not None else view.router
        key = f"{names[id(router)]}.weight"
        if key in checkpoint.files:
            digest.update(checkpoint.read(key).float().numpy().tobytes())
    checkpoint.close()
    return digest.hexdigest()


# ----- assembling a model from selected tensors -----------------------------------------------------------------------
_EXPERT_TENSOR_NAMES = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def new_skeleton(folder: str | Path, dtype: torch.dtype | None) -> nn.Module:
    """The full model of ``folder`` on the ``meta`` device (no weights), eager experts."""
    model, _ = build_skeleton(folder, dtype=dtype)
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        setter("eager")
    return model


@dataclass
class _MoELayout:
    """Where one MoE layer lives in a model: the block's module path and its routed experts' module path."""

    layer: int
    block_path: str
    experts_path: str
    view: MoEBlockView


def _moe_layouts(model: nn.Module) -> dict[int, _MoELayout]:
    names = _module_names(model)
    return {view.layer_index: _MoELayout(view.layer_index, names[id(view.block)], names[id(view.experts)], view)
            for view in find_moe_blocks(model)}


def _state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
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
    layouts = _moe_layouts(model)
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


def _fill_expert_tensor(sources: AssemblySources, layout: _MoELayout, name: str, expert_ids: list[int],
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


def _read_per_expert_row(checkpoint: CountingCheckpoint, layout: _MoELayout, name: str, expert: int,
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


# ----- pattern store --------------------------------------------------------------------------------------------------
@dataclass
class PatternStore:
    """Per-task TCESS patterns of one model.

    patterns[task]: ``[L_moe, E]`` fp32 TCESS (row ``i`` = MoE layer ``moe_layers[i]``).
    key_layers: default MoE layers whose TCESS forms the matching key (default: the first MoE layer).
    super_experts: ``[(layer, expert)]`` always kept. tasks[task]: files, tokens and calibration hash.
    """

    patterns: dict[str, torch.Tensor]
    moe_layers: list[int]
    fingerprint: str
    tcess: TcessOptions
    key_layers: list[int]
    super_experts: list[tuple[int, int]] = field(default_factory=list)
    tasks: dict[str, dict] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    model_top_k: int = 1

    @property
    def task_names(self) -> list[str]:
        return list(self.patterns)

    def layer_row(self, layer: int) -> int:
        if layer not in self.moe_layers:
            raise RetrievalError(f"layer {layer} is not an MoE layer of this store's model; MoE layers: {self.moe_layers}")
        return self.moe_layers.index(layer)

    def check_key_layers(self, key_layers: Sequence[int] | None) -> list[int]:
        layers = sorted({int(layer) for layer in (key_layers or self.key_layers)})
        for layer in layers:
            self.layer_row(layer)
        return layers

    def pattern_keys(self, key_layers: Sequence[int]) -> torch.Tensor:
        """``[P, F]`` keys of every pattern (task order) over ``key_layers``."""
        return torch.stack([matching_key({layer: pattern[self.layer_row(layer)] for layer in key_layers})
                            for pattern in self.patterns.values()])

    def nearest(self, query: Mapping[int, torch.Tensor]) -> tuple[str, dict[str, float]]:
        """The task whose key is nearest (L2) to the query's, and the distance to every task."""
        key_layers = sorted(query)
        distances = torch.cdist(matching_key(query)[None].double(), self.pattern_keys(key_layers).double())[0]
        by_task = {task: float(d) for task, d in zip(self.patterns, distances.tolist())}
        return min(by_task, key=lambda task: (by_task[task], self.task_names.index(task))), by_task

    # ----- files ------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``store.json`` and ``patterns.safetensors`` into ``folder`` atomically (a reader sees the old store or
        the complete new one, never a half-written one)."""
        from safetensors.torch import save_file

        folder = Path(folder).expanduser().resolve()
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise RetrievalError(f"{folder} exists and is not empty; pass --overwrite to replace it, or choose another --out")
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = folder.parent / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            save_file({f"tcess/{task}": matrix.float().contiguous() for task, matrix in self.patterns.items()},
                      str(partial / STORE_TENSORS))
            (partial / STORE_JSON).write_text(json.dumps(self.describe(), indent=2) + "\n")
            move_into_place(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return folder

    def describe(self) -> dict:
        return {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "model_fingerprint": self.fingerprint,
            "moe_layers": self.moe_layers,
            "num_experts": int(next(iter(self.patterns.values())).shape[1]) if self.patterns else 0,
            "model_top_k": self.model_top_k,
            "tcess": self.tcess.to_dict(),
            "key_layers": self.key_layers,
            "super_experts": [list(pair) for pair in self.super_experts],
            "calibration": self.calibration,
            "tasks": self.tasks,
        }

    @classmethod
    def load(cls, folder: str | Path) -> "PatternStore":
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        record_path, tensors_path = folder / STORE_JSON, folder / STORE_TENSORS
        if not record_path.is_file() or not tensors_path.is_file():
            raise RetrievalError(f"{folder} is not a pattern store (expected {STORE_JSON} and {STORE_TENSORS}); "
                                 "build one with `moecompress store build MODEL --tasks name=files ... --out DIR`")
        try:
            record = json.loads(record_path.read_text())
            tensors = load_file(str(tensors_path))
        except (ValueError, OSError) as error:
            raise RetrievalError(f"pattern store {folder} is unreadable ({error}); rebuild it with `moecompress store build`") from None
        if record.get("format") != STORE_FORMAT or record.get("version") != STORE_VERSION:
            raise RetrievalError(f"{folder} has format {record.get('format')!r} version {record.get('version')!r}; this "
                                 f"moecompress reads {STORE_FORMAT!r} version {STORE_VERSION}: rebuild the store")
        patterns = {task: tensors[f"tcess/{task}"] for task in record["tasks"]}
        return cls(
            patterns=patterns,
            moe_layers=[int(layer) for layer in record["moe_layers"]],
            fingerprint=record["model_fingerprint"],
            tcess=TcessOptions(**record["tcess"]),
            key_layers=[int(layer) for layer in record["key_layers"]],
            super_experts=[(int(layer), int(expert)) for layer, expert in record["super_experts"]],
            tasks=record["tasks"],
            calibration=record.get("calibration", {}),
            model_top_k=int(record.get("model_top_k", 1)),
        )

    def check_model(self, folder: str | Path) -> None:
        fingerprint = checkpoint_fingerprint(folder)
        if fingerprint != self.fingerprint:
            raise RetrievalError(f"this pattern store was built for another model (fingerprint {self.fingerprint[:12]}, "
                                 f"{folder} has {fingerprint[:12]}); rebuild it for this model with `moecompress store build`")


def matching_key(tcess_by_layer: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """The vector matched under L2: one layer's raw TCESS (paper), or several layers' L2-normalised and concatenated."""
    layers = sorted(tcess_by_layer)
    if len(layers) == 1:
        return tcess_by_layer[layers[0]].float()
    return torch.cat([torch.nn.functional.normalize(tcess_by_layer[layer].float(), dim=0) for layer in layers])


def check_output_folder(out: str | Path, source: str | Path, overwrite: bool) -> None:
    """Refuse an output folder that overlaps the input checkpoint (never written into) or holds something else."""
    out, source = Path(out).expanduser().resolve(), Path(source).resolve()
    if out == source or source in out.parents or out in source.parents:
        raise RetrievalError(f"--out {out} overlaps the input model folder {source}; moecompress never writes into its "
                             "input. Choose a separate folder (a sibling of the checkpoint is fine).")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RetrievalError(f"--out {out} exists and is not empty; pass --overwrite to replace it, or choose another folder")


def parse_task_spec(spec: str) -> tuple[str, list[str]]:
    """``name=file1,file2`` -> (name, files)."""
    name, sep, files = spec.partition("=")
    paths = [path for path in files.split(",") if path]
    if not sep or not name or not paths or "/" in name:
        raise RetrievalError(f"--tasks entry {spec!r} is not NAME=FILE[,FILE...]; e.g. code=data/code.jsonl")
    return name, paths


def build_pattern_store(source: str | Path, tasks: Mapping[str, Sequence[str | Path]], *, num_samples: int = 64,
                        seq_len: int = 256, seed: int = 0, tcess: TcessOptions | None = None,
                        key_layers: Sequence[int] | None = None, dtype: torch.dtype | None = None,
                        batch_size: int = 8, device=None,
                        on_task: Callable[[str, int, int], None] | None = None) -> PatternStore:
    """One calibration pass per task (statistics ``tcess_markers`` and ``max_abs_expert_output``, lazily layer by
    layer from the checkpoint) -> a :class:`PatternStore`. Super experts use the maximum over all task passes."""
    from transformers import AutoTokenizer

    if not tasks:
        raise RetrievalError("give at least one task: --tasks NAME=FILE[,FILE...] (two or more to retrieve between)")
    tcess = tcess or TcessOptions.preset("recommended")
    folder = resolve_checkpoint(source)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    skeleton = new_skeleton(folder, None)
    views = find_moe_blocks(skeleton)
    moe_layers = [view.layer_index for view in views]
    if len({view.num_experts for view in views}) != 1:
        raise RetrievalError("the pattern store needs the same expert count in every MoE layer; build it from the "
                             "original checkpoint, before any pruning")
    layers = sorted({int(layer) for layer in key_layers}) if key_layers else [moe_layers[0]]
    for layer in layers:
        if layer not in moe_layers:
            raise RetrievalError(f"key layer {layer} is not an MoE layer; MoE layers: {moe_layers}")
    patterns: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    max_abs: dict[int, dict[str, torch.Tensor]] = {}
    # every task's text is read and tokenized first, so bad data fails before the first pass
    calibrations = {task: load_calibration(tokenizer, files=list(files), num_samples=num_samples, seq_len=seq_len, seed=seed)
                    for task, files in tasks.items()}
    for index, (task, files) in enumerate(tasks.items()):
        if on_task is not None:
            on_task(task, index, len(tasks))
        calibration = calibrations[task]
        statistics = collect_statistics(folder, calibration, ["tcess_markers", SUPER_EXPERT_STATISTIC],
                                        options={"tcess_markers": tcess.to_dict()}, dtype=dtype,
                                        batch_size=batch_size, device=device)
        patterns[task] = torch.stack([statistics[layer]["tcess_markers"] for layer in moe_layers]).float()
        records[task] = {"files": [str(path) for path in files], "num_tokens": int(calibration.input_ids.numel()),
                         "calibration_sha256": calibration.sha256}
        for layer in moe_layers:
            scores = statistics[layer][SUPER_EXPERT_STATISTIC]
            previous = max_abs.get(layer)
            max_abs[layer] = scores if previous is None else {
                kind: torch.maximum(previous[kind], scores[kind]) for kind in ("routed", "shared")}
    combined = {layer: LayerStatistics(layer, views[i].num_experts, values={SUPER_EXPERT_STATISTIC: max_abs[layer]})
                for i, layer in enumerate(moe_layers)}
    super_experts = find_super_experts(combined, len(decoder_layers(skeleton)))
    return PatternStore(
        patterns=patterns, moe_layers=moe_layers, fingerprint=checkpoint_fingerprint(folder), tcess=tcess,
        key_layers=layers, super_experts=list(super_experts.routed), tasks=records,
        calibration={"num_samples": num_samples, "seq_len": seq_len, "seed": seed,
                     "dtype": str(dtype).removeprefix("torch.") if dtype else "checkpoint"},
        model_top_k=views[0].routing.top_k,
    )


# ----- query ----------------------------------------------------------------------------------------------------------
class _StopAtRouter(Exception):
    """Raised once the last key layer's router input is scored: the rest of the model is not needed."""


class PromptScorer:
    """Scores a prompt at the key layers: the full model run only up to the last key layer's router.

    Holds the embeddings and the decoder layers before the last key layer (routed experts of earlier key layers
    included, full), and of the last key layer everything but its routed experts (never run, never read).
    """

    def __init__(self, model: nn.Module, tokenizer, key_layers: Sequence[int], tcess: TcessOptions) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.key_layers = sorted(int(layer) for layer in key_layers)
        self.tcess = tcess
        self.views = {view.layer_index: view for view in find_moe_blocks(model)}
        missing = [layer for layer in self.key_layers if layer not in self.views]
        if missing:
            raise RetrievalError(f"key layers {missing} are not MoE layers; MoE layers: {sorted(self.views)}")

    @classmethod
    def load(cls, sources: AssemblySources, tokenizer, key_layers: Sequence[int], tcess: TcessOptions, *,
             dtype: torch.dtype | None = None, device="cpu") -> "PromptScorer":
        """Read the prefix from the checkpoint (tensors in ``sources.resident`` / ``expert_rows`` are shared)."""
        model = new_skeleton(sources.checkpoint.folder, dtype)
        dtype = dtype or model.dtype
        last = max(key_layers)
        layouts = _moe_layouts(model)
        layers_path = _module_names(model)[id(decoder_layers(model))]
        embeddings_path = _module_names(model)[id(model.get_input_embeddings())]
        skipped_experts = layouts[last].experts_path + "."

        def wanted(key: str) -> bool:
            if key.startswith(embeddings_path + "."):
                return True
            if not key.startswith(layers_path + "."):
                return False
            layer = int(key[len(layers_path) + 1:].split(".", 1)[0])
            return layer < last or (layer == last and not key.startswith(skipped_experts))

        expert_ids = {layer: list(range(layout.view.num_experts)) for layer, layout in layouts.items()}
        assemble(model, sources, full_shapes=_state_shapes(model), expert_ids=expert_ids, dtype=dtype, device=device,
                 wanted=wanted)
        model.eval()
        return cls(model, tokenizer, key_layers, tcess)

    def prompt_ids(self, prompt: str | Sequence[int]) -> torch.Tensor:
        """``[1, S]``: the separator token (as every calibration row starts), then the prompt's tokens."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RetrievalError("the prompt is empty; give some text to choose a task pattern from")
        return torch.tensor([[separator_token_id(self.tokenizer), *ids]], dtype=torch.long)

    def score(self, prompt: str | Sequence[int]) -> dict[int, torch.Tensor]:
        """``{key layer: [E] mean TCESS markers over the prompt's tokens}`` (separator included, as in the store)."""
        input_ids = self.prompt_ids(prompt)
        scores: dict[int, torch.Tensor] = {}
        handles = []
        last = self.key_layers[-1]

        def hook_for(layer: int):
            view = self.views[layer]

            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                logits = view.router_logits(hidden.reshape(-1, view.hidden_size))
                scores[layer] = self.tcess.markers(logits, view.routing.top_k).mean(0).cpu()
                if layer == last:
                    raise _StopAtRouter
            return hook

        for layer in self.key_layers:
            handles.append(self.views[layer].router.register_forward_pre_hook(hook_for(layer), with_kwargs=True))
        base = getattr(self.model, "model", self.model)
        device = next(p for p in self.model.get_input_embeddings().parameters()).device
        try:
            with torch.no_grad():
                base(input_ids=input_ids.to(device), use_cache=False)
        except _StopAtRouter:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return scores


# ----- reduced model --------------------------------------------------------------------------------------------------
def select_kept_experts(pattern: torch.Tensor, moe_layers: Sequence[int], num_keep: int,
                        super_experts: Iterable[tuple[int, int]] = ()) -> dict[int, list[int]]:
    """Per MoE layer: its super experts, then the highest-TCESS experts up to ``num_keep`` (ties: lower id), sorted.

    pattern ``[L_moe, E]``.
    """
    num_experts = pattern.shape[1]
    if not 1 <= num_keep <= num_experts:
        raise RetrievalError(f"cannot keep {num_keep} experts per layer: the model has {num_experts}; "
                             f"choose --keep between 1 and {num_experts}")
    protected: dict[int, set[int]] = {}
    for layer, expert in super_experts:
        protected.setdefault(int(layer), set()).add(int(expert))
    kept_experts = {}
    for row, layer in enumerate(moe_layers):
        kept = sorted(protected.get(layer, set()))
        if len(kept) > num_keep:
            raise RetrievalError(f"layer {layer} has {len(kept)} super experts {kept} that must stay; keep at least "
                                 f"{len(kept)} experts per layer")
        scores = pattern[row].tolist()
        for expert in sorted(range(num_experts), key=lambda e: (-scores[e], e)):
            if len(kept) >= num_keep:
                break
            if expert not in kept:
                kept.append(expert)
        kept_experts[layer] = sorted(kept)
    return kept_experts


def build_reduced_model(sources: AssemblySources, kept_experts: Mapping[int, Sequence[int]], *,
                        top_k: int | None = None, dtype: torch.dtype | None = None, device="cpu") -> tuple[nn.Module, dict]:
    """The model with only ``kept_experts[layer]`` in each MoE layer, reading only those experts' tensors.

    Equals ``keep_experts(full_model, kept_experts, top_k=top_k)`` (the edit is applied to the ``meta`` skeleton
    first, then every tensor is filled: non-expert ones from ``sources.resident`` or disk, router rows sliced from
    the full router, expert rows from ``sources.expert_rows`` or disk). Returns ``(model, counts)``.
    """
    model = new_skeleton(sources.checkpoint.folder, dtype)
    dtype = dtype or model.dtype
    full_shapes = _state_shapes(model)
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


def num_to_keep(num_experts: int, num_experts_to_keep: int | None, keep_ratio: float | None) -> int:
    if (num_experts_to_keep is None) == (keep_ratio is None):
        raise RetrievalError("give exactly one of --keep (experts per layer) or --keep-ratio")
    if keep_ratio is not None:
        if not 0 < keep_ratio <= 1:
            raise RetrievalError(f"--keep-ratio must be in (0, 1] (got {keep_ratio})")
        return max(1, round(keep_ratio * num_experts))
    return int(num_experts_to_keep)


@dataclass
class Retrieval:
    """What one retrieval decided and cost."""

    task: str
    distances: dict[str, float]
    kept_experts: dict[int, list[int]]
    query_bytes: int = 0
    build_bytes: int = 0
    total_checkpoint_bytes: int = 0
    experts_read: int = 0
    experts_from_memory: int = 0

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "distances": self.distances,
            "kept_experts": {str(layer): kept for layer, kept in self.kept_experts.items()},
            "bytes_read": {"query": self.query_bytes, "build": self.build_bytes,
                           "total": self.query_bytes + self.build_bytes, "checkpoint": self.total_checkpoint_bytes},
            "experts": {"read": self.experts_read, "from_memory": self.experts_from_memory},
        }


class RetrievedModel:
    """A reduced model for the current task that swaps to another stored pattern when the task changes.

    Example::

        retrieved = RetrievedModel("path/to/model", "path/to/store", num_experts_to_keep=16)
        retrieved.for_prompt("def parse(args):")    # picks the nearest pattern, builds the reduced model
        retrieved.model.generate(...)                # a plain transformers model
        retrieved.for_prompt("It is a truth universally acknowledged")  # another task: reads only missing experts

    Memory: the reduced model, plus the full router rows of every MoE layer (tiny), plus, when several key layers
    are used, the full experts of every key layer but the last (the prompt must run through them). A swap briefly
    holds the experts of both patterns.
    """

    def __init__(self, source: str | Path, store: PatternStore | str | Path, *, num_experts_to_keep: int | None = None,
                 keep_ratio: float | None = None, top_k: int | None = None, key_layers: Sequence[int] | None = None,
                 dtype: torch.dtype | None = None, device="cpu", check_fingerprint: bool = True) -> None:
        from transformers import AutoTokenizer

        self.folder = resolve_checkpoint(source)
        self.store = store if isinstance(store, PatternStore) else PatternStore.load(store)
        if check_fingerprint:
            self.store.check_model(self.folder)
        self.key_layers = self.store.check_key_layers(key_layers)
        num_experts = int(next(iter(self.store.patterns.values())).shape[1])
        self.num_keep = num_to_keep(num_experts, num_experts_to_keep, keep_ratio)
        if not 1 <= self.num_keep <= num_experts:
            raise RetrievalError(f"cannot keep {self.num_keep} experts per layer: the model has {num_experts}; "
                                 f"choose --keep between 1 and {num_experts}")
        self.top_k = top_k
        self.dtype = dtype
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.checkpoint = CountingCheckpoint(self.folder)
        self.sources = AssemblySources(self.checkpoint)
        self.model: nn.Module | None = None
        self.task: str | None = None
        self.kept_experts: dict[int, list[int]] = {}
        self._scorer: PromptScorer | None = None

    @property
    def bytes_read(self) -> int:
        """Every byte read from the checkpoint so far (queries' prefixes, routers, experts)."""
        return self.checkpoint.bytes_read

    def scorer(self) -> PromptScorer:
        """The prompt scorer; it shares its tensors with the held reduced model (built once)."""
        if self._scorer is None:
            resident = dict(self.sources.resident)
            self._scorer = PromptScorer.load(
                AssemblySources(self.checkpoint, resident, self.sources.full_router_tensors, self.sources.expert_rows),
                self.tokenizer, self.key_layers, self.store.tcess, dtype=self.dtype, device=self.device)
            self.sources.resident = {**model_tensors(self._scorer.model), **self.sources.resident}
        return self._scorer

    def choose(self, prompt: str | Sequence[int]) -> tuple[str, dict[str, float]]:
        """The task pattern nearest to ``prompt`` and the distance to every pattern (no model change)."""
        return self.store.nearest(self.scorer().score(prompt))

    def for_prompt(self, prompt: str | Sequence[int]) -> Retrieval:
        """Choose the pattern for ``prompt`` and make it the held model (a no-op when it is already held)."""
        before = self.checkpoint.bytes_read
        task, distances = self.choose(prompt)
        query_bytes = self.checkpoint.bytes_read - before
        retrieval = self.use_task(task)
        retrieval.distances = distances
        retrieval.query_bytes = query_bytes
        return retrieval

    def use_task(self, task: str) -> Retrieval:
        """Hold the reduced model of ``task``'s pattern: experts already held move over, the others are read."""
        if task not in self.store.patterns:
            raise RetrievalError(f"the pattern store has no task {task!r}; it has {self.store.task_names}")
        kept = select_kept_experts(self.store.patterns[task], self.store.moe_layers, self.num_keep, self.store.super_experts)
        if self.model is not None and task == self.task:
            return Retrieval(task, {}, kept, total_checkpoint_bytes=self.checkpoint.total_bytes)
        before = self.checkpoint.bytes_read
        if self.model is not None:
            self.sources.expert_rows = ExpertRows.of_model(self.model, self.kept_experts)
            self.sources.resident = {**self.sources.resident, **model_tensors(self.model)}
        model, counts = build_reduced_model(self.sources, kept, top_k=self.top_k, dtype=self.dtype, device=self.device)
        self.sources.expert_rows = ExpertRows()  # the old model's experts are released with it
        self.model, self.task, self.kept_experts = model, task, kept
        self.sources.resident = _shareable(model_tensors(model), model)
        return Retrieval(task, {}, kept, build_bytes=self.checkpoint.bytes_read - before,
                         total_checkpoint_bytes=self.checkpoint.total_bytes,
                         experts_read=counts["experts_read"], experts_from_memory=counts["experts_from_memory"])


def _shareable(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a reduced model that do not depend on which experts it holds (safe to share with the next)."""
    layouts = _moe_layouts(model)
    expert_prefixes = tuple(layout.experts_path + "." for layout in layouts.values())
    return {key: tensor for key, tensor in tensors.items() if not key.startswith(expert_prefixes)}


def retrieve(source: str | Path, store: PatternStore | str | Path, prompt: str, *, num_experts_to_keep: int | None = None,
             keep_ratio: float | None = None, top_k: int | None = None, key_layers: Sequence[int] | None = None,
             dtype: torch.dtype | None = None, device="cpu") -> tuple[nn.Module, object, Retrieval]:
    """One-shot retrieval: score ``prompt``, choose the nearest pattern, build its reduced model.

    Returns ``(model, tokenizer, retrieval)``. Bytes: the query reads the prefix up to the last key layer's router;
    the build then reads only what the prefix did not (kept experts, later layers), sharing the rest.
    """
    retrieved = RetrievedModel(source, store, num_experts_to_keep=num_experts_to_keep, keep_ratio=keep_ratio,
                               top_k=top_k, key_layers=key_layers, dtype=dtype, device=device)
    retrieval = retrieved.for_prompt(prompt)
    return retrieved.model, retrieved.tokenizer, retrieval
