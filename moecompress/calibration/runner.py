"""Layer-by-layer calibration: run the calibration tokens through one decoder layer at a time.

1. *Catch*: replace decoder layer 0 with a catcher and run the model's base forward on each batch; the catcher
   records what layer 0 would receive (hidden states after the embeddings, and the keyword arguments: position
   embeddings, causal mask, position ids) and stops the forward.
2. *Sweep*: for each decoder layer ``l``, put its weights on the compute device (loaded lazily from safetensors when
   the source is a checkpoint folder), attach the statistics collectors of its MoE block, run every cached batch
   through it (the outputs replace the cache and feed layer ``l+1``), collect, release the weights.

Only one decoder layer's weights and the cached activations (``num_samples x seq_len x d``) are in memory at a time,
so a checkpoint larger than RAM can be profiled. In a run over several ranks (:mod:`moecompress.distributed`) each
rank catches and runs only its own consecutive calibration batches (whole batches: every batch is computed exactly as
one process computes it) and the statistics are combined across ranks after each layer. The experts run through the calibration backend
(``moecompress.calibration.backend``), which computes the statistics from the same routed slices as the forward.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from moecompress.calibration.backend import LayerCollector, calibration_backend
from moecompress.calibration.data import CalibrationSet
from moecompress.calibration.statistics import LayerStatistics, check_statistic_names
from moecompress.checkpoint.lazy import LazyCheckpoint, build_skeleton, release_module
from moecompress.checkpoint.validation import resolve_checkpoint
from moecompress.distributed import World, current_world
from moecompress.errors import CalibrationError
from moecompress.models import decoder_layers, find_moe_blocks

ProgressCallback = Callable[[int, int], None]  # (layers done, total layers)


class _StopForward(Exception):
    """Raised by the layer-0 catcher once it has the layer's inputs."""


