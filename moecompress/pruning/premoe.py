"""PreMoe PEP (Pei et al. 2025, methods.md section 1): keep each layer's experts with the largest TCESS.

TCESS of expert ``e`` on the calibration (task) tokens: the mean over all tokens of the PreMoe marker
``m_{t,e} = phi(z_{t,e})`` if ``e`` is among the token's ``tcess_top_k`` largest raw router logits ``z`` (fp32, no
selection bias, no activation) and its softmax over those top-k logits is at least ``threshold``; else 0.

Defaults follow the spec's recommendation (section 1 g.1): ``tcess_top_k`` = the model's top-k, ``threshold`` 0
(keep all of the top-k), ``phi: peu`` (``max(s, sigmoid(s))``, always positive). ``preset: premoe_code`` gives the
released code's form (top-1, no threshold, identity). PreMoe may also lower top-k (``top_k``, the "k/K" settings).
Profile on the task's own text (``calibration.files``) to get a task-specific model.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch

from moecompress.analysis.expert_scores import tcess_scores
from moecompress.pruning.base import ProgressiveOptions, ProgressivePruningStage
from moecompress.stages import register_stage

PRESETS = {"premoe_code": {"tcess_top_k": 1, "threshold": -1.0, "phi": "identity"}}


class PremoeOptions(ProgressiveOptions):
    tcess_top_k: int | None = pydantic.Field(None, ge=1, description="marker top-k (default: the model's top-k)")
    threshold: float | None = pydantic.Field(None, description="confidence filter on the softmax over the top-k "
                                                               "logits; <= 0 keeps all of the top-k (default 0)")
    phi: Literal["identity", "peu"] | None = pydantic.Field(None, description="marker of a kept logit s: identity "
                                                                               "(v1 code) or peu max(s, sigmoid(s))")
    preset: Literal["premoe_code"] | None = pydantic.Field(None, description="premoe_code: top-1, no filter, identity")

    @pydantic.model_validator(mode="after")
    def _preset_or_explicit(self):
        if self.preset is not None:
            explicit = [name for name in ("tcess_top_k", "threshold", "phi") if getattr(self, name) is not None]
            if explicit:
                raise ValueError(f"preset {self.preset!r} fixes {explicit}; give either the preset or the values")
        return self

    def tcess(self) -> dict:
        """The ``tcess_markers`` statistic options (``top_k`` None: the model's top-k)."""
        if self.preset is not None:
            values = PRESETS[self.preset]
        else:
            values = {"tcess_top_k": self.tcess_top_k, "threshold": 0.0 if self.threshold is None else self.threshold,
                      "phi": self.phi or "peu"}
        return {"top_k": values["tcess_top_k"], "threshold": values["threshold"], "phi": values["phi"]}


@register_stage
class PrunePremoeStage(ProgressivePruningStage):
    """``method: prune_premoe``: PreMoe's probabilistic expert pruning (keep the largest TCESS per layer)."""

    method = "prune_premoe"
    Options = PremoeOptions
    statistics = ("tcess_markers",)
    score_name = "TCESS"

    def statistics_options(self) -> dict[str, dict]:
        return {"tcess_markers": self.options.tcess()}

    def layer_scores(self, view, layer_statistics) -> torch.Tensor:
        return tcess_scores(layer_statistics)

# The name before one naming scheme for stage classes (the recipe method in CamelCase + Stage,
# moecompress.stages.stage_class_name), kept as an alias.
PremoePruning = PrunePremoeStage
