"""Run summaries: train one config in a workdir, record `result.json`, collect `results.jsonl`.

A run is finished when its `result.json` exists. The summary (one row of results.jsonl, the
format `pretrain.study.fit` reads) is built from the run's own files, `config.json` and
`metrics.jsonl`, so it is the same whether the run trained in this process, in a subprocess, on
a cluster, or was resumed after a preemption. The sweep runner and the experiment scripts both
record runs through `train_and_record`.
"""

import functools
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from pretrain.errors import ConfigError, NonFiniteError
from pretrain.jsonable import jsonable

RESULT = 'result.json'


@functools.cache
def code_version() -> str:
    """The project's git commit, with '+modified' when tracked code differs from it; 'unknown'
    outside a git checkout. Recorded per run because equal configs trained on different code
    agree only up to floating-point chaos (see `pretrain.study.reuse`)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    git = ['git', '-C', root]
    try:
        head = subprocess.run(git + ['rev-parse', 'HEAD'], capture_output=True, text=True, timeout=30)
        # Only the code: a sweep writing its results into docs/ does not change what trains.
        changed = subprocess.run(git + ['status', '--porcelain', '--untracked-files=no', '--',
                                        'pretrain', 'model_zoo', 'configs'],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 'unknown'
    if head.returncode or changed.returncode:
        return 'unknown'
    return head.stdout.strip() + ('+modified' if changed.stdout.strip() else '')


def is_done(run_path: str) -> bool:
    return os.path.exists(os.path.join(run_path, RESULT))


def write_json(path: str, obj: Any) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one (strict JSON)."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(jsonable(obj), f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def read_result(run_path: str) -> dict[str, Any]:
    """A finished run's summary, with the losses `jsonable` wrote as 'inf'/'nan' as floats."""
    return _floats(read_json(os.path.join(run_path, RESULT)))


def train_and_record(cfg: ml_collections.ConfigDict, run_path: str,
                     extra: Mapping[str, Any] | None = None,
                     parent: tuple[str, int] | None = None) -> dict[str, Any] | None:
    """Trains (or resumes) `cfg` in `run_path` and writes its summary to result.json.

    Returns the summary, or None when the run was preempted (it resumes from its checkpoint next
    time). A NaN/inf loss (train.nonfinite_policy='stop') is recorded as diverged with loss inf.
    `extra` is merged into the summary; `parent` = (parent run path, branch step) for a branched
    run, whose history up to the branch is the parent's.
    """
    from pretrain import train     # imported here: the trainer pulls in every model family
    start = time.time()
    diverged_at = None
    try:
        out = train.run(cfg, run_path)
    except NonFiniteError as e:
        diverged_at = e.step
    else:
        if out['preempted']:
            return None
    row = {**(extra or {}), **summarize(run_path, diverged_at, time.time() - start, parent)}
    write_json(os.path.join(run_path, RESULT), row)
    return row


def run_once(cfg: ml_collections.ConfigDict, run_path: str, *,
             keep_checkpoints: bool = False) -> dict[str, Any]:
    """An experiment's run: the saved summary if `run_path` finished, else trained now.

    An unfinished run resumes from its latest checkpoint; checkpoints are deleted after the run
    unless `keep_checkpoints` (a run that others branch from keeps them).
    """
    if is_done(run_path):
        row = read_result(run_path)
        if 'final_loss' in row:
            return row
        shutil.rmtree(run_path)    # a summary of an older format: train it again
    row = train_and_record(cfg, run_path)
    if row is None:   # the exit code a scheduler requeues on; the next start resumes the run
        from pretrain.preemption import EXIT_PREEMPTED
        print(f'{run_path}: preempted; run the same command again to resume', flush=True)
        raise SystemExit(EXIT_PREEMPTED)
    if not keep_checkpoints:
        shutil.rmtree(os.path.join(run_path, 'checkpoints'), ignore_errors=True)
    loss = row['final_loss']
    status = (f'diverged at step {row["diverged_at"]}' if row['status'] == 'diverged' else
              f'train {row["final_train_loss"]:.4f} eval {loss:.4f}')
    print(f'{run_path}: {status}, {row["wall_s"]:.0f}s', flush=True)
    return row


