"""What a compressed-tensors export can hold so that each consumer it names loads it exactly, checked before any work.

The rules run on an :class:`ExportPlan`, a description of the quantized model: per MoE layer the experts' widths,
group size, symmetry and input widths, and the quantized plain linears. The plan comes from a finished native
folder (:func:`plan_of_checkpoint`, what ``moecompress export`` checks) or from a recipe's stages on the model's meta
skeleton (:func:`plan_of_recipe`, what ``compress --export`` and a recipe's ``export:`` check before calibration
starts), so a recipe whose output could not be exported fails in seconds, with the same one-line message.

A refused export is one line: the first problem, its reason, and the fix.

vLLM (its compressed-tensors MoE loader, ``ecosystem.md`` 2.2; checked by ``scripts/check_vllm.sh``):

=====================================  ==============================================  =================================
Case                                   Why vLLM cannot serve it                        Fix
=====================================  ==============================================  =================================
experts of one layer at several        one quantization scheme per MoE layer           ``granularity: layer`` or
widths                                 ("All MoE projections need to have same          ``--widen-to-layer-max``
                                       quantization scheme")
MoE layers with different expert       one expert count per model (``num_experts``)    ``layer_budget: uniform``
counts
variable-width (CAMERA physical)       one ``[E, N, K]`` shape per layer               ``pad_to: 64``
experts
1-bit (binary) experts                 WNA16 MoE takes 2-8 bits                        ``--widen-to-layer-max`` (layers
                                                                                       with a wider expert) or bits >= 2
asymmetric 2- or 3-bit                 zero-point MoE kernels cover 4/8 bits only      ``symmetric: true``
group size not dividing a tensor-      each rank's slice must hold whole groups        ``group_size`` dividing
parallel shard's input width                                                           ``in / tp`` (e.g. 32)
=====================================  ==============================================  =================================

Plain transformers (``integrations/compressed_tensors.py``, 5.25; the test matrix in
``tests/test_export_consumers.py`` loads every shape): it decodes the fused experts of **every** MoE layer with one
scheme, the first config group whose ``re:`` targets mention experts (``get_experts_scheme``), and without zero
points. So:

=====================================  ==============================================  =================================
MoE layers' experts at different       a layer whose data is wider than that scheme    ``--widen-to-model-max`` (exact,
schemes (per-layer widths)             decodes to wrong weights without an error        larger) or ``--for vllm``
asymmetric experts                     zero points are dropped: it raises               ``symmetric: true`` or
                                                                                       ``--for vllm``
=====================================  ==============================================  =================================

Unless the export is ``--for vllm``, both are refused. With ``--for vllm`` the exporter writes the config groups so
that transformers raises on such a folder instead of loading it wrong (:mod:`moecompress.export.compressed_tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moecompress.checkpoint.native_reader import NativeCheckpoint
from moecompress.errors import MoECompressError
from moecompress.models.families import find_moe_blocks
from moecompress.pruning.base import ExpertBudgetOptions
from moecompress.pruning.camera_p import CameraPruning
from moecompress.quantization.camera_q import CameraQuantization
from moecompress.quantization.pmq import DROP, PMQStage
from moecompress.quantization.sequential import linears_for_targets
from moecompress.quantization.stages import QuantizeStage

VLLM_MOE_BITS = range(2, 9)  # WNA16_SUPPORTED_BITS of vLLM's compressed-tensors MoE method (0.32, 0.33)
CONSUMERS = ("transformers", "vllm")  # who a compressed-tensors export is for, unless `--for` names one
# The group sizes tried for a fix hint, widest first (the kernels read one scale per 16-column tile).
_HINT_GROUP_SIZES = (128, 64, 32, 16)


class NotDeployableError(MoECompressError):
    """The checkpoint holds something the requested export format (as its consumers read it) cannot."""


@dataclass(frozen=True)
class Problem:
    """One reason an export is refused: ``case`` (a stable id, for tests and the report), ``reason``, ``fix``."""

    case: str
    reason: str
    fix: str

    def message(self) -> str:
        return f"{self.reason}; {self.fix}"


@dataclass(frozen=True)
class ExpertLayerPlan:
    """One MoE layer's routed experts as the export would store them.

    ``widths``: the expert widths the layer holds (from a recipe: may hold); ``mixed``: its experts are (or may be)
    at several widths; ``hidden``: gate/up's input width; ``intermediate``: down's input width (None: not known
    before the run, e.g. after CAMERA-P with ``pad_to``)."""

    layer: int
    widths: tuple[int, ...]
    mixed: bool
    group_size: int
    symmetric: bool
    hidden: int
    intermediate: int | None


@dataclass(frozen=True)
class LinearPlan:
    """One quantized plain linear (attention, shared expert, dense MLP)."""

    path: str
    bits: int
    group_size: int
    symmetric: bool
    in_features: int


@dataclass
class ExportPlan:
    """What a compressed-tensors export would hold (see the module docstring). ``problems`` are the structural ones
    found while planning (expert counts, variable widths: every format refuses them); ``source`` names the folder or
    the run's output in messages."""

    source: str
    expert_layers: list[ExpertLayerPlan] = field(default_factory=list)
    linears: list[LinearPlan] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    pad_to: int | None = None  # CAMERA-P pads the experts to a multiple of this (their width is known after the run)
    segmented: bool = False  # CAMERA-Q channel segments of different widths inside each expert


