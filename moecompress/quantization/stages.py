"""The quantisation stages: ``rtn`` (round to nearest, no data) and ``gptq`` (GPTQ, or MoEQuant's AGQ with
``agq: true``), both layer by layer through :mod:`moecompress.quantization.sequential`.

```yaml
- method: gptq
  bits: 4                # 1, 2, 3, 4 or 8; an earlier stage's bit map (context.bit_map) overrides it per expert
  group_size: 128        # -1: one scale per output row; a last, shorter group is allowed
  symmetric: true
  scale_search: mse      # each group's clipping searched (GPTQ's mse=True); minmax: compressed-tensors' rule
  damp: 0.01             # fraction of the mean Hessian diagonal
  act_order: false
  agq: true              # weight each routed token's Hessian contribution by its combine weight (MoEQuant)
  targets: [routed_experts]   # + shared_experts, attention, dense_mlp; routers, norms, embeddings never
```
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Literal

import pydantic
from torch import nn

from moecompress.distributed import current_world
from moecompress.errors import MoECompressError, RecipeError
from moecompress.kernels.layout import SUPPORTED_BITS
from moecompress.models.families import find_moe_blocks
from moecompress.quantization.sequential import (
    TARGETS,
    QuantizationResult,
    QuantizationSettings,
    check_quantizable,
    quantize_model,
)
from moecompress.stages import RunContext, Stage, StageOptions, StageResult, register_stage

# The Triton kernels read one scale per 16-column tile, so a group must be whole tiles.
GROUP_SIZE_MULTIPLE = 16


def widest_input(model: nn.Module) -> int:
    """The widest input (columns) of any matrix a quantisation stage can meet in ``model``: every linear's
    ``in_features`` and every MoE layer's expert widths (hidden size for gate/up, intermediate size for down)."""
    widths = [module.in_features for module in model.modules() if isinstance(module, nn.Linear)]
    for view in find_moe_blocks(model):
        widths += [int(view.hidden_size), int(view.intermediate_size)]
    return max(widths, default=0)


def check_group_size(model: nn.Module, group_size: int | None, where: str, *, per_row: bool = True) -> None:
    """A group wider than every matrix's input is padding: memory grows with ``group_size`` (a value of 2**30 asks
    for hundreds of GB). Refuse it, naming the widest input (:class:`RecipeError`)."""
    widest = widest_input(model)
    if group_size is None or group_size <= 0 or not widest or group_size <= widest:
        return
    instead = "-1 (one scale per output row) or " if per_row else ""
    raise RecipeError(f"{where}: group_size={group_size} is wider than any matrix this model has (the widest input is "
                      f"{widest} columns); a group would be mostly padding. Use {instead}a multiple of 16 up to "
                      f"{widest}")


