"""Scores computed from calibration statistics (super experts, frequency, REAP, TCESS, CAMERA energies)."""

from moecompress.analysis.super_experts import SuperExperts, find_super_experts, remap_super_experts

__all__ = ["SuperExperts", "find_super_experts", "remap_super_experts"]