# ----- structural problems (shared with the hf export) ---------------------------------------------------------
def variable_width_problem(checkpoint: NativeCheckpoint) -> Problem | None:
    """CAMERA-P ``physical`` experts (``config.moecompress["variable_width"]``): each expert its own width."""
    return VARIABLE_WIDTH if checkpoint.record.get("variable_width") else None


def expert_count_problem(checkpoint: NativeCheckpoint) -> Problem | None:
    counts = {int(layer): int(count) for layer, count in (checkpoint.record.get("num_experts_per_layer") or {}).items()}
    if len(set(counts.values())) <= 1:
        return None
    summary = ", ".join(f"layer {layer}: {count}" for layer, count in sorted(counts.items())[:4])
    return _expert_counts(f"({summary}, ...)")


VARIABLE_WIDTH = Problem("variable_width",
                         "the experts have different widths (CAMERA-P physical pruning), which no fused MoE kernel stores",
                         "re-run camera_p with `pad_to: 64` (one width for all experts)")


def _expert_counts(detail: str) -> Problem:
    return Problem("expert_counts",
                   f"MoE layers keep different expert counts {detail}, but vLLM and plain transformers build every "
                   "layer with one num_experts", "prune with `layer_budget: uniform`")


# ----- plans -------------------------------------------------------------------------------------------------------
def plan_of_checkpoint(checkpoint: NativeCheckpoint) -> ExportPlan:
    """The export plan of a finished native folder (exact: what it holds)."""
    plan = ExportPlan(source=str(checkpoint.folder), segmented=bool(checkpoint.record.get("camera_q")))
    plan.problems = [problem for problem in (variable_width_problem(checkpoint), expert_count_problem(checkpoint))
                     if problem]
    hidden = int(checkpoint.text_config["hidden_size"])
    for layer in checkpoint.expert_layers:
        widths = tuple(sorted(set(layer.expert_bits)))
        intermediate = checkpoint.shape(f"{layer.prefix}.gate_up_proj_packed_w{layer.expert_bits[0]}")[-2] // 2
        plan.expert_layers.append(ExpertLayerPlan(layer.layer, widths, len(widths) > 1, layer.group_size,
                                                  layer.symmetric, hidden, intermediate))
    plan.linears = [LinearPlan(spec.path, spec.bits, spec.group_size, spec.symmetric,
                               checkpoint.linear_in_features(spec.path)) for spec in checkpoint.packed_linears]
    return plan


