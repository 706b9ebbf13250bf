"""MC-MoE Online Dynamic Pruning (ODP, methods.md section 5), the runtime hooks: at inference, skip secondary experts
whose routing weight is small next to the token's top expert, except on the tokens attention marks as important.

Per token of an enabled MoE layer, with the chosen experts sorted by combine weight ``w_0 >= w_1 >= ...``:

1. *Weight rule* (generalised beyond top-2, per rank): expert ``r >= 1`` is skipped when ``w_r < mu_{l,r} * w_0``,
   with ``mu_{l,r}`` the median (``quantile``) of ``w_r / w_0`` on calibration tokens.
2. *Token protection* (prefill, sequences longer than one token): importance
   ``I_j = ||x_j||_1 * (1 / (L - j)) * sum_{i >= j} A_{i,j}`` with ``A`` the layer's attention probabilities averaged
   over heads and ``x_j`` the MoE input: the attention token ``j`` receives from the tokens that can see it, times
   its magnitude. The top ``protect_fraction`` (``int(fraction * L)`` per sequence, 2% by default) keep every expert;
   the bottom ``drop_fraction`` (default 0) skip all. ``odp_importance: code`` uses the reference code's row sum
   instead (``sum_k A_{j,k} = 1`` under softmax, so ``I_j = ||x_j||_1 / (L - j)``).
3. Surviving weights are rescaled to the token's original top-k sum (renormalising families: to 1, so a token left
   with its top expert gives it weight 1.0, as the reference does).

Runtime: a forward pre-hook on each enabled block's experts module rewrites ``(top_k_index, top_k_weights)``: a
skipped pick gets the expert-parallel sentinel id ``num_experts`` and weight 0, which every experts backend (eager,
``grouped_mm``, moecompress's packed kernels and torch path, the calibration backend) leaves out, so skipped experts
are not computed. Protection reads the attention probabilities with a forward hook on the layer's ``self_attn``,
which needs eager attention: installing ODP with protection switches the model to ``attn_implementation="eager"``.

Persistence: the settings live in the model's config (``config.moecompress["odp"]``, saved in ``config.json``);
``moecompress.checkpoint.load_model`` (and so ``moecompress eval``) and a plain ``from_pretrained`` of a native
(quantised) checkpoint install them again. Switch off with ``load_model(..., odp=False)``, the environment variable
``MOECOMPRESS_ODP=0``, or :func:`remove_odp` on a loaded model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from moecompress.errors import MoECompressError
from moecompress.models.edits import CONFIG_RECORD_KEY
from moecompress.models.families import decoder_layers, find_moe_blocks, text_config

CONFIG_KEY = "odp"
ENVIRONMENT_SWITCH = "MOECOMPRESS_ODP"
_STATE_ATTR = "moecompress_odp_state"


# ----- the rule -------------------------------------------------------------------------------------------------------
@dataclass
class LayerODP:
    """One layer's ODP: ``thresholds[r-1]`` = ``mu_{l,r}`` for ranks ``r = 1..k-1``; counters of picks seen and
    skipped since the last :func:`reset_odp_counters`."""

    thresholds: list[float]
    picks: int = 0
    skipped: int = 0


@dataclass
class ODPState:
    layers: dict[int, LayerODP]
    protect_fraction: float = 0.02
    drop_fraction: float = 0.0
    importance: Literal["paper", "code"] = "paper"
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, L, S] of the current forward
    handles: list = field(default_factory=list)


def token_importance(moe_inputs: torch.Tensor, attention: torch.Tensor, mode: str = "paper") -> torch.Tensor:
    """``[B, L]`` importance of each token. moe_inputs ``[B, L, d]``; attention ``[B, H, L, S]`` probabilities
    (the last ``L`` keys are this forward's tokens). paper: ``||x_j||_1 * sum_{i>=j} A_ij / (L - j)``; code:
    ``||x_j||_1 * sum_k A_jk / (L - j)`` (the reference's row sum)."""
    length = moe_inputs.shape[1]
    averaged = attention.float().mean(dim=1)[..., -length:]  # [B, L, L]: queries x this forward's keys
    positions = torch.arange(length, device=averaged.device)
    if mode == "code":
        received = averaged.sum(dim=-1)  # row sums
    else:
        causal = positions[:, None] >= positions[None, :]  # [i, j]: i >= j
        received = (averaged * causal).sum(dim=1)  # column sums over the queries that see j
    received = received / (length - positions).to(received.dtype)
    return moe_inputs.float().abs().sum(dim=-1) * received


def odp_routing(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, thresholds: list[float], num_experts: int,
                protected: torch.Tensor | None = None, dropped: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the rule to one batch. top_k_index / top_k_weights ``[T, k]``; thresholds ``[k-1]`` per rank;
    protected / dropped ``[T]`` bool or None. Returns the new index (skipped picks = ``num_experts``), the new weights
    (skipped 0, survivors rescaled to the original sum) and the ``[T, k]`` skip mask."""
    weights = top_k_weights.float()
    order = torch.argsort(weights, dim=-1, descending=True)
    ranked = torch.gather(weights, 1, order)  # [T, k] decreasing
    limits = torch.cat([torch.zeros(1, device=weights.device),
                        torch.as_tensor(thresholds, dtype=torch.float32, device=weights.device)])
    skip_ranked = ranked < limits[None, : ranked.shape[1]] * ranked[:, :1]  # rank 0 never (limit 0, w >= 0)
    skip = torch.zeros_like(skip_ranked).scatter(1, order, skip_ranked)
    if protected is not None:
        skip &= ~protected[:, None]
    if dropped is not None:
        skip |= dropped[:, None]
    total = weights.sum(dim=-1, keepdim=True)
    surviving = torch.where(skip, 0.0, weights)
    scale = total / surviving.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    new_weights = (surviving * scale).to(top_k_weights.dtype)
    new_index = torch.where(skip, torch.full_like(top_k_index, num_experts), top_k_index)
    return new_index, new_weights, skip


def _protection_masks(state: ODPState, layer: int, hidden_states: torch.Tensor):
    """``(protected, dropped)`` ``[T]`` bool for this forward, or ``(None, None)`` (decode, or no protection)."""
    if state.protect_fraction <= 0 and state.drop_fraction <= 0:
        return None, None
    attention = state.attention.pop(layer, None)
    if attention is None:
        raise MoECompressError(f"ODP layer {layer}: token protection needs the attention probabilities, but the "
                               "attention returned none; load with attn_implementation='eager' (install_odp does)")
    batch, length = attention.shape[0], attention.shape[2]
    if length == 1 or batch * length != hidden_states.shape[0]:
        return None, None  # decode steps apply only the weight rule
    importance = token_importance(hidden_states.reshape(batch, length, -1), attention, state.importance)  # [B, L]
    protected = torch.zeros(batch, length, dtype=torch.bool, device=hidden_states.device)
    dropped = torch.zeros_like(protected)
    ranked = torch.argsort(importance, dim=-1, descending=True)
    top = int(state.protect_fraction * length)
    bottom = int(state.drop_fraction * length)
    if top:
        protected.scatter_(1, ranked[:, :top], True)
    if bottom:
        dropped.scatter_(1, ranked[:, length - bottom:], True)
    return protected.reshape(-1), dropped.reshape(-1)


def _experts_pre_hook(layer: int, state: ODPState):
    def hook(experts: nn.Module, args: tuple, kwargs: dict):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if len(args) >= 3:
            top_k_index, top_k_weights = args[1], args[2]
        else:  # keyword calls; some families name them router_indices / routing_weights
            index_key = next(key for key in _INDEX_KEYS if key in kwargs)
            weights_key = next(key for key in _WEIGHT_KEYS if key in kwargs)
            top_k_index, top_k_weights = kwargs[index_key], kwargs[weights_key]
        protected, dropped = _protection_masks(state, layer, hidden_states)
        entry = state.layers[layer]
        new_index, new_weights, skip = odp_routing(top_k_index, top_k_weights, entry.thresholds,
                                                   int(experts.num_experts), protected, dropped)
        entry.picks += skip.numel()
        entry.skipped += int(skip.sum())
        if len(args) >= 3:
            return (args[0], new_index, new_weights, *args[3:]), kwargs
        return args, {**kwargs, index_key: new_index, weights_key: new_weights}
    return hook


_INDEX_KEYS = ("top_k_index", "router_indices")
_WEIGHT_KEYS = ("top_k_weights", "routing_weights")


def _attention_hook(layer: int, state: ODPState):
    def hook(module: nn.Module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is not None:
            state.attention[layer] = weights.detach()
        else:
            state.attention.pop(layer, None)
    return hook


def install_odp(model: nn.Module, settings: dict | None = None) -> ODPState | None:
    """Install ODP hooks from ``settings`` (default: the model's ``config.moecompress["odp"]``); also records the
    settings in the config so that saving keeps them. Returns the state (counters), or None when there is none."""
    remove_odp(model, forget=False)
    record = getattr(text_config(model.config), CONFIG_RECORD_KEY, None)
    if settings is None:
        settings = (record or {}).get(CONFIG_KEY) if isinstance(record, dict) else None
        if not settings:
            return None
    state = ODPState(layers={int(layer): LayerODP(list(values)) for layer, values in settings["thresholds"].items()},
                     protect_fraction=float(settings.get("protect_fraction", 0.0)),
                     drop_fraction=float(settings.get("drop_fraction", 0.0)),
                     importance=settings.get("importance", "paper"))
    views = {view.layer_index: view for view in find_moe_blocks(model)}
    missing = sorted(set(state.layers) - set(views))
    if missing:
        raise MoECompressError(f"ODP settings name layers {missing} that hold no MoE block; re-run mcmoe_odp on this model")
    needs_attention = state.protect_fraction > 0 or state.drop_fraction > 0
    if needs_attention and getattr(model.config, "_attn_implementation", None) != "eager":
        model.set_attn_implementation("eager")  # protection reads attention probabilities, which SDPA never returns
    layers = decoder_layers(model)
    for layer in state.layers:
        state.handles.append(views[layer].experts.register_forward_pre_hook(_experts_pre_hook(layer, state),
                                                                            with_kwargs=True))
        if needs_attention:
            attention = getattr(layers[layer], "self_attn", None)
            if attention is None:
                raise MoECompressError(f"ODP token protection: decoder layer {layer} has no self_attn module; set "
                                       "protect_fraction: 0")
            state.handles.append(attention.register_forward_hook(_attention_hook(layer, state)))
    setattr(model, _STATE_ATTR, state)
    _write_settings(model, settings)
    return state


def remove_odp(model: nn.Module, forget: bool = True) -> None:
    """Remove the ODP hooks (every expert runs again); ``forget`` also deletes the settings from the config, so a
    saved model no longer applies ODP."""
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        delattr(model, _STATE_ATTR)
    if forget:
        _write_settings(model, None)


def apply_odp_from_config(model: nn.Module, enabled: bool = True) -> ODPState | None:
    """What loaders call: install the config's ODP unless ``enabled`` is False or ``MOECOMPRESS_ODP=0`` (then hooks a
    native checkpoint's own loading installed are removed again; the settings stay in the config)."""
    if not enabled or os.environ.get(ENVIRONMENT_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        remove_odp(model, forget=False)
        return None
    return install_odp(model)


def odp_state(model: nn.Module) -> ODPState | None:
    return getattr(model, _STATE_ATTR, None)


def skipped_fractions(model: nn.Module) -> dict[int, float]:
    """``{layer: skipped picks / picks}`` since the hooks were installed or last reset."""
    state = odp_state(model)
    if state is None:
        return {}
    return {layer: entry.skipped / entry.picks if entry.picks else 0.0 for layer, entry in state.layers.items()}


def reset_odp_counters(model: nn.Module) -> None:
    state = odp_state(model)
    for entry in (state.layers.values() if state else ()):
        entry.picks = entry.skipped = 0


def _write_settings(model: nn.Module, settings: dict | None) -> None:
    config = text_config(model.config)
    record = getattr(config, CONFIG_RECORD_KEY, None)
    record = dict(record) if isinstance(record, dict) else {}
    if settings is None:
        record.pop(CONFIG_KEY, None)
    else:
        record[CONFIG_KEY] = {"thresholds": {str(layer): list(map(float, values))
                                             for layer, values in settings["thresholds"].items()},
                              "protect_fraction": float(settings.get("protect_fraction", 0.0)),
                              "drop_fraction": float(settings.get("drop_fraction", 0.0)),
                              "importance": settings.get("importance", "paper")}
    if record:
        setattr(config, CONFIG_RECORD_KEY, record)
    elif hasattr(config, CONFIG_RECORD_KEY):
        delattr(config, CONFIG_RECORD_KEY)
