"""Named calibration statistics, each with its own accumulator (methods.md section 7.2).

During a calibration pass every MoE layer gets one accumulator per requested statistic. The pass feeds them three
kinds of events, all computed once by the calibration experts backend (``moecompress.calibration.backend``):

* :class:`RouterBatch`: a batch of tokens reached the router (fp32 logits, top-k choices, combine weights);
* :class:`RoutedPairs`: every routed expert of the batch ran; all (token, expert) picks at once, sorted by expert,
  for statistics that reduce per expert (one ``index_add_`` / ``scatter_reduce_`` per batch, no per-expert Python);
* :class:`ExpertSlice`: one routed expert ran on its tokens (inputs, intermediate ``h``, unweighted output); only
  for statistics that need each expert's matrices (Hessians);
* :class:`SharedSlice`: a shared expert ran on all tokens.

Consumers ask only for what they need (``collect_statistics(..., names=[...])``); the expensive ones (Hessians,
all-token expert outputs) cost nothing unless asked. Results are fp32 CPU tensors in a :class:`LayerStatistics`.

In a run over several ranks (:mod:`moecompress.distributed`) each rank feeds its accumulators from its own
calibration batches; :meth:`Statistic.combine_ranks` then combines them across ranks before :meth:`Statistic.result`.
Sums are kept in int64 or float64 (float64 Hessians too), so the combined result is the one a single process
computes over the same batches (see ``moecompress.distributed``).

Conventions: ``E`` routed experts, ``d`` hidden size, ``I`` expert intermediate size, ``T`` tokens in a batch,
``k`` top-k. "combine weight" ``c`` is the weight the model multiplies the expert output by (renormalised or not,
times the routed scaling factor: whatever the family does). "raw" weight is the selection probability before
renormalisation (softmax or sigmoid score of the expert); "renorm" is the raw weight divided by the token's top-k sum.
Router statistics (logit mean, Gram, TCESS) are per router output; after a merge that kept the full router
(``expert_id_map``) those outnumber the stored experts, and raw/renorm weights fall back to the combine weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from moecompress.distributed import World
from moecompress.errors import CalibrationError
from moecompress.models.view import MoEBlockView

WEIGHT_RATIO_BINS = 1000


# ----- events --------------------------------------------------------------------------------------------------
@dataclass
class RouterBatch:
    """hidden_states ``[T, d]`` (router input), logits ``[T, E]`` fp32 (no selection bias, no activation),
    top_k_index ``[T, k]``, combine_weights ``[T, k]`` fp32, raw_weights ``[T, k]`` fp32 (pre-renormalisation
    scores of the chosen experts), domain_ids ``[T]`` long or None."""

    hidden_states: torch.Tensor
    logits: torch.Tensor
    top_k_index: torch.Tensor
    combine_weights: torch.Tensor
    raw_weights: torch.Tensor
    domain_ids: torch.Tensor | None = None
    output_norms: torch.Tensor | None = None  # [T, k] ||E_e(x)||_2 of each pick, filled before ``on_routed``


@dataclass
class ExpertSlice:
    """Expert ``expert`` on its routed tokens: token_index ``[n]``, inputs ``[n, d]``, intermediate ``[n, I]``
    (``act(gate x) * up x``), outputs ``[n, d]`` (down-proj output, combine weight NOT applied),
    combine_weights ``[n]``, raw_weights ``[n]``, renorm_weights ``[n]`` (all fp32)."""

    expert: int
    token_index: torch.Tensor
    inputs: torch.Tensor
    intermediate: torch.Tensor
    outputs: torch.Tensor
    combine_weights: torch.Tensor
    raw_weights: torch.Tensor
    renorm_weights: torch.Tensor


@dataclass
class RoutedPairs:
    """Every routed (token, expert) pick of a batch, ``P`` of them, sorted by expert (stable: tokens ascending within
    an expert, the order of ``torch.where(top_k_index == e)``). Expert-parallel sentinels are left out.

    expert_ids ``[P]`` long, token_index ``[P]`` long (row of the batch), slot ``[P]`` long (column of top_k_index),
    intermediate ``[P, I]`` (``act(gate x) * up x``, compute dtype), outputs ``[P, d]`` (down-proj output, combine
    weight NOT applied, compute dtype), combine_weights ``[P]``, raw_weights ``[P]``, renorm_weights ``[P]`` (fp32),
    expert_counts ``[E]`` long (picks per expert; expert ``e``'s rows are a contiguous run).
    """

    expert_ids: torch.Tensor
    token_index: torch.Tensor
    slot: torch.Tensor
    intermediate: torch.Tensor
    outputs: torch.Tensor
    combine_weights: torch.Tensor
    raw_weights: torch.Tensor
    renorm_weights: torch.Tensor
    expert_counts: torch.Tensor
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def camera_phi_squared(self) -> torch.Tensor:
        """``[P, I]`` fp32 ``(c * h)^2`` of every pick (CAMERA), computed once per batch for the L2 and max energies."""
        if "camera_phi_squared" not in self._cache:
            phi = self.combine_weights[:, None] * self.intermediate.float()
            self._cache["camera_phi_squared"] = phi.mul_(phi)  # in place: same values as phi.square()
        return self._cache["camera_phi_squared"]


@dataclass
class SharedSlice:
    """Shared expert ``index`` on all ``T`` tokens: inputs ``[T, d]``, intermediate ``[T, I_s]``, outputs ``[T, d]``
    (before its gate), gate ``[T]`` (sigmoid gate, or ones)."""

    index: int
    inputs: torch.Tensor
    intermediate: torch.Tensor
    outputs: torch.Tensor
    gate: torch.Tensor


# ----- registry ------------------------------------------------------------------------------------------------
class Statistic:
    """One named statistic of one MoE layer. Subclasses set ``name``/``description`` and override the hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_outputs: ClassVar[bool] = False  # needs routed expert outputs (down-proj)

    def __init__(self, view: MoEBlockView, options: dict[str, Any] | None = None) -> None:
        self.num_experts = view.num_experts
        # router outputs differ from stored experts only after a merge that kept the full router
        self.num_router_outputs = int(getattr(view, "num_router_outputs", view.num_experts))
        self.hidden_size = view.hidden_size
        self.intermediate_size = view.intermediate_size
        self.view = view
        self.options = dict(options or {})

    needs_output_norms: ClassVar[bool] = False  # ``on_routed`` reads ``batch.output_norms``

    def on_router(self, batch: RouterBatch) -> None:
        pass

    def on_routed(self, batch: RouterBatch) -> None:
        """After every routed expert of the batch ran (``batch.output_norms`` is filled if asked for)."""

    def on_routed_pairs(self, pairs: RoutedPairs) -> None:
        """Once per batch, after every routed expert ran: all picks at once (prefer this to ``on_expert``)."""

    def on_expert(self, expert_slice: ExpertSlice) -> None:
        """Once per hit expert per batch: only for statistics that need each expert's own matrices."""

    def on_shared(self, shared_slice: SharedSlice) -> None:
        pass

    def result(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def combine_ranks(self, world: World, owners: list[int] | None = None) -> None:
        """Combine this rank's accumulators with every other rank's (each saw its own calibration batches), so
        that :meth:`result` returns what one process would. ``owners`` (per-expert Hessians only): the rank that
        needs each expert's Hessian; None gives every rank all of them. A world of one changes nothing."""
        if world.size > 1:
            raise CalibrationError(f"statistic {self.name!r} cannot be collected over several ranks (it does not say "
                                   "how the ranks' parts combine); run this recipe in one process")


def _sum_count(world: World, count: int) -> int:
    """A Python int summed over the ranks."""
    return int(world.all_reduce_(torch.tensor([count], dtype=torch.int64))[0])


STATISTICS: dict[str, type[Statistic]] = {}


def register_statistic(statistic_class: type[Statistic]) -> type[Statistic]:
    STATISTICS[statistic_class.name] = statistic_class
    return statistic_class


def check_statistic_names(names) -> list[str]:
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in STATISTICS]
    if unknown:
        raise CalibrationError(f"unknown calibration statistic(s) {unknown}; known: {sorted(STATISTICS)}")
    return names


@dataclass
class LayerStatistics:
    """Every requested statistic of one MoE layer (fp32 CPU tensors), plus its token count."""

    layer_index: int
    num_experts: int
    num_tokens: int = 0
    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str):
        if name not in self.values:
            raise KeyError(f"statistic {name!r} was not collected for layer {self.layer_index}; "
                           f"collected: {sorted(self.values)}. Ask for it in collect_statistics(names=...)")
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values


