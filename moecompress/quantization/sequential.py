"""Sequential quantisation of a model: decoder layer by decoder layer, in the order MoEQuant's code uses.

Inside each decoder layer (methods.md section 4, "Order inside a decoder layer"):
1. attention projections (``targets: attention``), on Hessians of their inputs;
2. the router stays in full precision (pitfall 9): routing is therefore recorded after step 1, under the quantised
   attention, when the expert Hessians are collected;
3. every routed expert's gate/up (and shared experts' and dense MLPs' gate/up), on per-expert Hessians of the
   routed inputs, AGQ-weighted by each token's combine weight when ``agq`` is on;
4. every down projection, on Hessians of ``h = act(gate x) * up x`` recomputed with the quantised gate/up.
The layer's outputs, computed by the quantised layer, are the next layer's calibration inputs.

Per-expert Hessians (``E d^2`` floats a layer) are collected in chunks of experts that fit ``hessian_memory_bytes``:
one pass of the layer per chunk. Cold experts (fewer routed tokens than ``cold_token_floor``, default the
projection's input width) get, with ``cold_damping`` on, a damping that grows as their token count falls,
``damp + (1 - n / floor)`` times the mean Hessian diagonal, which moves GPTQ towards plain rounding (the limit of a
large damping); off, they get GPTQ's plain ``damp`` (as GPTQ and MoEQuant do). An expert no token reached is
rounded (RTN). Either way every scale is finite; such experts are listed in the result.

Over several ranks (:mod:`moecompress.distributed`) each rank runs its own calibration batches, each per-expert
Hessian is summed into the rank that owns the expert, each rank solves its own experts and linears, and the results
are shared (:mod:`moecompress.quantization.ranks`), so every rank holds the same quantised layer; rank
``layer % world size`` stages the finished layer on disk.

The quantised experts become :class:`moecompress.kernels.backend.PackedExperts`, quantised linears
:class:`moecompress.kernels.linear.PackedLinear`, and ``config.quantization_config`` describes them (the native
format, ``moecompress.checkpoint.native``), so the model saves and reloads with ``from_pretrained``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from moecompress import progress
from moecompress.calibration.runner import LayerReplay, LayerwiseRunner
from moecompress.calibration.statistics import LayerStatistics
from moecompress.checkpoint.native import MoECompressQuantizationConfig, prepare_skeleton
from moecompress.checkpoint.shards import LayerFiles
from moecompress.distributed import World, current_world
from moecompress.errors import MoECompressError, UnsupportedModelError
from moecompress.kernels.backend import PackedExperts
from moecompress.kernels.layout import SUPPORTED_BITS, PackedLinearWeight
from moecompress.kernels.linear import PackedLinear
from moecompress.models import decoder_layers, find_moe_blocks
from moecompress.models.edits import replace_experts
from moecompress.models.view import MoEBlockView
from moecompress.quantization.gptq import gptq_quantize, hessian_weighted_error
from moecompress.quantization.packing import SCALE_SEARCHES, quantize_rtn
from moecompress.quantization.ranks import owned_keys, owners, share_solved

TARGETS = ("routed_experts", "shared_experts", "attention", "dense_mlp")
DOWN_PROJECTION_NAMES = ("down_proj", "w2", "c_proj", "fc2", "dense_4h_to_h")


@dataclass
class QuantizationSettings:
    """What to quantise and how (the ``rtn`` / ``gptq`` stage options, resolved).

    bit_map: ``{(layer, expert): bits}`` decided by an earlier stage; experts it does not name use ``bits``.
    """

    method: Literal["rtn", "gptq"] = "gptq"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    scale_search: str = "mse"  # clipped group scales, or "minmax" (moecompress.quantization.packing.SCALE_SEARCHES)
    damp: float = 0.01
    act_order: bool = False
    agq: bool = False
    targets: tuple[str, ...] = ("routed_experts",)
    cold_token_floor: int | None = None
    cold_damping: bool = True  # extra damping below the token floor (off: GPTQ's plain damp for every expert)
    hessian_memory_bytes: int = 1 << 30
    bit_map: dict[tuple[int, int], int] | None = None
    # Folder where each finished decoder layer is written; a re-run with the same ``fingerprint`` loads the layers
    # found there instead of quantising them again (a killed run resumes at the first layer not yet written).
    progress_dir: Path | None = None
    fingerprint: str = ""
    # Statistics to collect, at no extra pass, in each MoE layer's first pass (its experts not yet quantised, its
    # inputs from the quantised layers before it): what a run that skipped the profiling pass reports (super
    # experts, expert usage). Returned in ``QuantizationResult.sweep_statistics``.
    sweep_statistics: tuple[str, ...] = ()

    def round_to_nearest(self, weight: torch.Tensor, bits: int) -> PackedLinearWeight:
        """RTN of ``weight [..., out, in]`` at ``bits`` with these settings' groups, symmetry and scale search."""
        return quantize_rtn(weight, bits, self.group_size, self.symmetric, scale_search=self.scale_search)

    def expert_bits(self, layer: int, expert: int) -> int:
        if self.bit_map and (layer, expert) in self.bit_map:
            return int(self.bit_map[(layer, expert)])
        return self.bits


