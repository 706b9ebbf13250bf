"""Scores computed from calibration statistics (super experts, frequency, REAP, EAN, TCESS), expert clusterings,
neuron alignment, and NAEE's block reconstruction (which registers the ``moe_block_inputs`` statistic)."""

from moecompress.analysis import block_outputs  # noqa: F401  (registers the moe_block_inputs statistic)
from moecompress.analysis.super_experts import SuperExperts, find_super_experts, remap_super_experts

__all__ = ["SuperExperts", "find_super_experts", "remap_super_experts"]
