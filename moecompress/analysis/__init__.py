"""Scores computed from calibration statistics (super experts, frequency, REAP, TCESS, CAMERA energies)."""