@dataclass
class ExpertRecord:
    """One routed expert: its width, routed calibration tokens (None for RTN), and the relative output error
    ``tr(D H D^T) / tr(W H W^T)`` of its gate/up and down (None for RTN); cold = below the token floor."""

    layer: int
    expert: int
    bits: int
    tokens: int | None = None
    gate_up_error: float | None = None
    down_error: float | None = None
    cold: bool = False


@dataclass
class QuantizationResult:
    experts: list[ExpertRecord] = field(default_factory=list)
    linears: dict[str, dict] = field(default_factory=dict)  # module path -> {"bits", "error"}
    seconds_per_layer: dict[int, float] = field(default_factory=dict)
    # decoder layer -> the native-format description of its packed modules (``{"layers": ..., "linears": ...}``)
    layer_configs: dict[int, dict] = field(default_factory=dict)
    # MoE layer -> the ``settings.sweep_statistics`` of its first pass
    sweep_statistics: dict[int, LayerStatistics] = field(default_factory=dict)

    def quantization_config(self) -> MoECompressQuantizationConfig:
        """The model's native ``quantization_config``, merged from every layer's (no module is read)."""
        layers, linears = {}, {}
        for layer_config in self.layer_configs.values():
            layers.update(layer_config.get("layers", {}))
            linears.update(layer_config.get("linears", {}))
        return MoECompressQuantizationConfig(layers=layers, linears=linears)

    def bit_widths(self) -> dict[str, list[int]]:
        """``{layer: [bits per expert]}`` (the report's bit-width map)."""
        widths: dict[str, list[int]] = {}
        for record in sorted(self.experts, key=lambda r: (r.layer, r.expert)):
            widths.setdefault(str(record.layer), []).append(record.bits)
        return widths

    def to_dict(self) -> dict:
        return {"experts": [asdict(record) for record in self.experts], "linears": self.linears,
                "seconds_per_layer": {str(layer): seconds for layer, seconds in self.seconds_per_layer.items()}}


# ----- checks ------------------------------------------------------------------------------------------------------
def check_quantizable(model: nn.Module, settings: QuantizationSettings) -> None:
    """Raise :class:`MoECompressError` for settings this model cannot take (before any work)."""
    unknown = [target for target in settings.targets if target not in TARGETS]
    if unknown:
        raise MoECompressError(f"unknown quantisation target(s) {unknown}; choose from {list(TARGETS)}")
    if settings.bits not in SUPPORTED_BITS:
        raise MoECompressError(f"bits={settings.bits} cannot be packed; use one of {list(SUPPORTED_BITS)}")
    if settings.scale_search not in SCALE_SEARCHES:
        raise MoECompressError(f"scale_search={settings.scale_search!r} is not known; use one of "
                               f"{list(SCALE_SEARCHES)}")
    for (layer, expert), bits in (settings.bit_map or {}).items():
        if int(bits) not in SUPPORTED_BITS:
            raise MoECompressError(f"the bit map gives layer {layer} expert {expert} {bits} bits, which cannot be "
                                   f"packed; allowed: {list(SUPPORTED_BITS)}")
    views = find_moe_blocks(model)
    for view in views:
        if view.storage != "concatenated" or getattr(view.experts, "gate_up_proj_bias", None) is not None \
                or view.routing.scales_expert_input:
            raise UnsupportedModelError(
                f"{view.family}: quantised experts need the concatenated, bias-free expert layout with the combine "
                "weight applied to the output; this family's experts cannot be quantised yet (leave them out)")
        if view.expert_id_map is not None:
            raise UnsupportedModelError(
                f"layer {view.layer_index} holds experts merged with router_rule='remap' (the full router maps onto "
                "merged experts), which quantised experts cannot hold yet; merge with router_rule='collapse'")
    for target in settings.targets:
        if target != "routed_experts" and not _modules_for_target(model, target):
            raise MoECompressError(f"quantisation target {target!r} matches nothing in this {views[0].family} model "
                                   f"(e.g. it has no shared experts or dense MLP layers); remove it from `targets`")