# ----- router statistics ---------------------------------------------------------------------------------------
@register_statistic
class RouterLogitMean(Statistic):
    name = "router_logit_mean"
    description = "[E] mean fp32 router logit over all tokens"

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.sum = torch.zeros(self.num_router_outputs, dtype=torch.float64)
        self.count = 0

    def on_router(self, batch):
        self.sum += batch.logits.double().sum(0).cpu()
        self.count += batch.logits.shape[0]

    def combine_ranks(self, world, owners=None):
        world.all_reduce_(self.sum)
        self.count = _sum_count(world, self.count)

    def result(self):
        return (self.sum / max(self.count, 1)).float()


@register_statistic
class RouterLogitGram(Statistic):
    name = "router_logit_gram"
    description = "[E, E] sum over tokens of z z^T (router logits); cosine similarity of expert logit columns"

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.gram = torch.zeros(self.num_router_outputs, self.num_router_outputs, dtype=torch.float64)

    def on_router(self, batch):
        logits = batch.logits.double()
        self.gram += (logits.T @ logits).cpu()

    def combine_ranks(self, world, owners=None):
        world.all_reduce_(self.gram)

    def result(self):
        return self.gram.float()


def tcess_markers(logits: torch.Tensor, top_k: int, threshold: float = -1.0, phi: str = "identity") -> torch.Tensor:
    """PreMoe token markers (methods.md section 1): logits ``[T, E]`` fp32 -> markers ``[T, E]``.

    Top-k of the raw logits; with ``threshold > 0`` keep an expert only if its softmax over the token's top-k
    logits is at least ``threshold``; marker = ``phi(logit)`` (``identity``: v1 code, ``peu``: ``max(s, sigmoid(s))``).
    """
    top_logits, top_index = torch.topk(logits, top_k, dim=-1)
    keep = torch.ones_like(top_logits, dtype=torch.bool)
    if threshold > 0:
        keep = torch.softmax(top_logits, dim=-1) >= threshold
    if phi == "identity":
        values = top_logits
    elif phi == "peu":
        values = torch.maximum(top_logits, torch.sigmoid(top_logits))
    else:
        raise CalibrationError(f"unknown TCESS phi {phi!r}; use 'identity' or 'peu'")
    markers = torch.zeros_like(logits)
    markers.scatter_(1, top_index, torch.where(keep, values, torch.zeros_like(values)))
    return markers


