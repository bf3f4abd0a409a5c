"""Evaluation: frozen-feature probes (k-NN, linear), feature extraction and attention diagnostics."""
