"""Offline study tools: sweeps, executors, scaling-law fits, plots and reports."""
