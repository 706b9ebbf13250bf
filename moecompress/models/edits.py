"""Structural edits of MoE blocks, through the uniform view: keep experts, merge experts, prune micro-experts.

Every edit works on the live HF modules in place and keeps the model a working transformers model:

* tensors are sliced or rebuilt along the expert axis (fused ``gate_up_proj``/``down_proj``, their biases, router
  rows, router bias, DeepSeek's ``e_score_correction_bias``), whatever the storage layout;
* the per-module counts the HF forwards read (``num_experts``, ``top_k``, DeepSeek's ``num_group``/``topk_group``)
  are updated per layer, so layers may differ in memory;
* the config is updated where one value describes every MoE layer (:func:`sync_config`); what a plain config
  cannot say (per-layer counts, a merged-expert map) is recorded under ``config.moecompress`` (a dict).

Saving: a model whose MoE layers all have the same expert count and intermediate size saves with the default
``save_pretrained`` and reloads with plain ``AutoModelForCausalLM.from_pretrained``. Non-uniform layers (different
counts per layer, or DeepSeek after slicing micro-experts, whose shared experts are sized by the same config field)
cannot be described by a transformers config: plain ``from_pretrained`` then fails on a shape mismatch (it does not
load wrong weights silently); such models need moecompress's native export format.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from moecompress.errors import MoECompressError
from moecompress.models.families import adapter_for, find_moe_blocks, minimum_experts, text_config
from moecompress.models.view import EXPERT_ID_MAP_ATTR, MoEBlockView

# Key of the config dict where edits record what the plain transformers config cannot express.
CONFIG_RECORD_KEY = "moecompress"

# Parameters of an experts module that carry one slice per expert along dim 0.
_EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
# Tensors of a router that carry one entry per router output along dim 0.
_ROUTER_TENSORS = ("weight", "bias", "e_score_correction_bias")
_REMAP_HOOK_ATTR = "_moecompress_expert_id_map_hook"


class EditError(MoECompressError):
    """An edit request is impossible for this model (unknown layer or expert, not a partition, top-k too big)."""


# ----- public API ---------------------------------------------------------------------------------------------------


def keep_experts(model: nn.Module, kept_experts: Mapping[int, Sequence[int]], *, top_k: int | None = None) -> None:
    """Keep only ``kept_experts[layer]`` (original expert ids, any order; stored sorted) in each named MoE layer.

    Slices the fused expert tensors and their biases, the router rows, router bias and DeepSeek's selection bias,
    and updates the module counts. ``top_k``: new experts per token for the edited layers; default
    ``min(top_k, kept)``. DeepSeek group routing stays on only when the kept experts still form ``n_group`` equal
    groups that are exactly the original groups, restricted (otherwise pruning would change which experts
    compete in a group): then ``n_group`` / ``topk_group`` are kept; else both become 1.
    Layers not named are left as they are. Use :func:`remap_expert_ids` to carry ``(layer, expert)`` pairs along.
    """
    views = _views_by_layer(model, kept_experts)
    for layer, expert_ids in kept_experts.items():
        view = views[layer]
        if view.expert_id_map is not None:
            raise EditError(
                f"layer {layer} holds merged experts behind a full router (router_rule='remap'); keep_experts would "
                "prune router outputs and stored experts inconsistently. Prune before merging, or merge with "
                "router_rule='collapse'."
            )
        kept = _checked_expert_ids(layer, expert_ids, view.num_experts)
        _check_minimum_experts(model, view, len(kept))
        new_top_k = _checked_top_k(view, len(kept), top_k)
        group_state = _group_state_after_keep(view, kept, new_top_k)
        index = torch.tensor(kept, dtype=torch.long)
        _index_select_experts(view.experts, index)
        for router_module in _router_modules(view):
            _index_select_router(router_module, index)
        _index_select_selection_bias(view, index)
        _set_module_counts(view, num_experts=len(kept), num_router_outputs=len(kept), top_k=new_top_k)
        _set_group_state(view, *group_state)
    sync_config(model)


def remap_expert_ids(kept_experts: Mapping[int, Sequence[int]]) -> dict[tuple[int, int], int]:
    """``(layer, old_id) -> new_id`` after :func:`keep_experts` with the same argument (pruned ids are absent)."""
    return {
        (layer, old_id): new_id
        for layer, expert_ids in kept_experts.items()
        for new_id, old_id in enumerate(sorted(int(e) for e in expert_ids))
    }


def merged_expert_ids(clusters: Mapping[int, Sequence[Sequence[int]]]) -> dict[tuple[int, int], int]:
    """``(layer, old_id) -> merged_id`` after :func:`merge_experts` with the same clusters (cluster order = new id)."""
    return {
        (layer, int(old_id)): cluster_id
        for layer, layer_clusters in clusters.items()
        for cluster_id, members in enumerate(layer_clusters)
        for old_id in members
    }


def merge_experts(
    model: nn.Module,
    clusters: Mapping[int, Sequence[Sequence[int]]],
    *,
    member_weights: Mapping[int, Sequence[Sequence[float]]] | None = None,
    router_rule: str = "remap",
) -> None:
    """Merge each layer's experts cluster by cluster; cluster ``c`` of a layer becomes stored expert ``c``.

    clusters[layer]: a partition of ``range(num_experts)``. The merged expert's gate/up/down (and biases) are the
    weighted average of its members' (``member_weights[layer][c]``, normalised to sum 1; default uniform).

    router_rule:
      * ``"remap"`` (UNCURL R1): the full router is kept; a token that picks any member goes to the merged expert
        with that member's weight, and two picks landing in one cluster add their weights. Implemented by an
        ``expert_id_map`` buffer (router output -> stored expert) on the experts module plus a forward pre-hook
        that maps ``top_k_index``; it works with every experts backend. Before ``save_pretrained`` call
        :func:`materialize_expert_id_map` (plain-HF checkpoint with merged experts duplicated per router output);
        :func:`moecompress.checkpoint.load_model` compacts it again. Saving without that fails loudly on reload
        (router rows and expert count disagree).
      * ``"collapse"`` (R2): one router row per cluster (the weighted average of its members' rows, likewise
        router bias and selection bias), top-k clamped to the cluster count, DeepSeek-style group routing turned
        off (clusters may straddle groups); a plain HF model results.
    """
    if router_rule not in ("remap", "collapse"):
        raise EditError(f"router_rule must be 'remap' or 'collapse', got {router_rule!r}")
    views = _views_by_layer(model, clusters)
    for layer, view in views.items():
        if router_rule == "remap" and view.routing.scales_expert_input:
            raise EditError(
                f"layer {layer}: {view.family} runs every expert densely without expert ids, so a full router "
                "cannot be remapped onto merged experts; use router_rule='collapse'."
            )
    for layer, layer_clusters in clusters.items():
        view = views[layer]
        if view.expert_id_map is not None:
            raise EditError(f"layer {layer} was already merged with router_rule='remap'; merge it once, with all clusters")
        partition = _checked_partition(layer, layer_clusters, view.num_experts)
        weights = _cluster_weights(layer, partition, member_weights.get(layer) if member_weights else None)
        # merge_matrix[c, e]: weight of original expert e in merged expert c. [D, E]
        merge_matrix = torch.zeros(len(partition), view.num_experts, dtype=torch.float64)
        for cluster_id, (members, member_w) in enumerate(zip(partition, weights)):
            merge_matrix[cluster_id, members] = torch.tensor(member_w, dtype=torch.float64)
        _combine_experts(view.experts, merge_matrix)
        if router_rule == "remap":
            id_map = torch.empty(view.num_router_outputs, dtype=torch.long)
            for cluster_id, members in enumerate(partition):
                id_map[members] = cluster_id
            _install_expert_id_map(view.experts, id_map)
            _set_module_counts(view, num_experts=len(partition), num_router_outputs=None, top_k=None)
        else:
            new_top_k = min(view.routing.top_k, len(partition))
            _check_minimum_experts(model, view, len(partition))
            _check_phimoe_top_k(view, len(partition), new_top_k)
            for router_module in _router_modules(view):
                _combine_router(router_module, merge_matrix)
            _combine_selection_bias(view, merge_matrix)
            _set_module_counts(view, num_experts=len(partition), num_router_outputs=len(partition), top_k=new_top_k)
            # A cluster may straddle the original groups, so merged experts have no group: routing goes flat.
            _set_group_state(view, 1, 1)
    sync_config(model)


def zero_micro_experts(model: nn.Module, channels: Mapping[int, Mapping[int, Sequence[int]]]) -> None:
    """Zero micro-experts: ``channels[layer][expert]`` = intermediate channels whose gate row, up row, down column
    (and gate/up biases) are set to zero. Any set per expert; shapes do not change, so nothing is saved in memory
    (per-expert different widths cannot be stored in the fused layout: this is how they are expressed)."""
    views = _views_by_layer(model, channels)
    for layer, per_expert in channels.items():
        view = views[layer]
        for expert, expert_channels in per_expert.items():
            if not 0 <= int(expert) < view.num_experts:
                raise EditError(f"layer {layer} has {view.num_experts} experts; expert {expert} does not exist")
            channel_index = _checked_channels(layer, expert_channels, view.intermediate_size)
            fused_index = _fused_channel_index(view, channel_index)
            with torch.no_grad():
                experts = view.experts
                gate_up_dim, down_dim = _channel_dims(view)
                experts.gate_up_proj[int(expert)].index_fill_(gate_up_dim - 1, fused_index, 0.0)
                experts.down_proj[int(expert)].index_fill_(down_dim - 1, channel_index, 0.0)
                bias = getattr(experts, "gate_up_proj_bias", None)
                if isinstance(bias, torch.Tensor):
                    bias[int(expert)].index_fill_(0, fused_index, 0.0)


def slice_micro_experts(model: nn.Module, kept_channels: Mapping[int, Sequence[int]]) -> None:
    """Keep only ``kept_channels[layer]`` intermediate channels in *every* expert of that layer (uniform per layer:
    the fused layout holds one ``I`` per layer). Per-expert different widths can only be zero-masked
    (:func:`zero_micro_experts`). The config's expert intermediate size is updated when all MoE layers agree and
    the field sizes nothing else (not for DeepSeek, whose shared experts use the same field)."""
    views = _views_by_layer(model, kept_channels)
    for layer, layer_channels in kept_channels.items():
        view = views[layer]
        channel_index = _checked_channels(layer, layer_channels, view.intermediate_size)
        if channel_index.numel() == 0:
            raise EditError(f"layer {layer}: keeping zero channels would delete every expert; drop the experts instead")
        fused_index = _fused_channel_index(view, channel_index)
        gate_up_dim, down_dim = _channel_dims(view)
        experts = view.experts
        _replace_tensor(experts, "gate_up_proj", experts.gate_up_proj.index_select(gate_up_dim, fused_index))
        _replace_tensor(experts, "down_proj", experts.down_proj.index_select(down_dim, channel_index))
        bias = getattr(experts, "gate_up_proj_bias", None)
        if isinstance(bias, torch.Tensor):
            _replace_tensor(experts, "gate_up_proj_bias", bias.index_select(1, fused_index))
        for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):
            if isinstance(getattr(experts, attr, None), int):
                setattr(experts, attr, int(channel_index.numel()))
    sync_config(model)


def materialize_expert_id_map(model: nn.Module) -> None:
    """Turn every ``remap`` merge into a plain HF layout: stored expert ``e`` becomes ``merged[id_map[e]]`` for each
    router output (identical outputs, no memory saved), remove the map and hook, and record the map under
    ``config.moecompress["expert_id_map"]`` so :func:`restore_expert_id_map` can compact it after loading."""
    record: dict[str, list[int]] = {}
    for view in find_moe_blocks(model):
        id_map = view.expert_id_map
        if id_map is None:
            continue
        _index_select_experts(view.experts, id_map.cpu())
        _remove_expert_id_map(view.experts)
        _set_module_counts(view, num_experts=view.num_router_outputs, num_router_outputs=None, top_k=None)
        record[str(view.layer_index)] = [int(i) for i in id_map.tolist()]
    sync_config(model)
    if record:
        _config_record(model)["expert_id_map"] = record


def restore_expert_id_map(model: nn.Module) -> bool:
    """Undo :func:`materialize_expert_id_map` after loading: keep one copy per merged expert and reinstall the map.

    Returns True when a map was restored. Raises :class:`EditError` if the duplicated experts differ (the
    checkpoint was edited after materializing, so the recorded map no longer describes it).
    """
    config = text_config(model.config)
    record = (getattr(config, CONFIG_RECORD_KEY, None) or {}).get("expert_id_map")
    if not record:
        return False
    views = {view.layer_index: view for view in find_moe_blocks(model)}
    for layer_key, id_map_list in record.items():
        view = views[int(layer_key)]
        id_map = torch.tensor(id_map_list, dtype=torch.long)
        num_merged = int(id_map.max()) + 1
        first_output = torch.stack([torch.nonzero(id_map == cluster)[0, 0] for cluster in range(num_merged)])
        for name in _EXPERT_TENSORS:
            tensor = getattr(view.experts, name, None)
            if isinstance(tensor, torch.Tensor) and not torch.equal(tensor, tensor[first_output][id_map]):
                raise EditError(
                    f"layer {layer_key}: the checkpoint's experts do not repeat as the recorded expert_id_map says; "
                    f"remove the '{CONFIG_RECORD_KEY}.expert_id_map' entry from config.json to load it as a plain model."
                )
        _index_select_experts(view.experts, first_output)
        _install_expert_id_map(view.experts, id_map)
        _set_module_counts(view, num_experts=num_merged, num_router_outputs=None, top_k=None)
    del _config_record(model)["expert_id_map"]
    sync_config(model)
    return True


def sync_config(model: nn.Module) -> None:
    """Write per-layer module state back into the config where one value describes every MoE layer.

    Expert count (every count field of the family), top-k (every top-k field: ``num_experts_per_tok``, Aria's
    ``moe_topk``, ...), DeepSeek's ``n_group``/``topk_group``
    and the expert intermediate size. Values that differ between layers are recorded under
    ``config.moecompress`` (``num_experts_per_layer``, ``expert_intermediate_size_per_layer``) and the config
    field is left alone; the same goes for an intermediate size that also sizes other modules (DeepSeek).
    """
    config = text_config(model.config)
    adapter = adapter_for(config, model)
    views = find_moe_blocks(model)
    record = _config_record(model)
    expert_counts = {view.layer_index: view.num_experts for view in views}
    if len(set(expert_counts.values())) == 1:
        for field in adapter.count_fields:
            setattr(config, field, next(iter(expert_counts.values())))
        record.pop("num_experts_per_layer", None)
    else:
        record["num_experts_per_layer"] = {str(layer): count for layer, count in expert_counts.items()}
    top_ks = {int(view.router.top_k) for view in views if hasattr(view.router, "top_k")}
    if len(top_ks) == 1 and adapter.model_type != "phimoe":  # PhiMoE's sparsemixer ignores the field: always 2
        top_k = top_ks.pop()
        for field in adapter.top_k_fields:
            if hasattr(config, field):
                setattr(config, field, top_k)
    if adapter.group_fields is not None:
        # A.X-K2 spells "no groups" as None; such routers are left alone (None is not a count to write back).
        groups = {(view.router.num_group, view.router.topk_group) for view in views}
        if len(groups) == 1 and None not in next(iter(groups)):
            n_group, topk_group = groups.pop()
            setattr(config, adapter.group_fields[0], int(n_group))
            setattr(config, adapter.group_fields[1], int(topk_group))
    sizes = {view.layer_index: view.intermediate_size for view in views}
    _sync_experts_implementation(config, record, sizes.values())
    uniform_size = len(set(sizes.values())) == 1
    if uniform_size and not adapter.intermediate_field_shared:
        setattr(config, adapter.intermediate_field, next(iter(sizes.values())))
        record.pop("expert_intermediate_size_per_layer", None)
    elif not uniform_size or next(iter(sizes.values())) != getattr(config, adapter.intermediate_field, None):
        record["expert_intermediate_size_per_layer"] = {str(layer): size for layer, size in sizes.items()}
    if not record:
        _drop_config_record(model)


# transformers' default experts backend (``grouped_mm``) needs every expert matrix stride to be a multiple of 16
# bytes ("strides should be multiple of 16 bytes"): an expert width that is a multiple of 8 works in bf16/fp16 (and
# fp32); any other width fails on the first forward of a plain ``from_pretrained`` load.
GROUPED_MM_WIDTH_MULTIPLE = 8
# config.json key transformers reads as the default experts implementation when loading (``from_pretrained``'s own
# ``experts_implementation=`` argument still overrides it).
_EXPERTS_IMPLEMENTATION_KEY = "experts_implementation"


def _sync_experts_implementation(config, record: dict, widths: Iterable[int]) -> None:
    """Make a checkpoint with expert widths ``grouped_mm`` cannot run load with the ``eager`` experts backend.

    Sets ``experts_implementation: eager`` in the config (saved to config.json, read by plain ``from_pretrained``)
    and records why under ``config.moecompress``; removes both again once every width is aligned. Eager is exact
    and is what moecompress computes with anyway; padding the width instead would change the tensors' shapes.
    """
    misaligned = sorted({int(width) for width in widths if int(width) % GROUPED_MM_WIDTH_MULTIPLE})
    if misaligned:
        setattr(config, _EXPERTS_IMPLEMENTATION_KEY, "eager")
        record["eager_experts_for_widths"] = misaligned
    elif record.pop("eager_experts_for_widths", None) is not None and hasattr(config, _EXPERTS_IMPLEMENTATION_KEY):
        delattr(config, _EXPERTS_IMPLEMENTATION_KEY)


# ----- validation ---------------------------------------------------------------------------------------------------


def _views_by_layer(model: nn.Module, per_layer: Mapping[int, object]) -> dict[int, MoEBlockView]:
    views = {view.layer_index: view for view in find_moe_blocks(model)}
    unknown = sorted(set(int(layer) for layer in per_layer) - set(views))
    if unknown:
        raise EditError(f"layers {unknown} are not MoE layers of this model; MoE layers are {sorted(views)}")
    return {int(layer): views[int(layer)] for layer in per_layer}


def _checked_expert_ids(layer: int, expert_ids: Iterable[int], num_experts: int) -> list[int]:
    kept = sorted(int(e) for e in expert_ids)
    if not kept:
        raise EditError(f"layer {layer}: keep at least one expert (a MoE layer cannot have zero experts)")
    if len(set(kept)) != len(kept):
        raise EditError(f"layer {layer}: expert ids to keep repeat: {kept}")
    if kept[0] < 0 or kept[-1] >= num_experts:
        raise EditError(f"layer {layer} has experts 0..{num_experts - 1}; got ids {kept}")
    return kept


def _check_minimum_experts(model: nn.Module, view: MoEBlockView, kept_count: int) -> None:
    """Refuse an edit that leaves fewer experts than the family's transformers code can run or reload as MoE."""
    minimum, reason = minimum_experts(view, adapter_for(text_config(model.config), model))
    if kept_count < minimum:
        raise EditError(
            f"layer {view.layer_index}: keep at least {minimum} experts (got {kept_count}): {reason}. "
            f"Keep {minimum} or more experts in this layer."
        )