class QuantizeOptions(StageOptions):
    bits: int = pydantic.Field(4, description="bits per weight of every quantised matrix (1, 2, 3, 4 or 8; 1 = sign times the group mean |w|)")
    group_size: int = pydantic.Field(128, description="input columns per scale; -1 = one scale per output row")
    symmetric: bool = pydantic.Field(True, description="symmetric scales (no zero points)")
    scale_search: Literal["minmax", "mse"] = pydantic.Field(
        "mse", description="mse: each group's clipping that minimises its rounding error (GPTQ's mse=True; helps "
                           "most at 2 and 3 bits); minmax: scales from the group's min and max")
    targets: list[str] = pydantic.Field(["routed_experts"], description=f"what to quantise: {list(TARGETS)}")

    @pydantic.field_validator("bits")
    @classmethod
    def _packable_bits(cls, bits: int) -> int:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits} cannot be packed; use one of {list(SUPPORTED_BITS)}")
        return bits

    @pydantic.field_validator("group_size")
    @classmethod
    def _kernel_group_size(cls, group_size: int) -> int:
        if group_size != -1 and (group_size <= 0 or group_size % GROUP_SIZE_MULTIPLE):
            raise ValueError(f"group_size must be -1 (per output row) or a positive multiple of {GROUP_SIZE_MULTIPLE} "
                             "(the kernels read one scale per 16-column tile), e.g. 32, 64 or 128")
        return group_size

    @pydantic.field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        unknown = [target for target in targets if target not in TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; choose from {list(TARGETS)} (routers, norms, embeddings "
                             "and lm_head are never quantised)")
        # routed experts are what this toolkit quantises; the other targets are added to them
        return ["routed_experts", *[target for target in dict.fromkeys(targets) if target != "routed_experts"]]


class QuantizeStage(Stage):
    """Shared by ``rtn`` and ``gptq``: settings from the options, checks, the report entry."""

    quantization_method = "rtn"

    def settings(self, context: RunContext) -> QuantizationSettings:
        options = self.options
        extra = {name: getattr(options, name) for name in ("damp", "act_order", "agq", "cold_token_floor",
                                                           "cold_damping") if hasattr(options, name)}
        if getattr(options, "hessian_memory_gib", None) is not None:
            extra["hessian_memory_bytes"] = int(options.hessian_memory_gib * (1 << 30))
        return QuantizationSettings(method=self.quantization_method, bits=options.bits, group_size=options.group_size,
                                    symmetric=options.symmetric, scale_search=options.scale_search,
                                    targets=tuple(options.targets),
                                    bit_map=context.bit_map, progress_dir=self._progress_dir(context),
                                    fingerprint=self._fingerprint(context), **extra)

    def _progress_dir(self, context: RunContext) -> Path | None:
        """Finished layers of a GPTQ run go here (inside the run's partial folder), so a stopped run resumes."""
        if self.quantization_method == "rtn" or context.output_dir is None:
            return None
        return Path(context.output_dir) / f".{self.method}-layers"

    def _fingerprint(self, context: RunContext) -> str:
        calibration = getattr(context.calibration, "sha256", None)
        bit_map = sorted((list(key), bits) for key, bits in (context.bit_map or {}).items())
        text = json.dumps([self.describe(), calibration, bit_map], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def check(self, context: RunContext) -> None:
        check_group_size(context.model, self.options.group_size, self.method)
        try:
            check_quantizable(context.model, self.settings(context))
        except MoECompressError as error:
            raise RecipeError(f"{self.method}: {error}") from None

    def run(self, context: RunContext) -> StageResult:
        self.check(context)
        result = quantize_model(context.model, self.settings(context), context.calibration, device=context.device,
                                batch_size=context.batch_size, on_layer=context.on_layer)
        context.mark_statistics_stale()
        progress_dir = self._progress_dir(context)
        if progress_dir is not None and current_world().is_main:
            shutil.rmtree(progress_dir, ignore_errors=True)  # the stage is done: its record replaces the layer files
        return self.stage_result(result)

    def stage_result(self, result: QuantizationResult) -> StageResult:
        """The report entry of a finished quantisation (in memory or streamed)."""
        cold = [{"layer": r.layer, "expert": r.expert, "tokens": r.tokens} for r in result.experts if r.cold]
        errors = [r.gate_up_error for r in result.experts if r.gate_up_error is not None and r.gate_up_error == r.gate_up_error]
        metrics = {
            "seconds_per_layer": {str(layer): s for layer, s in result.seconds_per_layer.items()},
            "cold_experts": cold,
            "experts": [vars(record) for record in result.experts],
            "linears": result.linears,
        }
        if errors:
            metrics["mean_gate_up_relative_error"] = sum(errors) / len(errors)
        return StageResult(decisions={"bit_widths": result.bit_widths()}, metrics=metrics, changed_structure=True)


@register_stage
class RTNStage(QuantizeStage):
    """``method: rtn``: round every targeted weight to the nearest level of its group (no calibration data)."""

    method = "rtn"
    quantization_method = "rtn"
    Options = QuantizeOptions


class GPTQOptions(QuantizeOptions):
    damp: float = pydantic.Field(0.01, ge=0, lt=1, description="damping, a fraction of the mean Hessian diagonal")
    act_order: bool = pydantic.Field(False, description="quantise columns by decreasing Hessian diagonal")
    agq: bool = pydantic.Field(False, description="MoEQuant AGQ: weight routed tokens by their combine weight")
    cold_token_floor: int | None = pydantic.Field(None, ge=1, description="experts with fewer routed tokens get "
                                                  "more damping (default: the projection's input width)")
    cold_damping: bool = pydantic.Field(True, description="extra damping for experts below cold_token_floor "
                                        "(damp + 1 - tokens/floor); false: GPTQ's plain damp for every expert")
    hessian_memory_gib: float = pydantic.Field(1.0, gt=0, description="memory for one chunk of per-expert Hessians")


@register_stage
class GPTQStage(QuantizeStage):
    """``method: gptq``: GPTQ layer by layer on calibration data (``agq: true`` for MoEQuant's affinity weighting)."""

    method = "gptq"
    quantization_method = "gptq"
    Options = GPTQOptions

