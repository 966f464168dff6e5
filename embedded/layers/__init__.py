"""Numba layers: one module per layer family, each with forward and backward side by side."""