@register_statistic
class TcessMarkers(Statistic):
    name = "tcess_markers"
    description = "[E] TCESS: mean over all tokens of the PreMoe markers (options: top_k, threshold, phi)"

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.top_k = int(self.options.get("top_k") or view.routing.top_k)
        self.threshold = float(self.options.get("threshold", -1.0))
        self.phi = str(self.options.get("phi", "identity"))
        self.sum = torch.zeros(self.num_router_outputs, dtype=torch.float64)
        self.count = 0

    def on_router(self, batch):
        self.sum += tcess_markers(batch.logits, self.top_k, self.threshold, self.phi).double().sum(0).cpu()
        self.count += batch.logits.shape[0]

    def combine_ranks(self, world, owners=None):
        world.all_reduce_(self.sum)
        self.count = _sum_count(world, self.count)

    def result(self):
        return (self.sum / max(self.count, 1)).float()


@register_statistic
class ExpertTokenCounts(Statistic):
    name = "expert_token_counts"
    description = "[E] number of tokens routed to each expert (top-k selections)"

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.counts = torch.zeros(self.num_experts, dtype=torch.long)

    def on_router(self, batch):
        self.counts += torch.bincount(batch.top_k_index.reshape(-1).cpu(), minlength=self.num_experts)[: self.num_experts]

    def combine_ranks(self, world, owners=None):
        world.all_reduce_(self.counts)

    def result(self):
        return self.counts.clone()


