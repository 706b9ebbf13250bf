"""Quantisation over several ranks (:mod:`moecompress.distributed`): who solves what, and sharing the results.

Inside one decoder layer every rank ran the forward on its own calibration batches, and each per-expert Hessian was
summed into the rank that owns the expert (:meth:`moecompress.calibration.runner.LayerReplay.collect` with
``hessian_owners``). Each rank then solves its own experts (a contiguous block of each chunk of experts, and of each
list of plain linears) and :func:`share_solved` hands every rank every result, so all ranks hold the same quantised
layer and propagate their calibration tokens through it. In a world of one the rank owns everything and sharing
returns its input.
"""

from __future__ import annotations

from typing import Hashable

from moecompress.distributed import World
from moecompress.kernels.layout import PackedLinearWeight


def owners(world: World, count: int) -> list[int]:
    """The rank that solves each of ``count`` items (contiguous blocks, :meth:`World.blocks`)."""
    return [rank for rank, block in enumerate(world.blocks(count)) for _ in block]


def owned_keys(world: World, keys: list[Hashable]) -> list[Hashable]:
    """The keys of ``keys`` (experts, module paths) this rank solves."""
    return [keys[index] for index in world.owned(len(keys))]


def share_solved(world: World, keys: list[Hashable], packed: dict, errors: dict) -> None:
    """Fill ``packed`` (``{key: PackedLinearWeight}``) and ``errors`` (``{key: float}``) on every rank with every
    rank's solved keys: each rank in turn broadcasts its block of ``keys`` (one byte buffer of packed words, scales
    and zero points, and one small object with the rest)."""
    if world.size == 1:
        return
    for source, block in enumerate(world.blocks(len(keys))):
        block_keys = [keys[index] for index in block]
        if not block_keys:
            continue
        tensors, descriptions = None, None
        if world.rank == source:
            tensors, descriptions = [], []
            for key in block_keys:
                weight = packed[key]
                tensors += [weight.packed, weight.scales] + ([] if weight.zeros is None else [weight.zeros])
                descriptions.append((weight.bits, weight.group_size, tuple(weight.shape), weight.zeros is not None,
                                     errors[key]))
        descriptions = world.broadcast_object(descriptions, source)
        tensors = world.broadcast_tensors(tensors, source)
        if world.rank == source:
            continue
        position = 0
        for key, (bits, group_size, shape, has_zeros, error) in zip(block_keys, descriptions):
            words, scales = tensors[position], tensors[position + 1]
            zeros = tensors[position + 2] if has_zeros else None
            position += 3 if has_zeros else 2
            packed[key] = PackedLinearWeight(words, scales, zeros, bits, group_size, shape)
            errors[key] = error