class _LayerInputCatcher(nn.Module):
    """Stands in for decoder layer 0: records ``(hidden_states, args, kwargs)`` and stops the forward."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.captured: list[tuple[torch.Tensor, tuple, dict]] = []
        for attribute in ("attention_type", "layer_idx", "is_sliding"):  # read by some base models' mask logic
            if hasattr(layer, attribute):
                setattr(self, attribute, getattr(layer, attribute))

    def forward(self, hidden_states, *args, **kwargs):
        self.captured.append((hidden_states, args, kwargs))
        raise _StopForward


@dataclass
class CalibrationRun:
    """What one pass produced: statistics per MoE layer (keyed by decoder-layer index) and its cost."""

    layers: dict[int, LayerStatistics]
    num_tokens: int
    seconds: float
    domain_names: list[str] = field(default_factory=list)
    num_hidden_layers: int = 0
    final_hidden_states: list[torch.Tensor] | None = None  # per batch ``[B, S, d]`` after the last layer (if asked)


class LayerwiseRunner:
    """Runs calibration batches through a model layer by layer.

    model: an in-memory causal LM, or a meta-device skeleton with ``checkpoint`` to load layers from.
    device: where each layer runs (default: CPU, or the model's device).
    dtype: compute dtype for lazily loaded weights (default: the checkpoint's ``torch_dtype``).
    world: the ranks of the run (default: this process's, :func:`moecompress.distributed.current_world`); each runs
    its share of the calibration batches and the statistics are combined.
    """

    def __init__(self, model: nn.Module, *, checkpoint: LazyCheckpoint | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 expert_selection: dict[int, list[int]] | None = None, world: World | None = None) -> None:
        self.model = model
        self.world = world or current_world()
        self.checkpoint = checkpoint
        # decoder layer -> original ids of the experts its (meta, already pruned) MoE block keeps: only those are read
        self.expert_selection = dict(expert_selection or {})
        self.dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if device is None:
            first = next(model.parameters()).device
            device = "cpu" if first.type == "meta" else first
        self.device = torch.device(device)
        self.layers = decoder_layers(model)
        self.layers_path = _module_path(model, self.layers)
        self.views = find_moe_blocks(model)
        if checkpoint is not None:
            _keep_large_allocations_returnable()

    @classmethod
    def from_source(cls, source: nn.Module | str | Path, *, device=None, dtype=None) -> "LayerwiseRunner":
        """A runner over an in-memory model, or over a checkpoint folder/hub id loaded lazily layer by layer."""
        if isinstance(source, nn.Module):
            return cls(source, device=device, dtype=dtype)
        folder = resolve_checkpoint(source)
        model, _ = build_skeleton(folder, dtype=dtype)
        return cls(model, checkpoint=LazyCheckpoint(folder, model), device=device, dtype=dtype or model.dtype)

    # ----- step 1: layer-0 inputs ------------------------------------------------------------------------------
    def catch_layer0_inputs(self, input_ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, tuple, dict]]:
        """``[N, S]`` token ids -> per batch ``(hidden_states [B, S, d], args, kwargs)`` as layer 0 receives them."""
        base = getattr(self.model, "model", self.model)
        embeddings = self.model.get_input_embeddings()
        embeddings_path = _module_path(self.model, embeddings)
        moved = self._onload(embeddings, embeddings_path)
        rotary = getattr(base, "rotary_emb", None)
        if rotary is not None:
            rotary.to(self.device)
        catcher = _LayerInputCatcher(self.layers[0])
        original_layer0 = self.layers[0]
        self.layers[0] = catcher
        try:
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start:start + batch_size].to(self.device)
                try:
                    base(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
        finally:
            self.layers[0] = original_layer0
            self._offload(embeddings, moved)
        return catcher.captured

    # ----- step 2: the sweep -----------------------------------------------------------------------------------
    def run(self, calibration: CalibrationSet | torch.Tensor, names: list[str], *, options: dict[str, dict] | None = None,
            batch_size: int = 8, on_layer: ProgressCallback | None = None,
            layer_callback: Callable[[int, nn.Module, list[LayerCollector]], None] | None = None,
            return_hidden_states: bool = False) -> CalibrationRun:
        """Collect ``names`` for every MoE layer. ``layer_callback(layer_index, layer, collectors)`` runs while the
        layer's weights are loaded (after its statistics are complete), for stages that act per layer."""
        names = check_statistic_names(names)
        input_ids, domain_names, token_domains = _unpack_calibration(calibration)
        num_tokens = int(input_ids.numel())
        input_ids, token_domains = rank_share(self.world, input_ids, token_domains, batch_size)
        options = {name: dict(value) for name, value in (options or {}).items()}
        if "expert_token_counts_by_domain" in names:
            options.setdefault("expert_token_counts_by_domain", {})["num_domains"] = max(len(domain_names), 1)
        started = time.perf_counter()
        results: dict[int, LayerStatistics] = {}
        views_by_layer: dict[int, list] = {}
        for view in self.views:
            views_by_layer.setdefault(view.layer_index, []).append(view)
        with torch.no_grad(), calibration_backend(self.model, self.views):
            cached = self.catch_layer0_inputs(input_ids, batch_size)
            batch_domains = _split_domains(token_domains, [hidden.shape[0] * hidden.shape[1] for hidden, _, _ in cached])
            total = len(self.layers)
            for layer_index, layer in enumerate(self.layers):
                moved = self._onload(layer, f"{self.layers_path}.{layer_index}", layer_index)
                collectors = [LayerCollector(view, names, options) for view in views_by_layer.get(layer_index, [])]
                for collector in collectors:
                    collector.attach()
                try:
                    for batch_index, (hidden, args, kwargs) in enumerate(cached):
                        for collector in collectors:
                            collector.domain_ids = batch_domains[batch_index]
                        output = layer(hidden, *args, **kwargs)
                        output = output[0] if isinstance(output, tuple) else output
                        cached[batch_index] = (output, args, kwargs)
                finally:
                    for collector in collectors:
                        collector.detach()
                for collector in collectors:
                    collector.combine_ranks(self.world)
                    results[layer_index] = collector.result()
                if layer_callback is not None:
                    layer_callback(layer_index, layer, collectors)
                self._offload(layer, moved)
                if on_layer is not None:
                    on_layer(layer_index + 1, total)
        return CalibrationRun(
            layers=results,
            num_tokens=num_tokens,
            seconds=time.perf_counter() - started,
            domain_names=domain_names,
            num_hidden_layers=len(self.layers),
            final_hidden_states=[hidden for hidden, _, _ in cached] if return_hidden_states else None,
        )

    # ----- a sweep that edits layers (sequential quantisation) ------------------------------------------------
    def sweep(self, calibration: CalibrationSet | torch.Tensor,
              process_layer: Callable[[int, nn.Module, "LayerReplay"], None], *, batch_size: int = 8,
              on_layer: ProgressCallback | None = None,
              finish_layer: Callable[[int, nn.Module], None] | None = None) -> float:
        """Run ``process_layer(layer_index, layer, replay)`` on each decoder layer in order, then propagate.

        ``replay`` runs the cached calibration inputs of the layer through it as often as the callback needs
        (collecting statistics of the layer as it is *now*); after the callback, the layer's outputs (of the edited
        layer) become the next layer's inputs. So each layer is processed on the inputs the processed model gives it
        (GPTQ's sequential mode). ``finish_layer(layer_index, layer)`` runs after the propagation, while the layer is
        still loaded (to swap in modules that are slower to run than the ones propagated through). Returns the
        seconds taken.
        """
        input_ids, domain_names, token_domains = _unpack_calibration(calibration)
        input_ids, token_domains = rank_share(self.world, input_ids, token_domains, batch_size)
        started = time.perf_counter()
        with torch.no_grad(), calibration_backend(self.model, self.views):
            cached = self.catch_layer0_inputs(input_ids, batch_size)
            batch_domains = _split_domains(token_domains, [hidden.shape[0] * hidden.shape[1] for hidden, _, _ in cached])
            total = len(self.layers)
            for layer_index, layer in enumerate(self.layers):
                moved = self._onload(layer, f"{self.layers_path}.{layer_index}", layer_index)
                replay = LayerReplay(self.model, layer_index, layer, cached, self.world, batch_domains,
                                     num_domains=max(len(domain_names), 1))
                process_layer(layer_index, layer, replay)
                replay.propagate()
                if finish_layer is not None:
                    finish_layer(layer_index, layer)
                self._offload(layer, moved)
                if on_layer is not None:
                    on_layer(layer_index + 1, total)
        return time.perf_counter() - started

    def each_layer(self, process_layer: Callable[[int, nn.Module], None], *,
                   on_layer: ProgressCallback | None = None) -> float:
        """Run ``process_layer(layer_index, layer)`` on each decoder layer in order with its weights loaded, without
        calibration data (edits that need no inputs: RTN, applying decided expert pruning). Returns the seconds."""
        started = time.perf_counter()
        total = len(self.layers)
        with torch.no_grad():
            for layer_index, layer in enumerate(self.layers):
                moved = self._onload(layer, f"{self.layers_path}.{layer_index}", layer_index)
                process_layer(layer_index, layer)
                self._offload(layer, moved)
                if on_layer is not None:
                    on_layer(layer_index + 1, total)
        return time.perf_counter() - started

    # ----- weights on and off the compute device ---------------------------------------------------------------
    def _onload(self, module: nn.Module, path: str, layer_index: int | None = None):
        """Put ``module`` (decoder layer ``layer_index``, or None for the embeddings) on the compute device; returns
        what :meth:`_offload` needs to undo it."""
        if self.checkpoint is not None:
            self.checkpoint.load_module(module, path + "." if path else "", dtype=self.dtype, device=self.device,
                                        expert_ids=self.expert_selection.get(layer_index))
            return "lazy"
        previous = next(module.parameters()).device
        if previous != self.device:
            module.to(self.device)
        return previous

    def _offload(self, module: nn.Module, moved) -> None:
        if moved == "lazy":
            release_module(module)
            # An experts module a stage replaced while the layer was loaded (packed experts in place of the fused
            # ones) is no longer inside the layer, but this runner's views still reference it: release it too, or
            # every layer of a streamed run would stay in memory.
            for view in self.views:
                if any(view.block is submodule for submodule in module.modules()):
                    release_module(view.experts)
            _return_freed_memory()
        elif moved != self.device:
            module.to(moved)


class LayerReplay:
    """The cached calibration inputs of one decoder layer, run through it on demand (see :meth:`LayerwiseRunner.sweep`).

    Views are looked up afresh on every call, so statistics follow edits the caller made (packed experts, pruned
    experts). Forward hooks the caller registers on the layer's modules see every call too.
    """

    def __init__(self, model: nn.Module, layer_index: int, layer: nn.Module,
                 cached: list[tuple[torch.Tensor, tuple, dict]], world: World | None = None,
                 batch_domains: list[torch.Tensor | None] | None = None, num_domains: int = 1) -> None:
        self.model = model
        self.layer_index = layer_index
        self.layer = layer
        self.cached = cached  # this rank's batches
        self.world = world or current_world()
        # calibration domain of every token of each batch (None: unknown), for per-domain statistics
        self.batch_domains = batch_domains or [None] * len(cached)
        self.num_domains = num_domains

    def views(self) -> list:
        """The MoE blocks of this decoder layer, as they are now."""
        return [view for view in find_moe_blocks(self.model) if view.layer_index == self.layer_index]

    def collect(self, names: list[str] = (), options: dict[str, dict] | None = None,
                hessian_owners: list[int] | None = None) -> dict[int, LayerStatistics]:
        """Run every cached batch through the layer, collecting ``names`` per MoE block; the cache is unchanged.
        The statistics are combined over the ranks; ``hessian_owners`` (the rank of each expert of the Hessians'
        chunk) sends each per-expert Hessian only to its owner (the other ranks' copies are then partial)."""
        names = check_statistic_names(names)
        options = dict(options or {})
        if "expert_token_counts_by_domain" in names:
            options["expert_token_counts_by_domain"] = {**options.get("expert_token_counts_by_domain", {}),
                                                        "num_domains": self.num_domains}
        collectors = [LayerCollector(view, names, options) for view in self.views()]
        self._forward(collectors, keep_outputs=False)
        for collector in collectors:
            collector.combine_ranks(self.world, hessian_owners)
        return {collector.view.layer_index: collector.result() for collector in collectors}

    def propagate(self) -> None:
        """Replace the cached inputs by this layer's outputs (the next layer's inputs)."""
        self._forward([LayerCollector(view, []) for view in self.views()], keep_outputs=True)

    def _forward(self, collectors: list[LayerCollector], keep_outputs: bool) -> None:
        for collector in collectors:
            collector.attach()
        try:
            for batch_index, (hidden, args, kwargs) in enumerate(self.cached):
                for collector in collectors:
                    collector.domain_ids = self.batch_domains[batch_index]
                output = self.layer(hidden, *args, **kwargs)
                if keep_outputs:
                    self.cached[batch_index] = (output[0] if isinstance(output, tuple) else output, args, kwargs)
        finally:
            for collector in collectors:
                collector.detach()


def collect_statistics(model_or_checkpoint: nn.Module | str | Path, calibration: CalibrationSet | torch.Tensor,
                       names: list[str], *, options: dict[str, dict] | None = None, device=None,
                       dtype: torch.dtype | None = None, batch_size: int = 8,
                       on_layer: ProgressCallback | None = None) -> dict[int, LayerStatistics]:
    """One layer-by-layer pass collecting ``names`` (see ``moecompress.calibration.statistics``).

    model_or_checkpoint: a loaded model (run in place), or a checkpoint folder / hub id (loaded lazily, one
    decoder layer at a time). Returns ``{decoder layer index: LayerStatistics}`` for every MoE layer.
    """
    runner = LayerwiseRunner.from_source(model_or_checkpoint, device=device, dtype=dtype)
    return runner.run(calibration, names, options=options, batch_size=batch_size, on_layer=on_layer).layers


def _unpack_calibration(calibration) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    if isinstance(calibration, CalibrationSet):
        input_ids = calibration.input_ids
        token_domains = calibration.domain_ids().repeat_interleave(calibration.seq_len)
        return input_ids, calibration.domain_names, token_domains
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim != 2 or calibration.numel() == 0:
            raise CalibrationError(f"calibration token ids must be a non-empty [num_samples, seq_len] tensor, "
                                   f"got shape {tuple(calibration.shape)}")
        return calibration.long(), [], None
    raise CalibrationError(f"calibration must be a CalibrationSet or a [N, S] token-id tensor, got {type(calibration).__name__}")


def rank_share(world: World, input_ids: torch.Tensor, token_domains: torch.Tensor | None,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's calibration sequences ``[n, S]`` (and their token domains): a consecutive block of whole batches of
    ``batch_size``, so each batch is the one a single process runs and the ranks' batches in rank order are all of
    them. A world of one gets everything."""
    num_batches = -(-input_ids.shape[0] // batch_size)
    if num_batches < world.size:
        raise CalibrationError(f"the calibration set has {num_batches} batch(es) of {batch_size} sequences, fewer than "
                               f"the {world.size} ranks of this run; use more calibration.num_samples, a smaller "
                               "calibration.batch_size, or fewer ranks")
    batches = world.owned(num_batches)
    start, stop = batches.start * batch_size, min(batches.stop * batch_size, input_ids.shape[0])
    if token_domains is not None:
        seq_len = input_ids.shape[1]
        token_domains = token_domains[start * seq_len:stop * seq_len]
    return input_ids[start:stop], token_domains


def _split_domains(token_domains: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    if token_domains is None:
        return [None] * len(sizes)
    return list(torch.split(token_domains, sizes))


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise CalibrationError(f"module {type(target).__name__} is not part of the model")


def _return_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the OS. Without it, the many per-expert reads of each layer
    fragment the heap and resident memory grew by ~15 MB per layer (measured on a 27-layer checkpoint); with it,
    it stays flat at one layer's worth."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None

# glibc's mallopt parameter number of M_MMAP_THRESHOLD, and the threshold a lazy run fixes it at.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 20


def _keep_large_allocations_returnable() -> None:
    """Serve every allocation of 1 MiB or more by its own ``mmap`` (returned to the OS on free), for runs that must
    stay at one layer's memory. By default glibc raises this threshold each time a large block is freed, so later
    tensors of that size come from the heap, which fragments: a streamed GPTQ run (many same-sized temporaries per
    expert stack) then grew by ~0.2 GiB within each layer (measured by ``benchmarks/calibration_memory.py
    --stages prune+gptq``: peak 1.14 GB without, 0.91 GB with). No-op off glibc."""
    global _MALLOPT_DONE
    if _MALLOPT_DONE:
        return
    _MALLOPT_DONE = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


_MALLOPT_DONE = False


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (and of the GPU, if one was used), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024
    if torch.cuda.is_available():
        peak = max(peak, int(torch.cuda.max_memory_allocated()))
    return int(peak)