@register_statistic
class ExpertTokenCountsByDomain(Statistic):
    name = "expert_token_counts_by_domain"
    description = "[D, E] routed-token counts per calibration domain (D = number of domains in the set)"

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.num_domains = int(self.options.get("num_domains", 1))
        self.counts = torch.zeros(self.num_domains, self.num_experts, dtype=torch.long)

    def on_router(self, batch):
        if batch.domain_ids is None:
            return
        k = batch.top_k_index.shape[1]
        flat = batch.domain_ids.cpu().repeat_interleave(k) * self.num_experts + batch.top_k_index.reshape(-1).cpu()
        self.counts += torch.bincount(flat, minlength=self.num_domains * self.num_experts).view(self.num_domains, -1)

    def combine_ranks(self, world, owners=None):
        world.all_reduce_(self.counts)

    def result(self):
        return self.counts.clone()


class _RoutedSum(Statistic):
    """Base: ``[E]`` sum over routed (token, pick) pairs of ``value(batch) [T, k]``, one bincount per batch
    (vectorised over experts: per-expert Python work is what made small models' passes slow)."""

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.sum = torch.zeros(self.num_experts, dtype=torch.float64)

    def value(self, batch: RouterBatch) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def on_routed(self, batch):
        index = batch.top_k_index.reshape(-1)
        valid = (index >= 0) & (index < self.num_experts)
        weights = self.value(batch).reshape(-1).double()
        self.sum += torch.bincount(index[valid], weights=weights[valid], minlength=self.num_experts).cpu()

    def combine_ranks(self, world, owners=None):
        world.all_reduce_(self.sum)

    def result(self):
        return self.sum.float()


@register_statistic
class RoutingWeightSumsRaw(_RoutedSum):
    name = "routing_weight_sums_raw"
    description = "[E] sum over routed tokens of the pre-renormalisation score (softmax prob or sigmoid)"

    def value(self, batch):
        return batch.raw_weights


@register_statistic
class RoutingWeightSumsRenorm(_RoutedSum):
    name = "routing_weight_sums_renorm"
    description = "[E] sum over routed tokens of the score renormalised over the token's top-k"

    def value(self, batch):
        return batch.raw_weights / batch.raw_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)


@register_statistic
class CombineWeightSums(_RoutedSum):
    name = "combine_weight_sums"
    description = "[E] sum over routed tokens of the model's actual combine weight"

    def value(self, batch):
        return batch.combine_weights


@register_statistic
class ReapSums(_RoutedSum):
    name = "reap_sums"
    description = "[E] REAP numerator: sum over routed tokens of c * ||E_e(x)||_2 (divide by token counts)"
    needs_output_norms = True

    def value(self, batch):
        return batch.combine_weights * batch.output_norms


@register_statistic
class EanSums(_RoutedSum):
    name = "ean_sums"
    description = "[E] EAN: sum over routed tokens of ||E_e(x)||_2"
    needs_output_norms = True

    def value(self, batch):
        return batch.output_norms


@register_statistic
class MaxAbsExpertOutput(Statistic):
    name = "max_abs_expert_output"
    description = "{'routed': [E], 'shared': [S]} max |down_proj output| (super experts)"
    needs_outputs = True

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.routed = torch.zeros(self.num_experts)
        self.shared = torch.zeros(len(view.shared_experts))

    def on_routed_pairs(self, pairs):
        # [P] max |output| of each pick; amax and amin (vectorised row reductions) beat abs().amax() and aminmax
        pick_max = torch.maximum(pairs.outputs.amax(dim=-1), pairs.outputs.amin(dim=-1).neg()).float()
        batch_max = torch.zeros(self.num_experts, device=pick_max.device)  # |output| >= 0: zero is a neutral start
        batch_max.scatter_reduce_(0, pairs.expert_ids, pick_max, reduce="amax")
        self.routed = torch.maximum(self.routed, batch_max.cpu())

    def on_shared(self, shared_slice):
        value = float(shared_slice.outputs.abs().max())
        self.shared[shared_slice.index] = max(float(self.shared[shared_slice.index]), value)

    def combine_ranks(self, world, owners=None):
        world.all_reduce_(self.routed, op="max")
        world.all_reduce_(self.shared, op="max")

    def result(self):
        return {"routed": self.routed.clone(), "shared": self.shared.clone()}


