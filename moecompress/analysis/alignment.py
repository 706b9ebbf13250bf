"""Neuron alignment of experts before merging (UNCURL step 5, M-SMoE's weight matching; methods.md 2 and 6.4).

Permuting an expert's intermediate neurons (rows of gate and up, columns of down, the gate/up biases) never changes
its function. Before averaging two experts, member ``y`` is permuted so that its neurons line up with the anchor
``J``'s: the permutation ``P`` maximises ``<W_in^J, P W_in^y> + <W_out^J, W_out^y P^T>`` with ``W_in = [gate | up]``
(``[I, 2d]``, one row per neuron) and ``W_out = down`` (``[d, I]``), a linear assignment problem solved exactly by
``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from moecompress.errors import RecipeError
from moecompress.models.view import MoEBlockView


def neuron_match_scores(anchor, member) -> torch.Tensor:
    """``[I, I]`` fp64: entry ``(i, j)`` = similarity of anchor neuron ``i`` and member neuron ``j`` (the gain in
    the objective when ``j`` is moved to position ``i``). anchor/member: :class:`ExpertWeights`."""
    anchor_in = torch.cat([anchor.gate, anchor.up], dim=1).detach().double()  # [I, 2d]
    member_in = torch.cat([member.gate, member.up], dim=1).detach().double()
    return anchor_in @ member_in.T + anchor.down.detach().double().T @ member.down.detach().double()


def alignment_permutation(anchor, member) -> torch.Tensor:
    """``[I]`` long ``perm``: member neuron ``perm[i]`` goes to position ``i`` (``gate[perm]``, ``down[:, perm]``)."""
    scores = neuron_match_scores(anchor, member)
    rows, columns = linear_sum_assignment(scores.cpu().numpy(), maximize=True)
    perm = torch.empty(scores.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(columns)
    return perm


def permute_expert_neurons(view: MoEBlockView, expert: int, perm: torch.Tensor) -> None:
    """Reorder expert ``expert``'s intermediate neurons in place (its function is unchanged).

    Works through :meth:`MoEBlockView.expert_weights`, whose tensors are views into the fused storage.
    """
    if view.storage == "packed":
        raise RecipeError(f"layer {view.layer_index}: quantized (packed) experts cannot be aligned and merged; "
                          "merge before quantizing")
    with torch.no_grad():
        weights = view.expert_weights(expert)
        perm = perm.to(weights.gate.device)
        for tensor in (weights.gate, weights.up):
            tensor.copy_(tensor[perm].clone())
        weights.down.copy_(weights.down[:, perm].clone())
        for bias in (weights.gate_bias, weights.up_bias):
            if bias is not None:
                bias.copy_(bias[perm].clone())


def align_cluster(view: MoEBlockView, anchor: int, members: list[int]) -> dict[int, list[int]]:
    """Permute every member of a cluster (but the anchor) to line up with the anchor, in place.

    Returns ``{member: permutation}`` (for the report; identity permutations included)."""
    permutations = {}
    with torch.no_grad():  # views into parameters are edited in place: fetch them afresh for each member
        for member in members:
            if member == anchor:
                continue
            perm = alignment_permutation(view.expert_weights(anchor), view.expert_weights(member))
            permute_expert_neurons(view, member, perm)
            permutations[member] = perm.tolist()
    return permutations
