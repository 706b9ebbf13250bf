"""What vLLM (0.33) can serve from a compressed-tensors export, checked on the native folder before anything is written.

Each rule below is a fact of vLLM's compressed-tensors MoE loader (``ecosystem.md`` 2.2) and comes with the recipe
option that avoids it. A refused export is one line: the first problem, its reason, and the fix.

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
"""

from __future__ import annotations

from dataclasses import dataclass

from moecompress.checkpoint.native_reader import NativeCheckpoint
from moecompress.errors import MoECompressError

VLLM_MOE_BITS = range(2, 9)  # WNA16_SUPPORTED_BITS of vLLM 0.33's compressed-tensors MoE method


class NotDeployableError(MoECompressError):
    """The checkpoint holds something the requested export format (as vLLM reads it) cannot."""


@dataclass(frozen=True)
class Problem:
    """One reason an export is refused: ``case`` (a stable id, for tests and the report), ``reason``, ``fix``."""

    case: str
    reason: str
    fix: str

    def message(self) -> str:
        return f"{self.reason}; {self.fix}"


def variable_width_problem(checkpoint: NativeCheckpoint) -> Problem | None:
    """CAMERA-P ``physical`` experts (``config.moecompress["variable_width"]``): each expert its own width."""
    widths = checkpoint.record.get("variable_width")
    if not widths:
        return None
    return Problem("variable_width",
                   "the experts have different widths (CAMERA-P physical pruning), which no fused MoE kernel stores",
                   "re-run camera_p with `pad_to: 64` (one width for all experts)")


def expert_count_problem(checkpoint: NativeCheckpoint) -> Problem | None:
    counts = {int(layer): int(count) for layer, count in (checkpoint.record.get("num_experts_per_layer") or {}).items()}
    if len(set(counts.values())) <= 1:
        return None
    summary = ", ".join(f"layer {layer}: {count}" for layer, count in sorted(counts.items())[:4])
    return Problem("expert_counts",
                   f"MoE layers keep different expert counts ({summary}, ...), but vLLM and plain transformers build "
                   "every layer with one num_experts",
                   "prune with `layer_budget: uniform`")


def deployability_problems(checkpoint: NativeCheckpoint, *, tp: int = 1, widen_to_layer_max: bool = False) -> list[Problem]:
    """Everything in ``checkpoint`` that a compressed-tensors export could not serve in vLLM at tensor-parallel
    size ``tp`` (after ``--widen-to-layer-max`` when asked). Empty: deployable."""
    problems = [problem for problem in (variable_width_problem(checkpoint), expert_count_problem(checkpoint)) if problem]
    hidden = int(checkpoint.text_config["hidden_size"])
    for layer in checkpoint.expert_layers:
        widths = sorted(set(layer.expert_bits))
        bits = max(widths)
        if len(widths) > 1 and not widen_to_layer_max:
            problems.append(Problem(
                "mixed_widths", f"layer {layer.layer} has experts at {widths} bits, but vLLM runs one quantization scheme "
                "per MoE layer", "quantize with `granularity: layer`, or export with --widen-to-layer-max"))
            continue
        if bits not in VLLM_MOE_BITS:
            problems.append(Problem(
                "bits", f"layer {layer.layer}'s experts are {bits}-bit, but vLLM's MoE kernels take 2 to 8 bits",
                "use bit choices of at least 2 for the experts"))
        problems += _scheme_problems(f"layer {layer.layer}'s experts", bits, layer.symmetric, layer.group_size,
                                     _expert_sharded_inputs(checkpoint, layer, hidden), tp)
    for spec in checkpoint.packed_linears:
        problems += _scheme_problems(spec.path, spec.bits, spec.symmetric, spec.group_size,
                                     {f"{spec.path} input": (checkpoint.linear_in_features(spec.path), _row_parallel(spec.path))}, tp)
    return problems


def _expert_sharded_inputs(checkpoint: NativeCheckpoint, layer, hidden: int) -> dict[str, tuple[int, bool]]:
    """Input widths of one expert's matrices and whether tensor parallelism splits them: down_proj's input (the
    intermediate size) is split (row-parallel); gate/up's input (hidden) is not, but still needs whole groups."""
    intermediate = int(checkpoint.tensor(f"{layer.prefix}.gate_up_proj_packed_w{layer.expert_bits[0]}").shape[-2]) // 2
    return {"gate_proj/up_proj input (hidden)": (hidden, False), "down_proj input (intermediate)": (intermediate, True)}


def _scheme_problems(what: str, bits: int, symmetric: bool, group_size: int, inputs: dict[str, int],
                     tp: int) -> list[Problem]:
    problems = []
    if not symmetric and bits in (2, 3):
        problems.append(Problem(
            "asymmetric_low_bit", f"{what} are asymmetric {bits}-bit, but vLLM's zero-point MoE kernels cover 4 and 8 bits",
            "quantize with `symmetric: true`"))
    if group_size > 0:
        for name, (width, split_by_tp) in inputs.items():
            split = width // tp if split_by_tp else width
            if (split_by_tp and width % tp) or split % group_size:
                problems.append(Problem(
                    "group_size", f"{what}: group_size {group_size} does not divide {name} width {split} "
                    f"(tensor-parallel size {tp}), so a rank's slice would cut a group",
                    f"quantize with a `group_size` dividing {split} (e.g. {_largest_dividing_group(split)}), or "
                    "export for another --tp"))
                break
    return problems


def _row_parallel(path: str) -> bool:
    """vLLM splits the input of row-parallel linears (o_proj, down_proj, ...) across ranks; the others keep it."""
    return path.rsplit(".", 1)[-1] in ("o_proj", "down_proj", "w2", "dense", "out_proj")


def _largest_dividing_group(width: int) -> int:
    """The largest power-of-two group size up to 128 (and at least 16, the kernels' floor) that divides ``width``."""
    for size in (128, 64, 32, 16):
        if width % size == 0:
            return size
    return -1


def check_deployable(checkpoint: NativeCheckpoint, *, tp: int = 1, widen_to_layer_max: bool = False) -> None:
    """Raise :class:`NotDeployableError` naming the first problem (and how many more) if there is any."""
    problems = deployability_problems(checkpoint, tp=tp, widen_to_layer_max=widen_to_layer_max)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise NotDeployableError(f"cannot export {checkpoint.folder} for vLLM: {problems[0].message()}{more}")
