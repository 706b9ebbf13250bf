"""Quantizers, bit allocation and packed weight formats."""