# ----- the driver --------------------------------------------------------------------------------------------------
def quantize_model(model: nn.Module, settings: QuantizationSettings, calibration=None, *, device=None,
                   batch_size: int = 8, on_layer: Callable[[int, int], None] | None = None,
                   runner: LayerwiseRunner | None = None,
                   before_layer: Callable[[int, nn.Module], None] | None = None) -> QuantizationResult:
    """Quantise ``model`` in place (RTN needs no ``calibration``; GPTQ does). Returns what was done per expert.

    runner: the layer-by-layer runner to go through (default: one over the in-memory ``model``); a runner over a
    lazily loaded checkpoint makes this a streamed run, where each layer is loaded, edited, quantised, written to
    ``settings.progress_dir`` and released (``moecompress.streaming``). ``before_layer(layer_index, layer)`` runs on
    each layer as soon as its weights are loaded, before it is quantised (the streamed run applies expert pruning
    there).
    """
    check_quantizable(model, settings)
    result = QuantizationResult()
    runner = runner or LayerwiseRunner(model, device=device)
    world = runner.world
    progress = _LayerProgress(settings.progress_dir, settings.fingerprint, world) if settings.progress_dir else None
    if settings.method == "gptq" and calibration is None:
        raise MoECompressError("GPTQ needs calibration data; add a `calibration:` section to the recipe")

    def process(layer_index: int, layer: nn.Module, replay: LayerReplay | None) -> None:
        if before_layer is not None:
            before_layer(layer_index, layer)
        if progress is not None and progress.restore(model, layer_index, layer, result):
            return  # written by an earlier, stopped run: only propagated
        started = time.perf_counter()
        if settings.method == "rtn":
            _quantize_layer_rtn(model, layer_index, settings, result)
        else:
            quantized_layer = _GPTQLayer(model, layer_index, layer, replay, settings, result)
            quantized_layer.run()
            # propagate through the packed experts, as a resumed run does through the layers it restores: the
            # fused experts hold the same dequantised weights, but another matmul path may round differently
            quantized_layer.install_packed_experts()
        result.seconds_per_layer[layer_index] = time.perf_counter() - started

    def finish(layer_index: int, layer: nn.Module) -> None:
        if layer_index in result.seconds_per_layer:  # quantised now, not restored
            result.layer_configs[layer_index] = _layer_quantization_config(model, layer_index).to_dict()
            if progress is not None:
                progress.save(model, layer_index, layer, result)

    if settings.method == "rtn":
        runner.each_layer(lambda index, layer: (process(index, layer, None), finish(index, layer)), on_layer=on_layer)
    else:
        runner.sweep(calibration, process, batch_size=batch_size, on_layer=on_layer, finish_layer=finish)
    world.barrier()  # every rank's staged layers are on disk before anyone reads or removes them
    model.config.quantization_config = result.quantization_config()
    return result


