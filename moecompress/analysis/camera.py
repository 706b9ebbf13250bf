"""CAMERA micro-expert energies (Xu et al., AAAI 2026; methods.md section 3).

A micro-expert is one intermediate channel ``c`` of one expert ``e``: the gate row, up row and down column that
belong to ``c``. The MoE output is a sum of down columns weighted by ``phi_{t,(e,c)} = g_e(x_t) h_{e,c}(x_t)``
(``g`` the model's combine weight, 0 when ``e`` is not routed; ``h = act(gate x) * up x``). Energy of micro-expert i:

    E_i = ||w_i^down||^2 * [ (1 - alpha) * sum_t phi_{t,i}^2 + alpha * max_t phi_{t,i}^2 ]

The two sums come from the calibration statistics ``camera_energy_l2`` / ``camera_energy_max`` (routed tokens only,
combine weight of each family's ``RoutingSpec``; shared experts use their sigmoid gate or 1). The L2 term is a sum,
not a mean, so frequently routed experts score higher (frequency folded in, as in the reference code).

Conventions: ``E`` routed experts, ``I`` expert intermediate size, ``S`` shared-expert modules of the layer,
``I_s`` the width of shared module ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from moecompress.calibration.statistics import LayerStatistics
from moecompress.errors import CalibrationError
from moecompress.models.view import MoEBlockView

STATISTICS = ("camera_energy_l2", "camera_energy_max")
DEFAULT_ALPHA = 0.9  # the reference run.sh value (methods.md 3(d))
SUMMARY_SHARES = (0.2, 0.4, 0.6)


@dataclass
class LayerEnergies:
    """Energies of one MoE layer: routed ``[E, I]`` fp32, shared ``[[I_s]]`` (one per shared module)."""

    layer_index: int
    routed: torch.Tensor
    shared: list[torch.Tensor] = field(default_factory=list)

    def flat(self) -> torch.Tensor:
        """``[E*I + sum I_s]``: every micro-expert of the layer, routed first (row-major), then shared."""
        return torch.cat([self.routed.reshape(-1), *[energy.reshape(-1) for energy in self.shared]])


@torch.no_grad()
def down_column_norms_squared(view: MoEBlockView) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(routed [E, I], shared [[I_s]])``: squared L2 norm of every down column (fp32 CPU)."""
    routed = torch.stack([view.expert_weights(expert).down.float().square().sum(0).cpu()
                          for expert in range(view.num_experts)])
    shared = [shared_expert.module.down_proj.weight.float().square().sum(0).cpu() for shared_expert in view.shared_experts]
    return routed, shared


def layer_energies(view: MoEBlockView, layer_statistics: LayerStatistics, alpha: float = DEFAULT_ALPHA) -> LayerEnergies:
    """CAMERA energies of one layer from its ``camera_energy_l2`` / ``camera_energy_max`` statistics."""
    if not 0.0 <= alpha <= 1.0:
        raise CalibrationError(f"CAMERA alpha must lie in [0, 1] (it mixes the L2 and max terms); got {alpha}")
    l2, peak = layer_statistics["camera_energy_l2"], layer_statistics["camera_energy_max"]
    routed_norms, shared_norms = down_column_norms_squared(view)
    routed = routed_norms * ((1 - alpha) * l2["routed"].float() + alpha * peak["routed"].float())
    shared = [norms * ((1 - alpha) * l2_s.float() + alpha * max_s.float())
              for norms, l2_s, max_s in zip(shared_norms, l2["shared"], peak["shared"])]
    return LayerEnergies(view.layer_index, routed, shared)


@torch.no_grad()
def weight_norm_scores(view: MoEBlockView) -> LayerEnergies:
    """Data-free baseline: ``||w_gate_c|| * ||w_up_c|| * ||w_down_c||`` per micro-expert (same layout as energies)."""
    routed = []
    for expert in range(view.num_experts):
        weights = view.expert_weights(expert)
        routed.append((weights.gate.float().norm(dim=1) * weights.up.float().norm(dim=1)
                       * weights.down.float().norm(dim=0)).cpu())
    shared = [(module.gate_proj.weight.float().norm(dim=1) * module.up_proj.weight.float().norm(dim=1)
               * module.down_proj.weight.float().norm(dim=0)).cpu()
              for module in (shared_expert.module for shared_expert in view.shared_experts)]
    return LayerEnergies(view.layer_index, torch.stack(routed), shared)