def _history(run_path: str, parent: tuple[str, int] | None) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train records, eval records) by step; a resumed run re-logs steps: the later wins."""
    from pretrain.metrics import read_metrics
    records = [r for r in read_metrics(os.path.join(run_path, 'metrics.jsonl')) if 'step' in r]
    if parent is not None:     # the parent's history up to the branch is this run's too
        parent_path, branch_step = parent
        before = read_metrics(os.path.join(parent_path, 'metrics.jsonl'))
        records = [r for r in before if r.get('step', math.inf) <= branch_step] + records
    train_log: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for r in records:
        (evals if r.get('split') == 'eval' else train_log)[r['step']] = r
    return train_log, evals


def summarize(run_path: str, diverged_at: int | None, wall_s: float,
              parent: tuple[str, int] | None = None) -> dict[str, Any]:
    """The results.jsonl row of a finished run, from its config.json and metrics.jsonl.

    final_loss is the held-out loss at the last step when the run evaluated there, else the mean
    training loss of the last 4 logs (`final_loss_source` says which); inf when diverged.
    """
    from model_zoo import FAMILIES
    from pretrain import parametrization
    from pretrain import state as state_lib

    raw = read_json(os.path.join(run_path, 'config.json'))
    applied = raw.pop('scaling_applied', None)
    cfg = ml_collections.ConfigDict(raw)
    family = FAMILIES.get(cfg.model.family)
    model = state_lib.model_def(family.build, cfg, parametrization.from_config(cfg))
    steps, batch = cfg.train.steps, cfg.train.global_batch_size
    train_log, evals = _history(run_path, parent)
    curve = [[s, train_log[s]['loss'], train_log[s]['lr']] for s in sorted(train_log)
             if 'loss' in train_log[s] and 'lr' in train_log[s]]
    tail = [c[1] for c in curve[-4:]]
    final_train = sum(tail) / len(tail) if tail else math.inf
    final_eval = evals.get(steps, {})
    diverged = diverged_at is not None or not math.isfinite(final_eval.get('loss', 0.0))
    step_times = sorted(r['step_time_s'] for r in train_log.values() if 'step_time_s' in r)
    return {
        'status': 'diverged' if diverged else 'done', 'diverged_at': diverged_at,
        'final_loss': math.inf if diverged else final_eval.get('loss', final_train),
        'final_loss_source': 'eval' if 'loss' in final_eval else 'train (mean of the last 4 logs)',
        'final_train_loss': math.inf if diverged else final_train,
        'final_bits_per_byte': math.inf if diverged else final_eval.get('bits_per_byte'),
        'evals': [{'step': s, **{k: v for k, v in evals[s].items() if k not in ('step', 'split')}}
                  for s in sorted(evals)],
        'curve': curve,
        'params': state_lib.param_count(model, exclude_roles=('embedding', 'readout')),
        'params_total': state_lib.param_count(model),
        'tokens': float(steps * batch * family.tokens_per_example(cfg)),
        'flops': float(steps * batch * family.flops_per_example(cfg)),
        'steps': steps, 'lr': cfg.optim.lr, 'width': cfg.model.d_model, 'seed': cfg.seed,
        'batch_size': batch, 'scaling_applied': applied,
        'step_time_s': step_times[len(step_times) // 2] if step_times else math.nan,
        'wall_s': wall_s, 'code_version': code_version(), 'config': cfg.to_dict(),
    }


def collect(run_paths: Iterable[str], out_dir: str) -> int:
    """Rewrites OUT_DIR/results.jsonl from the finished runs' results; returns the row count."""
    rows = [read_result(p) for p in run_paths if is_done(p)]
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f'results.jsonl.{os.getpid()}.tmp')
    with open(tmp, 'w') as f:
        for row in rows:
            f.write(json.dumps(jsonable(row)) + '\n')
    os.replace(tmp, os.path.join(out_dir, 'results.jsonl'))
    return len(rows)


def load_results(sweep_dir: str) -> list[dict[str, Any]]:
    """Rows of DIR/results.jsonl with 'inf'/'nan' strings back as floats; `flops` filled as
    6 N D when missing, `curve` read from the run's `metrics` file when given instead."""
    path = os.path.join(sweep_dir, 'results.jsonl')
    if not os.path.isfile(path):
        raise ConfigError(f'--sweep_dir={sweep_dir!r}: no results.jsonl there (run the sweep '
                          'first, or point at the folder that holds it)')
    rows = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(_floats(json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ConfigError(f'{path}:{number}: not a JSON row ({e.msg})') from None
    if not rows:
        raise ConfigError(f'{path} is empty: no finished run to fit yet')
    for r in rows:
        if 'flops' not in r and 'params' in r and 'tokens' in r:
            r['flops'] = 6.0 * r['params'] * r['tokens']
        if 'curve' not in r and 'metrics' in r:
            r['curve'] = _curve_from_metrics(os.path.join(sweep_dir, r['metrics']))
    return rows


_NONFINITE = {'inf': math.inf, '-inf': -math.inf, 'nan': math.nan}
_NUMERIC_KEYS = ('final_loss', 'final_train_loss', 'final_bits_per_byte', 'loss')


def _floats(row: dict[str, Any]) -> dict[str, Any]:
    """The loss fields that `jsonable` wrote as strings, as floats again."""
    for k in _NUMERIC_KEYS:
        if isinstance(row.get(k), str) and row[k] in _NONFINITE:
            row[k] = _NONFINITE[row[k]]
    for e in row.get('evals') or []:
        _floats(e)
    return row


def _curve_from_metrics(path: str) -> list[list[float]]:
    from pretrain.metrics import read_metrics
    last: dict[int, list[float]] = {}
    for rec in read_metrics(path):
        if rec.get('split') == 'train' and 'loss' in rec and 'lr' in rec:
            last[rec['step']] = [rec['step'], rec['loss'], rec['lr']]   # resumed: later wins
    return [last[s] for s in sorted(last)]