# ----- resuming --------------------------------------------------------------------------------------------------
class _LayerProgress:
    """Finished decoder layers on disk (:class:`moecompress.checkpoint.shards.LayerFiles`): the layer's state dict, its
    packed modules' config and expert records, valid for one ``fingerprint`` (stage options + calibration data).
    Over several ranks, rank ``layer % size`` writes a layer, and whether a layer is there is rank 0's reading, so
    every rank restores (or quantises) the same layers."""

    def __init__(self, folder: Path, fingerprint: str, world: World | None = None) -> None:
        self.world = world or current_world()
        self.files = open_layer_files(folder, fingerprint, self.world)

    def save(self, model: nn.Module, layer_index: int, layer: nn.Module, result: QuantizationResult) -> None:
        if layer_index % self.world.size != self.world.rank:
            return
        layer_config = result.layer_configs[layer_index]
        sweep = result.sweep_statistics.get(layer_index)
        self.files.save(layer_index, layer, {
            "config": layer_config,
            "experts": [asdict(record) for record in result.experts if record.layer == layer_index],
            "linears": {path: spec for path, spec in result.linears.items() if path in layer_config.get("linears", {})},
            "sweep_statistics": None if sweep is None else {
                "num_experts": sweep.num_experts, "num_tokens": sweep.num_tokens, "values": _to_lists(sweep.values)},
        })

    def restore(self, model: nn.Module, layer_index: int, layer: nn.Module, result: QuantizationResult) -> bool:
        saved = self.world.broadcast_object(self.files.metadata(layer_index) if self.world.is_main else None)
        if saved is None:
            return False
        prepare_skeleton(model, MoECompressQuantizationConfig(**{k: v for k, v in saved["config"].items()
                                                                   if k != "quant_method"}),
                         dtype=next(p.dtype for p in layer.parameters() if p.is_floating_point()))
        device = next(p.device for p in layer.parameters() if p.device.type != "meta")
        layer.load_state_dict(self.files.tensors(layer_index, device=str(device)), strict=True, assign=True)
        result.experts.extend(ExpertRecord(**record) for record in saved["experts"])
        result.linears.update(saved["linears"])
        result.layer_configs[layer_index] = saved["config"]
        sweep = saved.get("sweep_statistics")
        if sweep is not None:
            result.sweep_statistics[layer_index] = LayerStatistics(layer_index, sweep["num_experts"],
                                                                   sweep["num_tokens"], _to_tensors(sweep["values"]))
        return True


def _to_lists(value):
    """Tensors (in dicts) as nested lists, for a JSON file."""
    if isinstance(value, dict):
        return {key: _to_lists(item) for key, item in value.items()}
    return {"tensor": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}


def _to_tensors(value):
    """:func:`_to_lists` undone."""
    if "tensor" in value:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    return {key: _to_tensors(item) for key, item in value.items()}


def open_layer_files(folder: Path, fingerprint: str, world: World) -> LayerFiles:
    """:class:`LayerFiles` opened by every rank; rank 0 first, since opening empties a folder of another run."""
    files = LayerFiles(folder, fingerprint) if world.is_main else None
    world.barrier()
    return files or LayerFiles(folder, fingerprint)


def _layer_quantization_config(model: nn.Module, layer_index: int) -> MoECompressQuantizationConfig:
    """The native-format description of one decoder layer's packed modules (only that layer is read: in a streamed
    run the other layers are on the meta device)."""
    return MoECompressQuantizationConfig.from_model(model, layer_index=layer_index)


# ----- RTN ---------------------------------------------------------------------------------------------------------
def _quantize_layer_rtn(model: nn.Module, layer_index: int, settings: QuantizationSettings,
                        result: QuantizationResult) -> None:
    layer = decoder_layers(model)[layer_index]
    for path, linear in _layer_linears(model, layer_index, layer, settings.targets):
        packed = settings.round_to_nearest(linear.weight.detach(), settings.bits)
        _replace_linear(model, path, linear, packed)
        result.linears[path] = {"bits": settings.bits, "error": _weight_error(linear.weight, packed)}
    for view in (v for v in find_moe_blocks(model) if v.layer_index == layer_index):
        gate_up, down = [], []
        for expert in range(view.num_experts):
            bits = settings.expert_bits(layer_index, expert)
            weights = view.expert_weights(expert)
            gate_up.append(settings.round_to_nearest(torch.cat([weights.gate, weights.up]), bits))
            down.append(settings.round_to_nearest(weights.down, bits))
            result.experts.append(ExpertRecord(layer_index, expert, bits))
        _install_packed_experts(view, gate_up, down)


