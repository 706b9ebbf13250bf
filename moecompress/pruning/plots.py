"""Report plot of a pruning or merging stage: each layer's expert scores, with the kept / merged map beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def expert_scores_plot(scores: dict[Any, list[float]], kept_experts: dict[Any, list[int]] | None, out_file: Path, *,
                       clusters: dict[Any, list[list[int]]] | None = None, title: str = "expert scores") -> Path:
    """Left: layers x experts coloured by score (per-layer min-max, so layers compare by rank). Right: the decision,
    kept (dark) / removed (light) for pruning, or the cluster id of every expert for merging.

    scores: ``{layer: [score per expert]}``; kept_experts: ``{layer: [kept ids]}``; clusters: ``{layer: [[ids]]}``.
    """
    layers = sorted(int(layer) for layer in scores)
    by_layer = {int(layer): values for layer, values in scores.items()}
    width = max(len(values) for values in by_layer.values())
    score_image = np.full((len(layers), width), np.nan)
    decision = np.full((len(layers), width), np.nan)
    for row, layer in enumerate(layers):
        values = np.asarray(by_layer[layer], dtype=float)
        finite = values[np.isfinite(values)]
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        score_image[row, : len(values)] = (values - low) / (high - low) if high > low else 0.5
        if clusters is not None:
            for cluster_id, members in enumerate(clusters.get(layer, clusters.get(str(layer), []))):
                decision[row, list(members)] = cluster_id
        elif kept_experts is not None:
            decision[row, : len(values)] = 0.0
            decision[row, list(kept_experts.get(layer, kept_experts.get(str(layer), [])))] = 1.0
    figure, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.36 * width + 3.0), max(2.2, 0.32 * len(layers) + 1.2)))
    image = axes[0].imshow(score_image, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    axes[0].set_title(f"{title} (per-layer min-max)", fontsize=9)
    figure.colorbar(image, ax=axes[0], shrink=0.8)
    if clusters is not None:
        axes[1].imshow(decision, aspect="auto", cmap="tab20", interpolation="nearest")
        axes[1].set_title("merged: cluster of each expert", fontsize=9)
    else:
        axes[1].imshow(decision, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        axes[1].set_title(f"kept (dark): {int(np.nansum(decision))} of {int(np.isfinite(decision).sum())}", fontsize=9)
    for axis in axes:
        axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axis.set_xlabel("expert")
        axis.set_ylabel("MoE layer")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_file, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return out_file