def plan_of_recipe(model, stages, source: str = "the recipe's output") -> ExportPlan:
    """The export plan a recipe's ``stages`` would produce from ``model`` (its meta skeleton: shapes only).

    Read from the stages' options: expert pruning with ``layer_budget: global`` (expert counts per layer differ),
    CAMERA-P ``physical`` (variable widths, or ``pad_to`` widths), MC-MoE PMQ (its candidate widths; per expert or
    per layer), then the ``rtn`` / ``gptq`` stage (bits, group size, symmetry, targets). A recipe without a
    quantizer plans no packed weights (the compressed-tensors export then refuses, as it does for the folder)."""
    plan = ExportPlan(source=source)
    views = find_moe_blocks(model)
    intermediate: int | None = None if not views else views[0].intermediate_size
    allocated: tuple[tuple[int, ...], bool] | None = None  # (widths, mixed within a layer) from PMQ
    for stage in stages:
        options = stage.options
        if isinstance(options, ExpertBudgetOptions) and options.budget == "global":
            plan.problems.append(_expert_counts(f"({stage.method} with `layer_budget: global`)"))
        elif isinstance(stage, CameraPruning) and options.mode == "physical":
            if options.pad_to is None:
                plan.problems.append(VARIABLE_WIDTH)
            else:
                intermediate, plan.pad_to = None, options.pad_to  # a multiple of pad_to, known after the run
        elif isinstance(stage, PMQStage):
            widths = tuple(bits for bits in options.candidates if bits != DROP)
            allocated = (widths, options.granularity == "expert" and len(widths) > 1)
            if DROP in options.candidates:
                plan.problems.append(_expert_counts("(mcmoe_pmq candidate 0 drops experts per layer)"))
        elif isinstance(stage, CameraQuantization):
            plan.segmented = True
        elif isinstance(stage, QuantizeStage):
            widths, mixed = allocated if allocated is not None else ((options.bits,), False)
            plan.expert_layers = [ExpertLayerPlan(view.layer_index, widths, mixed, options.group_size,
                                                  options.symmetric, view.hidden_size, intermediate)
                                  for view in views]
            plan.linears = [LinearPlan(path, options.bits, options.group_size, options.symmetric, linear.in_features)
                            for path, linear in linears_for_targets(model, [t for t in options.targets
                                                                            if t != "routed_experts"])]
    return plan


