"""Shared by the experiment scripts: the process setup and quiet per-run defaults.

Runs are trained and recorded by the study package (`pretrain.study.results.run_once`, or the
sweep runner for whole sweeps), so an experiment's runs have the same summaries as a sweep's.
"""

import os

import jax
import ml_collections
from absl import logging as absl_logging


def setup() -> None:
    """Persistent compilation cache (runs of one shape share their compile) and a quiet log."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    jax.config.update('jax_compilation_cache_dir', os.path.join(root, '.jax_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    absl_logging.set_verbosity(absl_logging.WARNING)   # one line per run from us, not per step


def quiet(c: ml_collections.ConfigDict, steps: int, eval_batches: int = 8) -> None:
    """Experiment defaults: no TensorBoard, one held-out eval at the end, a fixed MFU peak."""
    c.train.update(steps=steps, eval_every=steps, eval_batches=eval_batches)
    c.metrics.update(tensorboard=False, peak_flops_per_device=1e12)   # skips the matmul probe
    c.mesh.ici.update(data=1)


def changed_flags(holders) -> str:
    """' --name=value' for each absl flag that differs from its default: the command to rerun."""
    return ''.join(f' --{h.name}={h.value}' for h in holders if h.value != h.default)


def write_report(path: str, text: str) -> None:
    """Write a Markdown report, echo it, and say where it went."""
    with open(path, 'w') as handle:
        handle.write(text)
    print(text, end='')
    print(f'wrote {path}')