def _checked_top_k(view: MoEBlockView, kept_count: int, top_k: int | None) -> int:
    new_top_k = min(view.routing.top_k, kept_count) if top_k is None else int(top_k)
    if not 1 <= new_top_k <= kept_count:
        raise EditError(f"layer {view.layer_index}: top_k={new_top_k} must be between 1 and the kept count {kept_count}")
    _check_phimoe_top_k(view, kept_count, new_top_k)
    return new_top_k


def _check_phimoe_top_k(view: MoEBlockView, kept_count: int, top_k: int) -> None:
    if view.routing.selection == "sparsemixer" and (top_k != 2 or kept_count < 2):
        raise EditError(
            f"layer {view.layer_index}: PhiMoE's sparsemixer always picks exactly 2 experts; keep at least 2 experts "
            f"and leave top_k at 2 (got top_k={top_k}, {kept_count} experts)"
        )


def _checked_partition(layer: int, clusters: Sequence[Sequence[int]], num_experts: int) -> list[list[int]]:
    partition = [[int(e) for e in members] for members in clusters]
    flat = sorted(e for members in partition for e in members)
    if any(not members for members in partition) or flat != list(range(num_experts)):
        raise EditError(
            f"layer {layer}: clusters must be non-empty and cover every expert 0..{num_experts - 1} exactly once "
            f"(a partition); got {partition}"
        )
    return partition