# ----- the rules ---------------------------------------------------------------------------------------------------
def plan_problems(plan: ExportPlan, *, tp: int = 1, widen_to_layer_max: bool = False,
                  widen_to_model_max: bool = False, consumers: tuple[str, ...] = CONSUMERS) -> list[Problem]:
    """Everything in ``plan`` that a compressed-tensors export could not give each of ``consumers`` exactly, at
    tensor-parallel size ``tp``, after the widening asked for. Empty: exportable."""
    problems = list(plan.problems)
    if plan.segmented:
        problems.append(Problem("camera_q", "CAMERA-Q stores each expert in channel segments of different widths, "
                                "which no compressed-tensors scheme describes",
                                "quantize with `rtn` / `gptq` (and `mcmoe_pmq`) instead"))
    group_sizes = {layer.group_size for layer in plan.expert_layers if layer.group_size > 0}
    for group_size in sorted(group_sizes):
        if plan.pad_to is not None and plan.pad_to % group_size:
            problems.append(Problem(
                "group_size", f"camera_p pads the experts to multiples of {plan.pad_to}, which group_size {group_size} "
                "does not divide, so down_proj's input could end in a partial group",
                f"use a `pad_to` that is a multiple of {group_size}, or a `group_size` dividing {plan.pad_to}"))
    widened = widen_to_layer_max or widen_to_model_max
    model_max = max((max(layer.widths) for layer in plan.expert_layers), default=0)
    if widen_to_model_max:
        problems += _model_widening_problems(plan)
    for layer in plan.expert_layers:
        if layer.mixed and not widened:
            problems.append(Problem(
                "mixed_widths", f"layer {layer.layer} has experts at {list(layer.widths)} bits, but vLLM runs one "
                "quantization scheme per MoE layer", "quantize with `granularity: layer`, or export with "
                "--widen-to-layer-max"))
            continue
        stored = _stored_widths(layer, widened, widen_to_model_max, model_max)
        narrow = [bits for bits in stored if bits not in VLLM_MOE_BITS]
        if narrow:
            problems.append(Problem(
                "bits", f"layer {layer.layer}'s experts are {narrow[0]}-bit, but vLLM's MoE kernels take 2 to 8 bits",
                "use bit choices of at least 2 for the experts"))
        inputs = {"gate_proj/up_proj input (hidden)": (layer.hidden, False)}
        if layer.intermediate is not None:
            inputs["down_proj input (intermediate)"] = (layer.intermediate, True)
        problems += _scheme_problems(f"layer {layer.layer}'s experts", stored, layer.symmetric, layer.group_size,
                                     inputs, tp)
    for linear in plan.linears:
        problems += _scheme_problems(linear.path, (linear.bits,), linear.symmetric, linear.group_size,
                                     {f"{linear.path} input": (linear.in_features, _row_parallel(linear.path))}, tp)
    if "transformers" in consumers:
        problems += _transformers_problems(plan, widen_to_layer_max=widen_to_layer_max,
                                           widen_to_model_max=widen_to_model_max)
    return problems


def _model_widening_problems(plan: ExportPlan) -> list[Problem]:
    """``--widen-to-model-max`` needs one group size and one symmetry for every MoE layer's experts."""
    kinds = sorted({(layer.group_size, layer.symmetric) for layer in plan.expert_layers})
    if len(kinds) <= 1:
        return []
    return [Problem("widen_to_model_max", f"MoE layers' experts use different group sizes or symmetry {kinds}, so "
                    "no one scheme holds them all", "quantize every layer with one `group_size` and `symmetric`, or "
                    "export with --for vllm")]


def _transformers_problems(plan: ExportPlan, *, widen_to_layer_max: bool, widen_to_model_max: bool) -> list[Problem]:
    """What plain transformers' compressed-tensors loader cannot decode exactly (see the module docstring)."""
    if not plan.expert_layers:
        return []
    asymmetric = [layer.layer for layer in plan.expert_layers if not layer.symmetric]
    if asymmetric:
        return [Problem("transformers_asymmetric", f"layer {asymmetric[0]}'s experts are asymmetric, but plain "
                        "transformers decodes MoE experts without their zero points (it refuses such a folder)",
                        "quantize with `symmetric: true`, or export with --for vllm (vLLM serves 4- and 8-bit zero "
                        "points)")]
    if widen_to_model_max:
        return []
    schemes = set()
    for layer in plan.expert_layers:
        schemes |= {(bits, layer.group_size) for bits in _stored_widths(layer, widen_to_layer_max, False, 0)}
    if len(schemes) <= 1:
        return []
    widths = sorted({bits for bits, _ in schemes})
    return [Problem("transformers_mixed", f"MoE layers' experts would be stored at different schemes ({_bits(widths)}), "
                    "but plain transformers decodes every layer's experts with one scheme and would load wrong weights",
                    f"export with --widen-to-model-max (every layer at {max(widths)} bits: exact, larger), or with "
                    "--for vllm (vLLM only; plain transformers then refuses the folder)")]


def _stored_widths(layer: ExpertLayerPlan, widened: bool, widen_to_model_max: bool, model_max: int) -> tuple[int, ...]:
    """The widths a layer's experts may be written at: the model's widest; a mixed layer widened: its widest; else
    the widths it may hold (one of them, for a layer whose experts share one width)."""
    if widen_to_model_max:
        return (model_max,)
    if layer.mixed and widened:
        return (max(layer.widths),)
    return layer.widths