# ----- GPTQ --------------------------------------------------------------------------------------------------------
class _GPTQLayer:
    """GPTQ (or AGQ) on one decoder layer, in MoEQuant's order (see the module docstring)."""

    def __init__(self, model, layer_index, layer, replay: LayerReplay, settings: QuantizationSettings,
                 result: QuantizationResult) -> None:
        self.model, self.layer_index, self.layer, self.replay = model, layer_index, layer, replay
        self.settings, self.result = settings, result
        self.world = replay.world
        self.records: dict[tuple[int, int], ExpertRecord] = {}
        self.hessian_suffix = "_affinity" if settings.agq else ""

    def run(self) -> None:
        linears = _layer_linears(self.model, self.layer_index, self.layer, self.settings.targets)
        attention = [(path, linear) for path, linear in linears if _is_attention(path)]
        first_half = [(path, linear) for path, linear in linears if not _is_attention(path) and not _is_down(path)]
        second_half = [(path, linear) for path, linear in linears if not _is_attention(path) and _is_down(path)]
        if attention:
            self._quantize_linears(attention, self._linear_hessians(attention))
        views = self.replay.views() if "routed_experts" in self.settings.targets else []
        self.gate_up = self._quantize_experts(views, "gate_up", first_half)
        self.down = self._quantize_experts(views, "down", second_half)
        self.result.experts.extend(self.records[key] for key in sorted(self.records))

    def install_packed_experts(self) -> None:
        """Swap the fused experts (which hold the dequantised weights) for packed ones."""
        for view in self.replay.views():
            _install_packed_experts(view, self.gate_up[view.layer_index], self.down[view.layer_index])

    # Routed experts, plus the non-attention linears of the same half (shared experts, dense MLP), whose Hessians
    # come from the same passes of the layer.
    def _quantize_experts(self, views: list[MoEBlockView], half: str, linears) -> dict[int, list[PackedLinearWeight]]:
        hessian_name = ("expert_input_hessian" if half == "gate_up" else "down_proj_hessian") + self.hessian_suffix
        shared_name = ("shared_input_hessian" if half == "gate_up" else "shared_down_hessian") + self.hessian_suffix
        if not views and not linears:
            return {}
        targeted = dict(linears)
        shared_paths = {path: owner for path, owner in _shared_linear_paths(self.model, views, half).items()
                        if path in targeted}
        hook_linears = [(path, linear) for path, linear in linears if path not in shared_paths]
        hooks = _LinearInputHessians(hook_linears)
        packed: dict[int, list[PackedLinearWeight]] = {view.layer_index: [] for view in views}
        first_chunk = True
        try:
            for view in views or [None]:
                chunks = _expert_chunks(view, half, self.settings.hessian_memory_bytes) if view is not None else [None]
                for chunk in chunks:
                    names = ["expert_token_counts"] if view is not None else []
                    options = {}
                    chunk_owners = None
                    if view is not None:
                        names.append(hessian_name)
                        options[hessian_name] = {"experts": list(chunk), "on_device": True}
                        chunk_owners = owners(self.world, chunk[1] - chunk[0])  # each Hessian to its solver
                    if first_chunk and shared_paths:
                        names.append(shared_name)
                    first_pass = view is not None and half == "gate_up" and chunk[0] == 0
                    if first_pass:  # the layer's experts are not quantised yet
                        names += [name for name in self.settings.sweep_statistics if name not in names]
                    hooks.enabled = first_chunk
                    statistics = self.replay.collect(names, options, hessian_owners=chunk_owners)
                    if first_pass and self.settings.sweep_statistics:
                        found = statistics[view.layer_index]
                        self.result.sweep_statistics[view.layer_index] = LayerStatistics(
                            view.layer_index, found.num_experts, found.num_tokens,
                            {name: found[name] for name in self.settings.sweep_statistics})
                    if first_chunk:
                        self._quantize_shared(statistics, shared_name, shared_paths, linears)
                        first_chunk = False
                    if view is None:
                        continue
                    layer_statistics = statistics[view.layer_index]
                    packed[view.layer_index] += self._quantize_expert_chunk(
                        view, list(range(*chunk)), half, layer_statistics[hessian_name],
                        layer_statistics["expert_token_counts"])
                    progress.detail(chunk[1], view.num_experts, f"experts {half.replace('_', '/')}")
            if hook_linears:
                self._quantize_linears(hook_linears, hooks.hessians(self.world))
        finally:
            hooks.remove()
        return packed

    def _quantize_expert_chunk(self, view: MoEBlockView, experts: list[int], half: str, hessians: torch.Tensor,
                               token_counts: torch.Tensor) -> list[PackedLinearWeight]:
        """GPTQ of ``experts``' gate/up (``[2I, d]`` each) or down (``[d, I]``), with ``hessians [n, k, k]``.

        Experts of one width are quantised as one stack (one column sweep for all). The dequantised weights are
        written back into the fused tensor, so the down Hessians see ``h`` from the quantised gate/up.
        """
        settings = self.settings
        fused = view.experts.gate_up_proj if half == "gate_up" else view.experts.down_proj
        _check_finite(fused[experts[0]:experts[-1] + 1], f"layer {view.layer_index} experts {half}")
        packed: dict[int, PackedLinearWeight] = {}
        errors: dict[int, float] = {}
        stacks: dict[int, list[tuple[int, int, float]]] = {}  # bits -> [(offset in chunk, expert, damping)]
        owned = set(owned_keys(self.world, experts))  # the other experts' Hessians are complete on other ranks
        for offset, expert in enumerate(experts):
            bits, tokens = settings.expert_bits(view.layer_index, expert), int(token_counts[expert])
            record = self.records.setdefault((view.layer_index, expert),
                                             ExpertRecord(view.layer_index, expert, bits, tokens))
            floor = settings.cold_token_floor or fused.shape[2]
            record.cold = record.cold or tokens < floor
            if expert not in owned:
                continue
            damp = _cold_damping(settings.damp, tokens, floor if settings.cold_damping else 0, hessians[offset])
            if damp is None:  # no calibration signal at all: plain rounding
                packed[expert] = settings.round_to_nearest(fused[expert].detach(), bits)
                errors[expert] = float("nan")
            else:
                stacks.setdefault(bits, []).append((offset, expert, damp))
        out_features, in_features = fused.shape[1], fused.shape[2]
        for bits, all_members in stacks.items():
            for members in _gptq_stacks(all_members, out_features, in_features, settings.hessian_memory_bytes):
                self._gptq_stack(fused, hessians, members, bits, packed, errors)
        share_solved(self.world, experts, packed, errors)
        for expert in experts:
            fused.data[expert] = packed[expert].dequantize(fused.dtype)
            record = self.records[(view.layer_index, expert)]
            if half == "gate_up":
                record.gate_up_error = errors[expert]
            else:
                record.down_error = errors[expert]
        return [packed[expert] for expert in experts]

    def _gptq_stack(self, fused: torch.Tensor, hessians: torch.Tensor, members: list[tuple[int, int, float]], bits: int,
                    packed: dict[int, PackedLinearWeight], errors: dict[int, float]) -> None:
        """GPTQ of one stack of experts ``members = [(offset in the chunk's Hessians, expert, damping)]``."""
        settings = self.settings
        offsets, stack_experts, damps = (list(column) for column in zip(*members))
        contiguous = offsets == list(range(offsets[0], offsets[-1] + 1))
        stack_hessians = hessians[offsets[0]:offsets[-1] + 1] if contiguous else hessians[offsets]  # no copy
        result = gptq_quantize(fused.detach()[stack_experts], stack_hessians, bits, group_size=settings.group_size,
                               symmetric=settings.symmetric, damp=torch.tensor(damps), act_order=settings.act_order,
                               scale_search=settings.scale_search)
        for position, expert in enumerate(stack_experts):
            packed[expert] = result.packed.select(position)
            errors[expert] = result.relative_error[position]

    def _gptq(self, weight: torch.Tensor, hessian: torch.Tensor, bits: int, tokens: int,
              floor: int) -> tuple[PackedLinearWeight, float]:
        settings = self.settings
        _check_finite(weight, f"layer {self.layer_index} weight")
        damp = _cold_damping(settings.damp, tokens, floor, hessian)
        if damp is None:  # no calibration signal at all: plain rounding
            return settings.round_to_nearest(weight, bits), float("nan")
        result = gptq_quantize(weight, hessian, bits, group_size=settings.group_size, symmetric=settings.symmetric,
                               damp=damp, act_order=settings.act_order, scale_search=settings.scale_search)
        return result.packed, result.relative_error

    def _quantize_shared(self, statistics, shared_name: str, shared_paths: dict[str, tuple[int, int]], linears) -> None:
        by_path = dict(linears)
        for path, (layer, index) in shared_paths.items():
            hessian = statistics[layer][shared_name][index]
            self._quantize_linears([(path, by_path[path])], {path: hessian})

    def _linear_hessians(self, linears) -> dict[str, torch.Tensor]:
        hooks = _LinearInputHessians(linears)
        try:
            self.replay.collect([])
        finally:
            hooks.remove()
        return hooks.hessians(self.world)

    def _quantize_linears(self, linears, hessians: dict[str, torch.Tensor]) -> None:
        """GPTQ of plain linears ``[(path, nn.Linear)]``: each rank solves its block of them (``hessians`` holds
        the complete Hessians of those), then every rank installs all of them."""
        settings = self.settings
        paths = [path for path, _ in linears]
        packed: dict[str, PackedLinearWeight] = {}
        errors: dict[str, float] = {}
        for path, linear in linears:
            if path in owned_keys(self.world, paths):
                packed[path], errors[path] = self._gptq(linear.weight.detach(), hessians[path], settings.bits,
                                                        tokens=1, floor=1)
        share_solved(self.world, paths, packed, errors)
        for path, linear in linears:
            _replace_linear(self.model, path, linear, packed[path])
            self.result.linears[path] = {"bits": settings.bits, "error": errors[path]}