def random_scores(view: MoEBlockView, seed: int = 0) -> LayerEnergies:
    """Baseline: uniform random scores (seeded per layer), same layout as energies."""
    generator = torch.Generator().manual_seed(seed * 100_003 + view.layer_index)
    routed = torch.rand(view.num_experts, view.intermediate_size, generator=generator)
    shared = [torch.rand(int(s.module.down_proj.in_features), generator=generator) for s in view.shared_experts]
    return LayerEnergies(view.layer_index, routed, shared)


def lowest_share_of_energy(energies: torch.Tensor, channel_share: float) -> float:
    """Share of the total energy held by the lowest ``channel_share`` of the micro-experts (energies ``[N]``)."""
    ordered = torch.sort(energies.double().flatten()).values
    count = int(channel_share * ordered.numel())
    total = float(ordered.sum())
    return float(ordered[:count].sum()) / total if total > 0 else 0.0


def summarize(energies: LayerEnergies, shares=SUMMARY_SHARES) -> dict:
    """One layer's row for ``inspect --micro``: distribution quantiles and energy share of the lowest channels."""
    flat = energies.flat().double()
    quantiles = torch.quantile(flat, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    per_expert = energies.routed.double().sum(1)
    return {
        "layer": energies.layer_index,
        "micro_experts": int(flat.numel()),
        "total_energy": float(flat.sum()),
        "quantiles": {name: float(value) for name, value in zip(("min", "q25", "median", "q75", "max"), quantiles)},
        "lowest_share": {f"{int(round(100 * share))}%": lowest_share_of_energy(flat, share) for share in shares},
        "zero_energy": int((flat == 0).sum()),
        "expert_energy_share": (per_expert / max(float(flat.sum()), 1e-300)).tolist(),
        "shared_energy_share": [float(s.double().sum()) / max(float(flat.sum()), 1e-300) for s in energies.shared],
    }


def energy_plot(all_energies: list[LayerEnergies], path: Path, title: str = "CAMERA micro-expert energies") -> Path:
    """Per layer, the cumulative energy share against the share of micro-experts, lowest first (one curve a layer)."""
    import matplotlib  # heavy: imported only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4))
    for energies in all_energies:
        ordered = torch.sort(energies.flat().double()).values
        cumulative = torch.cumsum(ordered, 0) / max(float(ordered.sum()), 1e-300)
        fraction = torch.arange(1, ordered.numel() + 1, dtype=torch.float64) / ordered.numel()
        axis.plot(fraction.numpy(), cumulative.numpy(), label=f"layer {energies.layer_index}", linewidth=1)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("share of micro-experts (lowest energy first)")
    axis.set_ylabel("share of layer energy")
    axis.set_title(title)
    if len(all_energies) <= 12:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def energy_pass_cost(*, num_tokens: int, hidden_size: int, intermediate_size: int, top_k: int, num_moe_layers: int,
                     num_experts: int, shared_intermediate_size: int = 0, bytes_per_weight: int = 2) -> dict:
    """Cost model of the energy pass (one layer-wise forward over the calibration tokens, methods.md 3).

    Per token and MoE layer: ``top_k`` routed experts (gate/up/down: ``3 * 2 * d * I`` FLOPs each) plus the shared
    experts, plus the energy update (``phi = c h``, square, add and max: ~4 FLOPs per routed channel). Attention
    and the router are left out (the same for any layer-wise pass). Memory traffic: every expert weight read once
    per layer (layer-wise streaming), plus the ``[E, I]`` fp64 accumulators (two of them).
    """
    expert_flops = 6 * hidden_size * intermediate_size
    per_token = top_k * (expert_flops + 4 * intermediate_size) + (6 * hidden_size * shared_intermediate_size
                                                                 + 4 * shared_intermediate_size)
    weights = num_moe_layers * (num_experts * 3 * hidden_size * intermediate_size
                                + 3 * hidden_size * shared_intermediate_size) * bytes_per_weight
    accumulators = num_moe_layers * 2 * 8 * (num_experts * intermediate_size + shared_intermediate_size)
    return {"flops": float(num_tokens * num_moe_layers * per_token), "weight_bytes_read": int(weights),
            "accumulator_bytes": int(accumulators)}


__all__ = ["DEFAULT_ALPHA", "LayerEnergies", "STATISTICS", "down_column_norms_squared", "energy_pass_cost",
           "energy_plot", "layer_energies", "lowest_share_of_energy", "random_scores", "summarize",
           "weight_norm_scores"]