def _cluster_weights(
    layer: int, partition: list[list[int]], weights: Sequence[Sequence[float]] | None
) -> list[list[float]]:
    if weights is None:
        return [[1.0 / len(members)] * len(members) for members in partition]
    if len(weights) != len(partition) or any(len(w) != len(m) for w, m in zip(weights, partition)):
        raise EditError(f"layer {layer}: member_weights must have one weight per cluster member, shaped like clusters")
    normalised = []
    for members, member_w in zip(partition, weights):
        total = float(sum(member_w))
        if any(w < 0 for w in member_w) or total <= 0:
            raise EditError(f"layer {layer}: member weights of cluster {members} must be >= 0 with a positive sum")
        normalised.append([float(w) / total for w in member_w])
    return normalised


def _checked_channels(layer: int, channels: Iterable[int], intermediate_size: int) -> torch.Tensor:
    channel_list = sorted(set(int(c) for c in channels))
    if channel_list and (channel_list[0] < 0 or channel_list[-1] >= intermediate_size):
        raise EditError(f"layer {layer}: channels must lie in 0..{intermediate_size - 1}; got {channel_list}")
    return torch.tensor(channel_list, dtype=torch.long)


# ----- tensor surgery -----------------------------------------------------------------------------------------------


def _replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a parameter or buffer for ``value``, keeping its kind (parameter/buffer, persistent or not)."""
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.detach().contiguous(), requires_grad=old.requires_grad))
    else:
        module._buffers[name] = value.detach().contiguous()


def _index_select_experts(experts: nn.Module, index: torch.Tensor) -> None:
    for name in _EXPERT_TENSORS:
        tensor = getattr(experts, name, None)
        if isinstance(tensor, torch.Tensor):
            _replace_tensor(experts, name, tensor.index_select(0, index.to(tensor.device)))


def _index_select_router(router: nn.Module, index: torch.Tensor) -> None:
    for name in _ROUTER_TENSORS:
        tensor = getattr(router, name, None)
        if isinstance(tensor, torch.Tensor):
            _replace_tensor(router, name, tensor.index_select(0, index.to(tensor.device)))
    if isinstance(router, nn.Linear):  # PhiMoE's router is an nn.Linear subclass
        router.out_features = int(router.weight.shape[0])


def _weighted_rows(tensor: torch.Tensor, merge_matrix: torch.Tensor) -> torch.Tensor:
    """``[E, ...]`` -> ``[D, ...]``: row ``c`` = sum_e merge_matrix[c, e] * tensor[e] (computed in fp64)."""
    flat = tensor.detach().reshape(tensor.shape[0], -1).double()
    merged = merge_matrix.to(flat.device) @ flat
    return merged.reshape(merge_matrix.shape[0], *tensor.shape[1:]).to(tensor.dtype)


def _combine_experts(experts: nn.Module, merge_matrix: torch.Tensor) -> None:
    for name in _EXPERT_TENSORS:
        tensor = getattr(experts, name, None)
        if isinstance(tensor, torch.Tensor):
            _replace_tensor(experts, name, _weighted_rows(tensor, merge_matrix))


def _combine_router(router: nn.Module, merge_matrix: torch.Tensor) -> None:
    for name in _ROUTER_TENSORS:
        tensor = getattr(router, name, None)
        if isinstance(tensor, torch.Tensor):
            _replace_tensor(router, name, _weighted_rows(tensor, merge_matrix))
    if isinstance(router, nn.Linear):
        router.out_features = int(router.weight.shape[0])


def _router_modules(view: MoEBlockView) -> list[nn.Module]:
    """The router module, and the nn.Linear it wraps where the weight lives there (Hunyuan, AfMoE)."""
    return [view.router] if view.router_linear is None else [view.router, view.router_linear]


def _external_selection_bias(view: MoEBlockView) -> tuple[nn.Module, str] | None:
    """(owner, name) of a selection bias kept outside the router's own tensors (MiniMax-M2's block, Ernie's
    ``moe_statics``), else None. Its last dim runs over router outputs."""
    owner, name = view.selection_bias_owner, view.selection_bias_name
    if owner is None or (owner is view.router and name in _ROUTER_TENSORS):
        return None
    return (owner, name) if isinstance(getattr(owner, name, None), torch.Tensor) else None


def _index_select_selection_bias(view: MoEBlockView, index: torch.Tensor) -> None:
    located = _external_selection_bias(view)
    if located is not None:
        owner, name = located
        tensor = getattr(owner, name)
        _replace_tensor(owner, name, tensor.index_select(tensor.dim() - 1, index.to(tensor.device)))


def _combine_selection_bias(view: MoEBlockView, merge_matrix: torch.Tensor) -> None:
    located = _external_selection_bias(view)
    if located is not None:
        owner, name = located
        tensor = getattr(owner, name)
        _replace_tensor(owner, name, _weighted_rows(tensor.movedim(-1, 0), merge_matrix).movedim(0, -1))


def _channel_dims(view: MoEBlockView) -> tuple[int, int]:
    """Dims (of the 3-D fused tensors) that index intermediate channels: (gate_up dim, down dim)."""
    return (1, 2) if view.storage == "concatenated" else (2, 1)


def _fused_channel_index(view: MoEBlockView, channel_index: torch.Tensor) -> torch.Tensor:
    """Positions of the gate and up rows of ``channel_index`` in the fused gate/up axis (gate ones first)."""
    if view.storage == "transposed_interleaved":
        return torch.stack([2 * channel_index, 2 * channel_index + 1], dim=1).reshape(-1)
    return torch.cat([channel_index, channel_index + view.intermediate_size])


def _map_expert_ids_hook(experts: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: router outputs -> stored merged experts in ``top_k_index`` (2nd argument)."""
    id_map = getattr(experts, EXPERT_ID_MAP_ATTR)
    if len(args) >= 2:
        args = (args[0], id_map[args[1]], *args[2:])
    else:
        for key in ("top_k_index", "router_indices"):
            if key in kwargs:
                kwargs = {**kwargs, key: id_map[kwargs[key]]}
    return args, kwargs


