"""Offline study tools on top of the trainer: sweeps, scaling-law fits, plots, reports, coordinate checks."""
