"""PNG plots for the run report (matplotlib, Agg backend: no display needed).

Each function takes plain report data (lists and dicts as in ``report.json``), writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402


def _layer_sorted(mapping: dict[Any, Any]) -> list[tuple[int, Any]]:
    """``{layer: value}`` with JSON string keys turned back into ints, sorted by layer."""
    return sorted((int(layer), value) for layer, value in mapping.items())


def expert_usage_heatmaps(usage_by_domain: dict[str, list[list[float]]], out_file: Path) -> Path:
    """One heatmap per domain: rows are MoE layers, columns experts, colour the share of the layer's routed tokens.

    usage_by_domain: ``{domain: [[token count per expert] per MoE layer]}``. Shares (not counts) make domains with
        different token totals comparable.
    """
    domains = sorted(usage_by_domain)
    columns = min(4, len(domains))
    rows = -(-len(domains) // columns)
    # constrained layout keeps each panel's title clear of the x labels of the row above and of the suptitle
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows + 0.6), squeeze=False,
                                layout="constrained")
    shares_by_domain = {}
    for domain in domains:
        counts = np.asarray(usage_by_domain[domain], dtype=float)  # [layers, experts]
        totals = counts.sum(axis=1, keepdims=True)
        shares_by_domain[domain] = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    color_max = max((shares.max() for shares in shares_by_domain.values() if shares.size), default=1.0) or 1.0
    image = None
    for index, axis in enumerate(axes.flat):
        if index >= len(domains):
            axis.axis("off")
            continue
        domain = domains[index]
        image = axis.imshow(shares_by_domain[domain], aspect="auto", cmap="viridis", vmin=0, vmax=color_max,
                            interpolation="nearest")
        axis.set_title(domain, fontsize=10)
        axis.set_xlabel("expert", fontsize=8)
        axis.set_ylabel("MoE layer", fontsize=8)
        axis.tick_params(labelsize=7)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="share of routed tokens")
    figure.suptitle("Expert usage per layer and calibration domain")
    return _save(figure, out_file)


def kept_experts_map(
    kept_experts: dict[Any, list[int]], out_file: Path, *, num_experts: int | None = None, title: str = "Kept experts"
) -> Path:
    """Layers x experts: kept experts dark, removed ones light. ``kept_experts``: ``{layer: [kept expert ids]}``."""
    layers = _layer_sorted(kept_experts)
    width = num_experts or (max((max(ids) for _, ids in layers if ids), default=0) + 1)
    kept = np.zeros((len(layers), width))
    for row, (_, expert_ids) in enumerate(layers):
        kept[row, list(expert_ids)] = 1.0
    figure, axis = plt.subplots(figsize=(max(4.0, 0.18 * width + 1.5), max(2.0, 0.3 * len(layers) + 1.0)))
    axis.imshow(kept, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks(range(len(layers)), [str(layer) for layer, _ in layers])
    axis.set_xlabel("expert")
    axis.set_ylabel("MoE layer")
    axis.set_title(f"{title}: {int(kept.sum())} of {kept.size} (dark = kept)")
    return _save(figure, out_file)


def bit_width_map(bit_widths: dict[Any, list[float]], out_file: Path, *, title: str = "Bits per expert") -> Path:
    """Layers x experts, one colour per bit width present (0 = dropped, grey), the number written in each cell when
    it fits; the legend is discrete, as the widths are."""
    layers = _layer_sorted(bit_widths)
    width = max((len(bits) for _, bits in layers), default=0)
    bits = np.full((len(layers), width), np.nan)
    for row, (_, layer_bits) in enumerate(layers):
        bits[row, : len(layer_bits)] = layer_bits
    widths = sorted({float(value) for value in bits[np.isfinite(bits)]})
    palette = plt.get_cmap("viridis", max(len(widths), 2))
    colours = [(0.8, 0.8, 0.8, 1.0) if value == 0 else palette(index / max(len(widths) - 1, 1))
               for index, value in enumerate(widths)]
    boundaries = [widths[0] - 0.5] + [(a + b) / 2 for a, b in zip(widths, widths[1:])] + [widths[-1] + 0.5] \
        if widths else [0, 1]
    colour_map = ListedColormap(colours or [(0.8, 0.8, 0.8, 1.0)])
    figure, axis = plt.subplots(figsize=(max(4.0, 0.3 * width + 2.0), max(2.0, 0.35 * len(layers) + 1.0)))
    image = axis.imshow(bits, aspect="auto", cmap=colour_map, norm=BoundaryNorm(boundaries, colour_map.N),
                        interpolation="nearest")
    if width <= 64:
        for row in range(bits.shape[0]):
            for column in range(bits.shape[1]):
                value = bits[row, column]
                if not np.isnan(value):
                    red, green, blue, _ = colours[widths.index(float(value))]
                    bright = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5  # dark text on light cells
                    axis.text(column, row, f"{value:g}", ha="center", va="center", fontsize=6,
                              color="black" if bright else "white")
    axis.set_yticks(range(len(layers)), [str(layer) for layer, _ in layers])
    axis.set_xlabel("expert")
    axis.set_ylabel("MoE layer")
    mean_bits = float(np.nanmean(bits)) if np.isfinite(bits).any() else float("nan")
    axis.set_title(f"{title} (mean {mean_bits:.2f})")
    colour_bar = figure.colorbar(image, ax=axis, ticks=widths, label="bits")
    colour_bar.ax.set_yticklabels(["dropped" if value == 0 else f"{value:g}" for value in widths])
    return _save(figure, out_file)


def _save(figure: Any, out_file: Path) -> Path:
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_file, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return out_file