def _bits(widths: list[int]) -> str:
    return ", ".join(f"{bits}-bit" for bits in widths)


def _scheme_problems(what: str, stored_bits: tuple[int, ...], symmetric: bool, group_size: int,
                     inputs: dict[str, tuple[int, bool]], tp: int) -> list[Problem]:
    problems = []
    low = [bits for bits in stored_bits if bits in (2, 3)]
    if not symmetric and low:
        problems.append(Problem(
            "asymmetric_low_bit", f"{what} are asymmetric {low[0]}-bit, but vLLM's zero-point MoE kernels cover 4 "
            "and 8 bits", "quantize with `symmetric: true`"))
    if group_size > 0:
        for name, (width, split_by_tp) in inputs.items():
            split = width // tp if split_by_tp else width
            if (split_by_tp and width % tp) or split % group_size:
                problems.append(Problem(
                    "group_size", f"{what}: group_size {group_size} does not divide {name} width {split}"
                    + (f" (tensor-parallel size {tp})" if split_by_tp and tp > 1 else "")
                    + (", so a rank's slice would cut a group" if split_by_tp and tp > 1 else ", so a group would be cut"),
                    _group_size_fix(width, split, group_size, split_by_tp, tp)))
                break
    return problems


def _group_size_fix(width: int, split: int, group_size: int, split_by_tp: bool, tp: int) -> str:
    """The fix of a group size that does not divide an input width: a dividing group size, and another ``--tp``
    only when some tensor-parallel size would give every rank whole groups of ``group_size``."""
    dividing = next((size for size in _HINT_GROUP_SIZES if split % size == 0), None)
    fix = (f"quantize with a `group_size` dividing {split} (e.g. {dividing})" if dividing else
           f"quantize with `group_size: -1` (one scale per row): no group size of 16 to 128 divides {split}")
    other_tp = [size for size in range(1, width + 1) if size != tp and width % size == 0
                and (width // size) % group_size == 0] if split_by_tp else []
    if other_tp:
        fix += f", or export for --tp {other_tp[0]}" if len(other_tp) == 1 else \
            f", or export for another --tp ({', '.join(map(str, other_tp[:3]))})"
    return fix


def _row_parallel(path: str) -> bool:
    """vLLM splits the input of row-parallel linears (o_proj, down_proj, ...) across ranks; the others keep it."""
    return path.rsplit(".", 1)[-1] in ("o_proj", "down_proj", "w2", "dense", "out_proj")


def deployability_problems(checkpoint: NativeCheckpoint, *, tp: int = 1, widen_to_layer_max: bool = False,
                           widen_to_model_max: bool = False, consumers: tuple[str, ...] = CONSUMERS) -> list[Problem]:
    """:func:`plan_problems` of a native folder."""
    return plan_problems(plan_of_checkpoint(checkpoint), tp=tp, widen_to_layer_max=widen_to_layer_max,
                         widen_to_model_max=widen_to_model_max, consumers=consumers)


def raise_problems(source: str, problems: list[Problem]) -> None:
    """Raise :class:`NotDeployableError` naming the first problem (and how many more) if there is any."""
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise NotDeployableError(f"cannot export {source} as compressed-tensors: {problems[0].message()}{more}")


def check_deployable(checkpoint: NativeCheckpoint, *, tp: int = 1, widen_to_layer_max: bool = False,
                     widen_to_model_max: bool = False, consumers: tuple[str, ...] = CONSUMERS) -> None:
    """Raise :class:`NotDeployableError` for the first problem of a native folder, if any."""
    raise_problems(str(checkpoint.folder), deployability_problems(
        checkpoint, tp=tp, widen_to_layer_max=widen_to_layer_max, widen_to_model_max=widen_to_model_max,
        consumers=consumers))