@register_statistic
class TopKWeightRatioHist(Statistic):
    name = "topk_weight_ratio_hist"
    description = (f"[k-1, {WEIGHT_RATIO_BINS}] histograms on [0, 1] of w_r/w_0 per rank r >= 1 (combine weights sorted; "
                   "row 0 is the top-2 ratio)")

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.bins = int(self.options.get("bins", WEIGHT_RATIO_BINS))
        self.hist = torch.zeros(max(view.routing.top_k - 1, 0), self.bins, dtype=torch.long)

    def on_router(self, batch):
        ranks = batch.combine_weights.shape[1]
        if ranks < 2:
            return
        ratios = ranks_over_top(batch.combine_weights)  # [T, k-1]
        index = (ratios.clamp(0, 1) * self.bins).long().clamp_max(self.bins - 1).cpu()
        for rank in range(min(ranks - 1, self.hist.shape[0])):
            self.hist[rank] += torch.bincount(index[:, rank], minlength=self.bins)

    def combine_ranks(self, world, owners=None):
        world.all_reduce_(self.hist)

    def result(self):
        return self.hist.clone()


def ranks_over_top(weights: torch.Tensor) -> torch.Tensor:
    """``[T, k]`` combine weights -> ``[T, k-1]`` ``w_r / w_0`` of the weights sorted in decreasing order."""
    ordered = torch.sort(weights.float(), dim=-1, descending=True).values
    return ordered[:, 1:] / ordered[:, :1].clamp_min(1e-30)


def histogram_quantile(hist: torch.Tensor, q: float) -> float:
    """Quantile ``q`` of a ``[0, 1]`` histogram (bin centre), e.g. the median of a ``topk_weight_ratio_hist`` row."""
    total = int(hist.sum())
    if total == 0:
        return float("nan")
    cumulative = torch.cumsum(hist, 0)
    rank = max(math.ceil(q * total), 1)  # the value at 1-based rank ceil(q * n) of the sorted samples
    index = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype)))
    return (min(index, len(hist) - 1) + 0.5) / len(hist)


@register_statistic
class MeanExpertOutputAllTokens(Statistic):
    name = "mean_expert_output_all_tokens"
    description = "[E, d] mean of E_e(x) over ALL tokens (HC-SMoE; costs E expert FFNs per token: opt-in)"

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.sum = torch.zeros(self.num_experts, self.hidden_size, dtype=torch.float64)
        self.count = 0

    def on_router(self, batch):
        for expert in range(self.num_experts):
            self.sum[expert] += self.view.expert_forward(expert, batch.hidden_states).double().sum(0).cpu()
        self.count += batch.hidden_states.shape[0]

    def combine_ranks(self, world, owners=None):
        world.all_reduce_(self.sum)
        self.count = _sum_count(world, self.count)

    def result(self):
        return (self.sum / max(self.count, 1)).float()


