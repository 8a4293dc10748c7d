"""Shared by the experiment scripts: run one config with the real trainer, keep its result.

Each run lives in its own workdir; its summary goes to `<workdir>/result.json`, and a run whose
result exists is not trained again, so an interrupted script picks up where it stopped.
"""

import json
import math
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
from absl import logging as absl_logging

from pretrain import train
from pretrain.errors import NonFiniteError

RESULT = 'result.json'


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


def final_train_loss(history: list[dict[str, float]], last: int = 4) -> float:
    """Mean loss of the last `last` logged steps (a single step's loss is noisy)."""
    tail = [h['loss'] for h in history[-last:]]
    return sum(tail) / len(tail) if tail else math.inf


def run_one(config: ml_collections.ConfigDict, workdir: str, *,
            keep_checkpoints: bool = False) -> dict[str, Any]:
    """Trains `config` in `workdir` (or loads its saved result) and returns its summary.

    A NaN/inf loss (train.nonfinite_policy='stop') is recorded as diverged with loss inf. A
    workdir without a result is an interrupted run: it is started again from scratch, since a
    partial history would not be comparable.
    """
    path = os.path.join(workdir, RESULT)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if os.path.isdir(workdir):
        shutil.rmtree(workdir)
    start = time.perf_counter()
    diverged_at = None
    try:
        out = train.run(config, workdir)
        history, evals = out['history'], out['eval']
    except NonFiniteError as e:
        diverged_at = e.step
        history, evals = [], []
    wall = time.perf_counter() - start
    last_eval = evals[-1] if evals else {}
    diverged = diverged_at is not None or not math.isfinite(last_eval.get('loss', math.inf))
    result = {
        'steps': config.train.steps,
        'wall_s': wall,
        'diverged': diverged,
        'diverged_at': diverged_at,
        'train_loss': math.inf if diverged else final_train_loss(history),
        'eval_loss': math.inf if diverged else last_eval['loss'],
        'eval_bits_per_byte': math.inf if diverged else last_eval.get('bits_per_byte', math.inf),
        'evals': evals,
        'curve': [{'step': h['step'], 'loss': h['loss'], 'lr': h['lr']} for h in history],
        'step_time_s': _median([h['step_time_s'] for h in history if 'step_time_s' in h]),
    }
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f, default=str)   # inf -> Infinity: Python's json reads it back
    os.replace(path + '.tmp', path)
    if not keep_checkpoints:
        shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
    status = f'diverged at step {diverged_at}' if diverged else (
        f'train {result["train_loss"]:.4f} eval {result["eval_loss"]:.4f} '
        f'({result["eval_bits_per_byte"]:.3f} bpb)')
    print(f'{workdir}: {status}, {wall:.0f}s', flush=True)
    return result


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else math.nan


def jsonable(obj: Any) -> Any:
    """Non-finite floats as the strings 'inf'/'nan' (the metrics.jsonl convention): strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return 'nan' if math.isnan(obj) else ('inf' if obj > 0 else '-inf')
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
