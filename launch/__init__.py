"""Launchers: local multi-process jobs and cluster templates (SLURM, TPU VM, Kubernetes)."""
