"""Explain a patch: weight-space geometry, magnitudes, activation shifts, interference."""
