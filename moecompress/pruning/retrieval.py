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

import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pydantic
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer

from moecompress.analysis.super_experts import STATISTIC as SUPER_EXPERT_STATISTIC
from moecompress.analysis.super_experts import find_super_experts
from moecompress.calibration.data import load_calibration, separator_token_id
from moecompress.calibration.runner import collect_statistics
from moecompress.calibration.statistics import LayerStatistics, tcess_markers
from moecompress.checkpoint.fingerprint import all_finite, routing_fingerprint
from moecompress.checkpoint.headers import read_safetensors_header
from moecompress.checkpoint.partial import (
    AssemblySources,
    CountingCheckpoint,
    ExpertRows,
    assemble,
    build_reduced_model,
    model_tensors,
    module_names,
    moe_layouts,
    new_skeleton,
    shareable_tensors,
    state_shapes,
)
from moecompress.checkpoint.validation import resolve_checkpoint
from moecompress.errors import CheckpointError, RetrievalError, describe_value
from moecompress.folders import (
    check_output_placement,
    check_replaceable_output,
    move_into_place,
    new_work_folder,
    read_json,
)
from moecompress.models.families import decoder_layers, find_moe_blocks

STORE_FORMAT = "moecompress-premoe-taer"
STORE_VERSION = 1
STORE_JSON = "store.json"
STORE_TENSORS = "patterns.safetensors"

