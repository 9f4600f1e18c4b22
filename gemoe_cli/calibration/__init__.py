"""Calibration: data sources, gating-entropy statistics, threshold fitting and retention measurement."""
