"""A JAX-first pretraining library: sharded trainer, schedules, checkpoints, metrics."""
