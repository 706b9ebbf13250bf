"""Super experts (Su et al., methods.md section 6.1): the few experts whose down-proj outputs carry extreme outliers.

Score of an expert: its ``max |down_proj output|`` over the calibration pass (statistic ``max_abs_expert_output``),
routed and shared experts alike. Only the first ``include_fraction`` (0.75) of the decoder layers count. An expert
is super when its score exceeds both the 99.5th percentile of all counted scores and a tenth of their maximum.
(The reference code divides with ``// 10``; we use the exact ``/ 10``, which only differs when the maximum is
below 10, where ``// 10`` would make the second condition vacuous.)

Computed once, on the original model, in the profiling pass; every stage keeps them and remaps their ids through
its edits (:func:`remap_super_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from moecompress.calibration.statistics import LayerStatistics
from moecompress.errors import CalibrationError

STATISTIC = "max_abs_expert_output"


@dataclass
class SuperExperts:
    """routed: ``[(layer, expert)]``; shared: ``[(layer, shared index)]``; the thresholds that decided them."""

    routed: list[tuple[int, int]] = field(default_factory=list)
    shared: list[tuple[int, int]] = field(default_factory=list)
    percentile_threshold: float = 0.0
    max_score: float = 0.0
    included_layers: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "routed": [list(pair) for pair in self.routed],
            "shared": [list(pair) for pair in self.shared],
            "percentile_threshold": self.percentile_threshold,
            "max_score": self.max_score,
            "included_layers": self.included_layers,
        }


def find_super_experts(layer_statistics: Mapping[int, LayerStatistics], num_hidden_layers: int, *,
                       include_fraction: float = 0.75, percentile: float = 99.5,
                       max_ratio: float = 10.0) -> SuperExperts:
    """Apply the P99.5-and-max/10 rule to ``max_abs_expert_output`` of the first ``include_fraction`` layers."""
    cutoff = int(num_hidden_layers * include_fraction)
    candidates: list[tuple[str, int, int, float]] = []
    for layer, statistics in sorted(layer_statistics.items()):
        if layer >= cutoff:
            continue
        if STATISTIC not in statistics:
            raise CalibrationError(f"super experts need the `{STATISTIC}` statistic; collect it in the profiling pass")
        scores = statistics[STATISTIC]
        candidates += [("routed", layer, e, float(v)) for e, v in enumerate(scores["routed"].tolist())]
        candidates += [("shared", layer, s, float(v)) for s, v in enumerate(scores["shared"].tolist())]
    result = SuperExperts(included_layers=sorted({c[1] for c in candidates}))
    if not candidates:
        return result
    values = torch.tensor([c[3] for c in candidates], dtype=torch.float64)
    result.percentile_threshold = float(torch.quantile(values, percentile / 100.0))
    result.max_score = float(values.max())
    for kind, layer, index, value in candidates:
        if value > result.percentile_threshold and value > result.max_score / max_ratio:
            (result.routed if kind == "routed" else result.shared).append((layer, index))
    return result


def remap_super_experts(super_experts: list[tuple[int, int]], id_map: Mapping[tuple[int, int], int]) -> list[tuple[int, int]]:
    """New ``(layer, expert)`` ids after an edit; ``id_map`` is ``(layer, old) -> new`` for the edited layers
    (``moecompress.models.edits.remap_expert_ids``). Layers absent from the map are unchanged. A super expert
    missing from an edited layer's map was removed, which is a bug in the stage that did it."""
    edited_layers = {layer for layer, _ in id_map}
    remapped = []
    for layer, expert in super_experts:
        if layer not in edited_layers:
            remapped.append((layer, expert))
        elif (layer, expert) in id_map:
            remapped.append((layer, id_map[(layer, expert)]))
        else:
            raise CalibrationError(f"super expert {expert} of layer {layer} was removed by an edit; "
                                   "every stage must keep super experts")
    return sorted(set(remapped))