class _LinearInputHessians:
    """Forward pre-hooks that accumulate ``sum x x^T`` of each named linear's input over all tokens (each batch's
    product in fp32, summed in fp64 as the expert Hessians are: :mod:`moecompress.calibration.statistics`)."""

    def __init__(self, linears) -> None:
        self.enabled = True
        self._linears = list(linears)
        self._sums: dict[str, torch.Tensor] = {}
        self._handles = [linear.register_forward_pre_hook(self._hook(path)) for path, linear in linears]

    def _hook(self, path: str):
        def hook(module, args):
            if not self.enabled:
                return
            inputs = args[0].reshape(-1, args[0].shape[-1]).float()
            total = self._sums.get(path)
            if total is None:
                total = self._sums[path] = inputs.new_zeros(inputs.shape[1], inputs.shape[1], dtype=torch.float64)
            total.add_(inputs.T @ inputs)
        return hook

    def hessians(self, world: World) -> dict[str, torch.Tensor]:
        """fp32 ``{path: [in, in]}``, each summed over the ranks into the rank that solves that linear."""
        rank_of = dict(zip([path for path, _ in self._linears], owners(world, len(self._linears))))
        for path, linear in self._linears:
            if path not in self._sums:  # this rank saw no token of it
                size = linear.in_features
                self._sums[path] = torch.zeros(size, size, dtype=torch.float64, device=linear.weight.device)
            world.reduce_to_(self._sums[path], rank_of[path])
        return {path: total.float() for path, total in self._sums.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ----- module discovery --------------------------------------------------------------------------------------------
def linears_for_targets(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    """``(model path, nn.Linear)`` of every linear that quantisation ``targets`` other than the routed experts name
    (``shared_experts``, ``attention``, ``dense_mlp``), in layer order (works on a meta skeleton)."""
    return [found for target in targets if target != "routed_experts" for found in _modules_for_target(model, target)]


def _modules_for_target(model: nn.Module, target: str) -> list[tuple[str, nn.Linear]]:
    found = []
    for layer_index, layer in enumerate(decoder_layers(model)):
        found += _layer_linears(model, layer_index, layer, (target,))
    return found


def _layer_linears(model: nn.Module, layer_index: int, layer: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    """``(model path, nn.Linear)`` of the decoder layer that ``targets`` (other than routed experts) name."""
    layer_path = next(name for name, module in model.named_modules() if module is layer)
    views = [view for view in find_moe_blocks(model) if view.layer_index == layer_index]
    shared_modules = {id(shared.module) for view in views for shared in view.shared_experts}
    moe_blocks = {id(view.block) for view in views}
    excluded = {id(module) for view in views for module in (view.router, view.experts)}
    excluded |= {id(view.router_linear) for view in views if view.router_linear is not None}
    excluded |= {id(shared.gate) for view in views for shared in view.shared_experts if shared.gate is not None}
    found = []
    for name, module in layer.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in excluded:
            continue
        owners = _owners(layer, name)
        if any(id(owner) in shared_modules for owner in owners):
            kind = "shared_experts"
        elif _is_attention(name):
            kind = "attention"
        elif any(id(owner) in moe_blocks for owner in owners):
            continue  # a linear of the MoE block that is neither router nor shared expert: leave it alone
        else:
            kind = "dense_mlp"
        if kind in targets:
            found.append((f"{layer_path}.{name}", module))
    return found


def _owners(root: nn.Module, name: str) -> list[nn.Module]:
    """The modules on the path from ``root`` to ``root.get_submodule(name)`` (both excluded)."""
    owners, module = [], root
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
        owners.append(module)
    return owners


def _shared_linear_paths(model: nn.Module, views: list[MoEBlockView], half: str) -> dict[str, tuple[int, int]]:
    """Shared experts' gate/up (or down) linears: model path -> (layer, shared expert index)."""
    paths = {}
    module_paths = {id(module): name for name, module in model.named_modules()}
    for view in views:
        for index, shared in enumerate(view.shared_experts):
            names = ("gate_proj", "up_proj") if half == "gate_up" else ("down_proj",)
            for name in names:
                linear = getattr(shared.module, name, None)
                if isinstance(linear, nn.Linear):
                    paths[module_paths[id(linear)]] = (view.layer_index, index)
    return paths


def _is_attention(path: str) -> bool:
    return any(part in ("self_attn", "attention", "attn", "self_attention") or part.endswith("_attn")
               for part in path.split("."))


def _is_down(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in DOWN_PROJECTION_NAMES


# GPTQ on a stack of B experts holds about this many fp32 copies of the stacked weights (the weights, the working
# copy, codes as float and as int64, the block update, the dequantised result), besides the Hessians and factors.
GPTQ_WEIGHT_COPIES = 8


def _gptq_stacks(members: list, out_features: int, in_features: int, memory_bytes: int) -> list[list]:
    """Split one width's experts into stacks whose GPTQ working memory (weights and inverse-Hessian factors) fits
    ``memory_bytes``: a chunk's Hessians can be many, but one column sweep need not hold all their weights."""
    per_expert = (GPTQ_WEIGHT_COPIES * out_features + in_features) * in_features * 4
    size = max(1, memory_bytes // per_expert)
    return [members[start:start + size] for start in range(0, len(members), size)]


# Bytes per Hessian element while a chunk is collected: the fp64 accumulator and its fp32 result.
HESSIAN_BYTES_PER_ELEMENT = 12


def _expert_chunks(view: MoEBlockView, half: str, memory_bytes: int) -> list[tuple[int, int]]:
    size = view.hidden_size if half == "gate_up" else view.intermediate_size
    per_expert = size * size * HESSIAN_BYTES_PER_ELEMENT
    chunk = max(1, min(view.num_experts, memory_bytes // per_expert))
    return [(start, min(start + chunk, view.num_experts)) for start in range(0, view.num_experts, chunk)]


# ----- module edits ------------------------------------------------------------------------------------------------
def _install_packed_experts(view: MoEBlockView, gate_up: list[PackedLinearWeight],
                            down: list[PackedLinearWeight]) -> None:
    device = view.experts.gate_up_proj.device
    packed = PackedExperts(gate_up, down, view.experts.act_fn, getattr(view.experts, "config", None)).to(device)
    replace_experts(view, packed)


def _replace_linear(model: nn.Module, path: str, linear: nn.Linear, packed: PackedLinearWeight) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    bias = None if linear.bias is None else linear.bias.detach()
    setattr(parent, name, PackedLinear(packed.to(linear.weight.device), bias))


def _cold_damping(damp: float, tokens: int, floor: int, hessian: torch.Tensor) -> float | None:
    """The damping of a weight whose Hessian saw ``tokens`` tokens: ``damp + (1 - tokens / floor)`` below the
    floor (towards plain rounding, the limit of a large damping), ``damp`` above it (and for ``floor`` 0: cold damping
    off); None when the Hessian holds no signal at all (no token, or all-zero inputs), where the caller rounds (RTN)."""
    if tokens == 0 or float(hessian.diagonal().sum()) == 0:
        return None
    return damp + max(0.0, 1.0 - tokens / floor) if floor > 0 else damp


def _check_finite(weight: torch.Tensor, what: str) -> None:
    if not torch.isfinite(weight).all():
        raise MoECompressError(f"{what} holds NaN or inf before quantisation; the checkpoint is damaged")


def _weight_error(weight: torch.Tensor, packed: PackedLinearWeight) -> float:
    eye = torch.eye(weight.shape[1])
    return hessian_weighted_error(weight.detach().float(), packed.dequantize(torch.float32), eye)