class _ChannelEnergy(Statistic):
    """CAMERA energies over micro-experts (expert, channel): phi = c * h. Shared channels use their gate (or 1)."""

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.routed = torch.zeros(self.num_experts, self.intermediate_size, dtype=torch.float64)
        self.shared = [torch.zeros(int(s.module.down_proj.in_features), dtype=torch.float64) for s in view.shared_experts]

    def reduce(self, phi_squared: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """``[n, I]`` -> ``[I]`` over one shared expert's tokens."""
        raise NotImplementedError

    def reduce_by_expert(self, phi_squared: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``[P, I]`` routed picks, expert_ids ``[P]`` -> ``[E, I]`` fp32 (experts without picks: 0)."""
        raise NotImplementedError

    def combine(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    reduce_op: ClassVar[str] = "sum"  # how two ranks' accumulators combine (as :meth:`combine` does)

    def combine_ranks(self, world, owners=None):
        world.all_reduce_(self.routed, op=self.reduce_op)
        for shared in self.shared:
            world.all_reduce_(shared, op=self.reduce_op)

    def on_routed_pairs(self, pairs):
        self.routed = self.combine(self.routed, self.reduce_by_expert(pairs.camera_phi_squared(), pairs.expert_ids).double().cpu())

    def on_shared(self, shared_slice):
        phi = shared_slice.gate[:, None] * shared_slice.intermediate.float()
        self.shared[shared_slice.index] = self.combine(self.shared[shared_slice.index], self.reduce(phi.square()).double().cpu())

    def result(self):
        return {"routed": self.routed.float(), "shared": [s.float() for s in self.shared]}


@register_statistic
class CameraEnergyL2(_ChannelEnergy):
    name = "camera_energy_l2"
    description = "{'routed': [E, I], 'shared': [[I_s]]} sum over tokens of phi^2, phi = c * h (CAMERA)"

    def reduce(self, phi_squared):
        return phi_squared.sum(0)

    def reduce_by_expert(self, phi_squared, expert_ids):
        sums = torch.zeros(self.num_experts, phi_squared.shape[1], device=phi_squared.device)
        return sums.index_add_(0, expert_ids, phi_squared)

    def combine(self, old, new):
        return old + new


@register_statistic
class CameraEnergyMax(_ChannelEnergy):
    name = "camera_energy_max"
    description = "{'routed': [E, I], 'shared': [[I_s]]} max over tokens of phi^2 (CAMERA)"

    def reduce(self, phi_squared):
        return phi_squared.amax(0) if phi_squared.shape[0] else torch.zeros(phi_squared.shape[1])

    def reduce_by_expert(self, phi_squared, expert_ids):
        maxima = torch.zeros(self.num_experts, phi_squared.shape[1], device=phi_squared.device)  # phi^2 >= 0
        return maxima.scatter_reduce_(0, expert_ids[:, None].expand_as(phi_squared), phi_squared, reduce="amax")

    reduce_op = "max"

    def combine(self, old, new):
        return torch.maximum(old, new)


class _Hessian(Statistic):
    """Per-expert ``sum c^p v v^T`` on the compute device (the big ones: only when asked), returned in fp32.

    Each batch's ``v^T v`` is an fp32 matmul, added into an fp64 accumulator: the sum is then (almost always) exact,
    so ranks that each add their own batches give the fp32 result of one process (:mod:`moecompress.distributed`).
    Option ``experts: [start, stop]`` accumulates only that chunk of experts (``[stop - start, n, n]``), so a
    quantiser can bound the memory of a layer's Hessians (``E d^2`` floats) by sweeping the layer once per chunk.
    Option ``on_device: true`` leaves the result on the compute device (a GPU quantiser solves it there).
    """

    power: ClassVar[int] = 0

    def size(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def vectors(self, expert_slice: ExpertSlice) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.expert_start, self.expert_stop = (int(bound) for bound in self.options.get("experts", (0, self.num_experts)))
        device = view.router_weight.device if view.router_weight.device.type != "meta" else torch.device("cpu")
        self.on_device = bool(self.options.get("on_device", False))
        self.hessian = torch.zeros(self.expert_stop - self.expert_start, self.size(), self.size(), dtype=torch.float64,
                                   device=device)

    def on_expert(self, expert_slice):
        if not self.expert_start <= expert_slice.expert < self.expert_stop:
            return
        vectors = self.vectors(expert_slice).float().to(self.hessian.device)
        if self.power:
            # weighting each row by sqrt(c) gives sum c v v^T (MoEQuant AGQ)
            vectors = vectors * expert_slice.combine_weights.float().clamp_min(0).sqrt().to(vectors.device)[:, None]
        self.hessian[expert_slice.expert - self.expert_start].add_(vectors.T @ vectors)  # fp32 product, fp64 sum

    def combine_ranks(self, world, owners=None):
        if owners is None:
            world.all_reduce_(self.hessian)
            return
        start = 0
        while start < len(owners):  # one reduce per run of experts with the same owner
            stop = start + 1
            while stop < len(owners) and owners[stop] == owners[start]:
                stop += 1
            world.reduce_to_(self.hessian[start:stop], owners[start])
            start = stop

    def result(self):
        hessian = self.hessian.float()
        return hessian if self.on_device else hessian.cpu()


@register_statistic
class ExpertInputHessian(_Hessian):
    name = "expert_input_hessian"
    description = "[E, d, d] sum over routed tokens of x x^T (GPTQ for gate/up)"

    def size(self):
        return self.hidden_size

    def vectors(self, expert_slice):
        return expert_slice.inputs


@register_statistic
class ExpertInputHessianAffinity(ExpertInputHessian):
    name = "expert_input_hessian_affinity"
    description = "[E, d, d] sum over routed tokens of c x x^T (MoEQuant AGQ for gate/up)"
    power = 1


@register_statistic
class DownProjHessian(_Hessian):
    name = "down_proj_hessian"
    description = "[E, I, I] sum over routed tokens of h h^T (GPTQ for down)"

    def size(self):
        return self.intermediate_size

    def vectors(self, expert_slice):
        return expert_slice.intermediate


@register_statistic
class DownProjHessianAffinity(DownProjHessian):
    name = "down_proj_hessian_affinity"
    description = "[E, I, I] sum over routed tokens of c h h^T (MoEQuant AGQ for down)"
    power = 1


class _SharedHessian(Statistic):
    """Per shared expert ``sum g^p v v^T`` over all tokens (``g``: its sigmoid gate, 1 when it has none), summed in
    fp64 like the routed experts' (:class:`_Hessian`), returned in fp32."""

    power: ClassVar[int] = 0

    def vectors(self, shared_slice: SharedSlice) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __init__(self, view, options=None):
        super().__init__(view, options)
        self.hessians: dict[int, torch.Tensor] = {}

    def on_shared(self, shared_slice):
        vectors = self.vectors(shared_slice).float()
        if self.power:
            vectors = vectors * shared_slice.gate.float().clamp_min(0).sqrt()[:, None]
        total = self.hessians.get(shared_slice.index)
        if total is None:
            total = self.hessians[shared_slice.index] = vectors.new_zeros(vectors.shape[1], vectors.shape[1],
                                                                          dtype=torch.float64)
        total.add_(vectors.T @ vectors)  # fp32 product, fp64 sum

    def size(self, index: int) -> int:
        """Width of the vectors of shared expert ``index`` (a rank that saw no token must still take part)."""
        return self.hidden_size

    def combine_ranks(self, world, owners=None):
        for index, shared in enumerate(self.view.shared_experts):
            if index not in self.hessians:
                size = self.size(index)
                self.hessians[index] = torch.zeros(size, size, dtype=torch.float64,
                                                   device=self.view.router_weight.device)
            world.all_reduce_(self.hessians[index])

    def result(self):
        return {index: hessian.float().cpu() for index, hessian in sorted(self.hessians.items())}


@register_statistic
class SharedInputHessian(_SharedHessian):
    name = "shared_input_hessian"
    description = "{shared expert: [d, d]} sum over all tokens of x x^T (GPTQ for shared gate/up)"

    def vectors(self, shared_slice):
        return shared_slice.inputs


@register_statistic
class SharedInputHessianAffinity(SharedInputHessian):
    name = "shared_input_hessian_affinity"
    description = "{shared expert: [d, d]} sum over all tokens of g x x^T, g its sigmoid gate (AGQ)"
    power = 1


@register_statistic
class SharedDownHessian(_SharedHessian):
    name = "shared_down_hessian"
    description = "{shared expert: [I_s, I_s]} sum over all tokens of h h^T (GPTQ for shared down)"

    def vectors(self, shared_slice):
        return shared_slice.intermediate

    def size(self, index):
        return int(self.view.shared_experts[index].module.down_proj.in_features)


@register_statistic
class SharedDownHessianAffinity(SharedDownHessian):
    name = "shared_down_hessian_affinity"
    description = "{shared expert: [I_s, I_s]} sum over all tokens of g h h^T, g its sigmoid gate (AGQ)"
    power = 1


def statistic_descriptions() -> dict[str, str]:
    return {name: cls.description for name, cls in sorted(STATISTICS.items())}


StatisticFactory = Callable[[MoEBlockView, dict], Statistic]
