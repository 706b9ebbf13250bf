"""The per-expert checkpoint names of a family (``gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral's ``w1`` / ``w3`` /
``w2``), read from transformers' conversion mapping: what the exporters write and the compressed-tensors reader
renames to."""

from __future__ import annotations

import re

from transformers.conversion_mapping import get_checkpoint_conversion_mapping


def expert_projection_names(model_type: str) -> tuple[str, str, str]:
    """Checkpoint names of an expert's gate, up and down projections (``w1, w3, w2`` for Mixtral), read from
    transformers' conversion mapping (the per-expert layout it fuses on load); ``gate_proj, up_proj, down_proj``
    for families without one."""
    gate, up, down = "gate_proj", "up_proj", "down_proj"
    for converter in get_checkpoint_conversion_mapping(model_type) or []:
        sources = getattr(converter, "_original_source_patterns", None) or []
        targets = getattr(converter, "_original_target_patterns", None) or []
        names = [re.search(r"experts\.\*\.(\w+)\.weight$", source) for source in sources]
        if not targets or not all(names):
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(names) == 2:
            gate, up = names[0].group(1), names[1].group(1)
        elif targets[0].endswith("experts.down_proj") and len(names) == 1:
            down = names[0].group(1)
    return gate, up, down
