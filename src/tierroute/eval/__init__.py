"""Offline evaluation: metrics, cross-validated harness, savings and plots."""