def _install_expert_id_map(experts: nn.Module, id_map: torch.Tensor) -> None:
    # Non-persistent: the map is model structure, recorded in the config, never a checkpoint tensor.
    experts.register_buffer(EXPERT_ID_MAP_ATTR, id_map.to(experts.gate_up_proj.device), persistent=False)
    if getattr(experts, _REMAP_HOOK_ATTR, None) is None:
        handle = experts.register_forward_pre_hook(_map_expert_ids_hook, with_kwargs=True)
        setattr(experts, _REMAP_HOOK_ATTR, handle)


def _remove_expert_id_map(experts: nn.Module) -> None:
    del experts._buffers[EXPERT_ID_MAP_ATTR]
    handle = getattr(experts, _REMAP_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(experts, _REMAP_HOOK_ATTR, None)


# ----- module counts, groups, config record ---------------------------------------------------------------------------


def _set_module_counts(
    view: MoEBlockView, *, num_experts: int, num_router_outputs: int | None, top_k: int | None
) -> None:
    """Update the counts HF forwards read (``one_hot(num_classes=num_experts)``, ``topk(k)``) on each module."""
    view.experts.num_experts = num_experts
    if num_router_outputs is not None:
        view.router.num_experts = num_router_outputs
        if hasattr(view.block, "num_experts"):
            view.block.num_experts = num_router_outputs
    if top_k is not None:
        for module in (view.router, view.block):
            if hasattr(module, "top_k"):
                module.top_k = top_k


def _group_state_after_keep(view: MoEBlockView, kept: list[int], top_k: int) -> tuple[int, int]:
    """(n_group, topk_group) after keeping ``kept``: groups survive only if they are the original groups, each
    restricted to the same number of kept experts, and enough of them remain to pick ``top_k``."""
    if getattr(view.router, "num_group", None) is None or int(view.router.num_group) <= 1:
        return 1, 1
    n_group, topk_group = int(view.router.num_group), int(view.router.topk_group)
    group_size = view.num_experts // n_group
    kept_per_group = torch.bincount(torch.tensor(kept) // group_size, minlength=n_group)
    per_group = int(kept_per_group[0])
    min_per_group = 2 if view.routing.group_score == "top2_sum" else 1
    if bool((kept_per_group == per_group).all()) and per_group >= min_per_group and topk_group * per_group >= top_k:
        return n_group, topk_group
    return 1, 1


def _set_group_state(view: MoEBlockView, n_group: int, topk_group: int) -> None:
    """Set DeepSeek's group routing on the router module (views built before an edit are stale: re-fetch them)."""
    if getattr(view.router, "num_group", None) is not None:  # None (A.X-K2): no group routing to change
        view.router.num_group = n_group
        view.router.topk_group = topk_group


def _config_record(model: nn.Module) -> dict:
    config = text_config(model.config)
    record = getattr(config, CONFIG_RECORD_KEY, None)
    if not isinstance(record, dict):
        record = {}
        setattr(config, CONFIG_RECORD_KEY, record)
    return record


def _drop_config_record(model: nn.Module) -> None:
    config = text_config(model.config)
    if hasattr(config, CONFIG_RECORD_KEY):
        delattr(config, CONFIG_RECORD_KEY)


def replace_experts(view: MoEBlockView, new_experts: nn.Module) -> None:
    """Put ``new_experts`` where ``view.experts`` sits in its block (counts and the remap map carried over)."""
    attribute = next(name for name, child in view.block.named_children() if child is view.experts)
    id_map = getattr(view.experts, EXPERT_ID_MAP_ATTR, None)
    if id_map is not None:
        setattr(new_experts, EXPERT_ID_MAP_ATTR, id_map)
    setattr(view.block, attribute, new_experts)