# TCESS options (methods.md section 1 (g) 1): our recommended defaults and the official code's setting.
TCESS_PRESETS: dict[str, dict] = {
    "recommended": {"top_k": None, "threshold": 0.0, "phi": "peu"},  # k = model top-k, r = 0, phi = max(s, sigmoid(s))
    "premoe_code": {"top_k": 1, "threshold": -1.0, "phi": "identity"},  # k = 1, filter off, raw logit
}


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
            raise RetrievalError(f"TCESS phi must be 'identity' or 'peu' (got {describe_value(self.phi)})")
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
        the complete new one, never a half-written one). A non-empty ``folder`` is replaced only with ``overwrite``
        and only when it is a pattern store holding nothing else (:func:`check_output_folder`)."""
        folder = Path(folder).expanduser().resolve()
        check_replaceable_output(folder, overwrite=overwrite, owned_files=store_files, what="pattern store",
                                 error=RetrievalError)
        partial = new_work_folder(folder.parent, f".{folder.name}.partial-")
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
        """Read a store, checking everything a crafted or damaged one could get wrong (:class:`RetrievalError`
        naming the file and the fix): ``store.json``'s fields and their ranges, the tensors file's header, one
        ``[MoE layers, experts]`` pattern per task, every value finite."""
        folder = Path(folder).expanduser()
        record_path, tensors_path = folder / STORE_JSON, folder / STORE_TENSORS
        if not record_path.is_file() or not tensors_path.is_file():
            raise RetrievalError(f"{folder} is not a pattern store (expected {STORE_JSON} and {STORE_TENSORS}); "
                                 "build one with `moecompress store build MODEL --tasks name=files ... --out DIR`")
        rebuild = "rebuild it with `moecompress store build`"
        if record_path.stat().st_size > MAX_STORE_JSON_BYTES:
            raise RetrievalError(f"{record_path} is {record_path.stat().st_size} bytes, far more than a pattern store "
                                 f"records; it is not a store moecompress wrote: {rebuild}")
        record = read_json(record_path)
        if record is None:
            raise RetrievalError(f"{record_path} is not a JSON object (damaged or not written by moecompress); "
                                 f"{rebuild}")
        if record.get("format") != STORE_FORMAT or record.get("version") != STORE_VERSION:
            raise RetrievalError(f"{folder} has format {describe_value(record.get('format'))} version "
                                 f"{describe_value(record.get('version'))}; this moecompress reads {STORE_FORMAT!r} "
                                 f"version {STORE_VERSION}: rebuild the store")
        try:
            fields = _StoreRecord.model_validate(record)
        except pydantic.ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"]) or "(record)"
            raise RetrievalError(f"{record_path}: {where}: {problem['msg'].removeprefix('Value error, ')}; the store is "
                                 f"damaged or was edited by hand: {rebuild}") from None
        try:
            read_safetensors_header(tensors_path)
            tensors = load_file(str(tensors_path))
        except CheckpointError as error:
            raise RetrievalError(f"{error} ({tensors_path.name} of pattern store {folder}: {rebuild})") from None
        except (SafetensorError, OSError) as error:
            raise RetrievalError(f"pattern store {folder} is unreadable ({error}); {rebuild}") from None
        shape = (len(fields.moe_layers), fields.num_experts)
        patterns = {}
        for task in fields.tasks:
            matrix = tensors.get(f"tcess/{task}")
            if matrix is None or tuple(matrix.shape) != shape or not matrix.is_floating_point():
                found = "missing" if matrix is None else f"{list(matrix.shape)} {str(matrix.dtype).removeprefix('torch.')}"
                raise RetrievalError(f"{tensors_path}: the pattern of task {task!r:.60} is {found}, not a float "
                                     f"[{shape[0]}, {shape[1]}] matrix (MoE layers x experts); {rebuild}")
            if not all_finite(matrix):
                raise RetrievalError(f"{tensors_path}: the pattern of task {task!r:.60} holds NaN or infinite values, "
                                     f"so no distance to it means anything; {rebuild}")
            patterns[task] = matrix.float()
        return cls(patterns=patterns, moe_layers=fields.moe_layers, fingerprint=fields.model_fingerprint,
                   tcess=TcessOptions(**fields.tcess.model_dump()), key_layers=fields.key_layers,
                   super_experts=[(layer, expert) for layer, expert in fields.super_experts], tasks=fields.tasks,
                   calibration=fields.calibration, model_top_k=fields.model_top_k)

    def check_model(self, folder: str | Path) -> None:
        fingerprint = routing_fingerprint(folder)
        if fingerprint != self.fingerprint:
            raise RetrievalError(f"this pattern store was built for another model (fingerprint {self.fingerprint[:12]}, "
                                 f"{folder} has {fingerprint[:12]}); rebuild it for this model with `moecompress store build`")


MAX_STORE_JSON_BYTES = 16 << 20  # a store of thousands of tasks is a few MB


class _TcessRecord(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    top_k: pydantic.PositiveInt | None = None
    threshold: float = pydantic.Field(0.0, lt=1.0, allow_inf_nan=False)
    phi: Literal["identity", "peu"] = "peu"


class _StoreRecord(pydantic.BaseModel):
    """``store.json`` as :meth:`PatternStore.describe` writes it; the checks a crafted store must pass."""

    model_fingerprint: str
    moe_layers: list[pydantic.NonNegativeInt] = pydantic.Field(min_length=1)
    num_experts: pydantic.PositiveInt
    model_top_k: pydantic.PositiveInt = 1
    tcess: _TcessRecord
    key_layers: list[int] = pydantic.Field(min_length=1)
    super_experts: list[tuple[int, int]] = []
    calibration: dict = {}
    tasks: dict[str, dict] = pydantic.Field(min_length=1)

    @pydantic.model_validator(mode="after")
    def _consistent(self):
        if len(set(self.moe_layers)) != len(self.moe_layers):
            raise ValueError("moe_layers lists a layer twice")
        if self.model_top_k > self.num_experts:
            raise ValueError(f"model_top_k {self.model_top_k} exceeds num_experts {self.num_experts}")
        if self.tcess.top_k is not None and self.tcess.top_k > self.num_experts:
            raise ValueError(f"tcess.top_k {self.tcess.top_k} exceeds num_experts {self.num_experts}")
        if not set(self.key_layers) <= set(self.moe_layers):
            raise ValueError(f"key_layers {describe_value(self.key_layers)} are not all MoE layers")
        for layer, expert in self.super_experts:
            if layer not in self.moe_layers or not 0 <= expert < self.num_experts:
                raise ValueError(f"super expert {(layer, expert)} is not an expert of an MoE layer")
        for task, info in self.tasks.items():
            if not task or "/" in task or not isinstance(info.get("num_tokens", 0), int) \
                    or not isinstance(info.get("files", []), list):
                raise ValueError(f"task {task!r:.60} has no valid record (name, files, num_tokens)")
        return self


def store_files(folder: Path) -> set[str] | None:
    """The files a pattern store in ``folder`` consists of, or None when ``folder`` holds no store (what
    ``--overwrite`` may replace: :func:`moecompress.folders.check_replaceable_output`)."""
    record = read_json(Path(folder) / STORE_JSON)
    return {STORE_JSON, STORE_TENSORS} if record is not None and record.get("format") == STORE_FORMAT else None


def matching_key(tcess_by_layer: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """The vector matched under L2: one layer's raw TCESS (paper), or several layers' L2-normalised and concatenated."""
    layers = sorted(tcess_by_layer)
    if len(layers) == 1:
        return tcess_by_layer[layers[0]].float()
    return torch.cat([torch.nn.functional.normalize(tcess_by_layer[layer].float(), dim=0) for layer in layers])


def check_output_folder(out: str | Path, inputs: Sequence[tuple[str, str | Path]], *, overwrite: bool,
                        owned_files: Callable[[Path], set[str] | None], what: str) -> Path:
    """The rules of every command that writes a folder (as ``compress``): ``out`` is none of the ``inputs``
    (``(label, path)``: the model, the store, the task files...), inside none and around none; a non-empty ``out``
    is replaced only with ``overwrite``, only when it is this command's own ``what`` (``owned_files``), and only when
    it holds nothing else. Returns ``out`` resolved."""
    out = Path(out).expanduser().resolve()
    check_output_placement(out, inputs, RetrievalError)
    check_replaceable_output(out, overwrite=overwrite, owned_files=owned_files, what=what, error=RetrievalError)
    return out


def parse_task_spec(spec: str) -> tuple[str, list[str]]:
    """``name=file1,file2`` -> (name, files)."""
    name, sep, files = spec.partition("=")
    paths = [path for path in files.split(",") if path]
    if not sep or not name or not paths or "/" in name:
        raise RetrievalError(f"--tasks entry {describe_value(spec)} is not NAME=FILE[,FILE...]; e.g. code=data/code.jsonl")
    return name, paths


def build_pattern_store(source: str | Path, tasks: Mapping[str, Sequence[str | Path]], *, num_samples: int = 64,
                        seq_len: int = 256, seed: int = 0, tcess: TcessOptions | None = None,
                        key_layers: Sequence[int] | None = None, dtype: torch.dtype | None = None,
                        batch_size: int = 8, device=None,
                        on_task: Callable[[str, int, int], None] | None = None) -> PatternStore:
    """One calibration pass per task (statistics ``tcess_markers`` and ``max_abs_expert_output``, lazily layer by
    layer from the checkpoint) -> a :class:`PatternStore`. Super experts use the maximum over all task passes."""
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
    if tcess.top_k is not None and tcess.top_k > views[0].num_experts:
        raise RetrievalError(f"TCESS top_k {tcess.top_k} exceeds the model's {views[0].num_experts} experts per layer; "
                             f"choose --tcess-top-k between 1 and {views[0].num_experts}")
    context = context_length(skeleton.config)
    if context is not None and seq_len > context:
        raise RetrievalError(f"--seq-len {seq_len} exceeds the model's context ({context} tokens); choose "
                             f"--seq-len <= {context}")
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
        if not all_finite(patterns[task]):
            raise RetrievalError(f"the TCESS pattern of task {task!r} holds NaN or infinite values: the model's router "
                                 f"weights or activations are not finite on this text; check the checkpoint {folder}")
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
        patterns=patterns, moe_layers=moe_layers, fingerprint=routing_fingerprint(folder), tcess=tcess,
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
        layouts = moe_layouts(model)
        layers_path = module_names(model)[id(decoder_layers(model))]
        embeddings_path = module_names(model)[id(model.get_input_embeddings())]
        skipped_experts = layouts[last].experts_path + "."

        def wanted(key: str) -> bool:
            if key.startswith(embeddings_path + "."):
                return True
            if not key.startswith(layers_path + "."):
                return False
            layer = int(key[len(layers_path) + 1:].split(".", 1)[0])
            return layer < last or (layer == last and not key.startswith(skipped_experts))

        expert_ids = {layer: list(range(layout.view.num_experts)) for layer, layout in layouts.items()}
        assemble(model, sources, full_shapes=state_shapes(model), expert_ids=expert_ids, dtype=dtype, device=device,
                 wanted=wanted)
        model.eval()
        return cls(model, tokenizer, key_layers, tcess)

    def prompt_ids(self, prompt: str | Sequence[int]) -> torch.Tensor:
        """``[1, S]``: the separator token (as every calibration row starts), then the prompt's tokens. A prompt
        longer than the model's context is refused (before tokenizing, when its bytes alone cannot fit): scoring
        it would be attention over far more tokens than the model was made for."""
        context = context_length(self.model.config)
        if isinstance(prompt, str) and context is not None:
            size, most = len(prompt.encode("utf-8", errors="replace")), context * max_token_bytes(self.tokenizer)
            if size > most:
                raise RetrievalError(f"the prompt is {size} bytes, more than fit in the model's context of {context} "
                                     f"tokens (at most {most} bytes); give a shorter prompt, e.g. its first part")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RetrievalError("the prompt is empty; give some text to choose a task pattern from")
        if context is not None and len(ids) + 1 > context:
            raise RetrievalError(f"the prompt is {len(ids)} tokens; the model's context is {context} tokens (the "
                                 f"separator included); give a prompt of at most {context - 1} tokens")
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


def context_length(config) -> int | None:
    """The model's context (``max_position_embeddings`` of its text config), or None when the config has none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def max_token_bytes(tokenizer) -> int:
    """An upper bound on the bytes one token stands for: the longest vocabulary entry in UTF-8 (byte-level and
    SentencePiece entries are never shorter in UTF-8 than the text they decode to)."""
    cached = getattr(tokenizer, "_moecompress_max_token_bytes", None)
    if cached is None:
        cached = max((len(token.encode("utf-8", errors="replace")) for token in tokenizer.get_vocab()), default=1)
        try:
            tokenizer._moecompress_max_token_bytes = cached
        except AttributeError:  # pragma: no cover - a tokenizer that refuses attributes: recomputed next time
            pass
    return max(cached, 1)


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
        scores = self.scorer().score(prompt)
        bad = [layer for layer, markers in scores.items() if not all_finite(markers)]
        if bad:
            raise RetrievalError(f"the prompt's TCESS markers at key layer(s) {bad} are NaN or infinite, so no pattern "
                                 f"is nearer than another: the checkpoint {self.folder} is damaged (its weights or "
                                 "router are not finite); re-download or re-save it")
        return self.store.nearest(scores)

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
            raise RetrievalError(f"the pattern store has no task {describe_value(task)}; it has "
                                 f"{describe_value(self.store.task_names, 200)}")
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
        self.sources.resident = shareable_tensors(model_tensors(model), model)
        return Retrieval(task, {}, kept, build_bytes=self.checkpoint.bytes_read - before,
                         total_checkpoint_bytes=self.checkpoint.total_bytes,
                         experts_read=counts["experts_read"], experts_from_memory=counts["experts_from_memory"])


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
