r"""Sweeps: declare the runs once, run them anywhere, re-run to resume, collect results.jsonl.

    python -m pretrain.sweep --sweep=configs/sweeps/tiny_lr.py --workdir=runs/sweep \
        [--dry_run] [--executor=local|slurm|tpu] [--parallel=N] [--shard=I/N] [--run=NAME]

A sweep file (configs/sweeps/*.py) defines `get_sweep()` returning a `Sweep`: a base config file,
points (dicts of dotted overrides, built with `product` and `zipped`), overrides shared by all
points, an optional `derive(point)` for values that follow from the point (e.g. d_ff from
d_model), optional cooldown budgets, and optional held-out points that fits must not see.

Each run gets a stable name made of its point's values (`d_model=64,lr=0.003`), so adding points
never renames a run, and a workdir `WORKDIR/runs/NAME`. A run is finished when its
`result.json` exists; re-running the same command skips those, resumes the others from their
latest checkpoint (the trainer does that by itself) and refuses a run whose overrides changed.
With `Cooldowns`, each point becomes one constant-LR run ('parent') of the longest budget plus
one WSD cooldown per budget branched from its checkpoints (`schedule.branch_from`).

Executors: `local` runs the runs here, each in a subprocess (`--parallel=N` at once; 0 = in
this process, one at a time); `slurm` writes job arrays and a submit script; `tpu` writes a
launch script that gives each TPU VM a shard (`--shard=I/N`) of the runs. Every invocation
rewrites `WORKDIR/results.jsonl` (one row per finished run, the format `pretrain.fit` reads).
"""

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging as absl_logging

from pretrain import config as config_lib
from pretrain import fit
from pretrain.errors import ConfigError, NonFiniteError

Point = dict[str, Any]
RESULT = 'result.json'
SPEC = 'sweep_run.json'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Declaring a sweep ------------------------------------------------------------------------

def product(*factors: Mapping[str, Sequence[Any]] | Sequence[Point]) -> list[Point]:
    """Cartesian product. A factor is {key: [values]} (a grid over its keys) or a list of points."""
    lists = []
    for f in factors:
        if isinstance(f, Mapping):
            keys = list(f)
            lists.append([dict(zip(keys, vals)) for vals in itertools.product(*f.values())])
        else:
            lists.append([dict(p) for p in f])
    return [{k: v for p in combo for k, v in p.items()} for combo in itertools.product(*lists)]


def zipped(values: Mapping[str, Sequence[Any]]) -> list[Point]:
    """Keys varied together: {'a': [1, 2], 'b': [3, 4]} -> [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]."""
    lengths = {k: len(v) for k, v in values.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f'zipped: all value lists must have the same length, got {lengths}')
    return [dict(zip(values, vals)) for vals in zip(*values.values())]


@dataclasses.dataclass(frozen=True)
class Cooldowns:
    """Per point: a constant-LR run of max(budgets) steps and a cooldown branched per budget."""

    budgets: Sequence[int]
    fraction: float = 0.2            # of each budget spent decaying
    shape: str = '1-sqrt'            # schedule.decay_shape of the cooldown


@dataclasses.dataclass(frozen=True)
class Sweep:
    base: str                                    # config file, relative to the repository root
    points: Sequence[Point] = ({},)
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    derive: Callable[[Point], Point] | None = None
    cooldowns: Cooldowns | None = None
    heldout: Sequence[Point] = ()                # run like the others, excluded from fits


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    point: Point                    # the values that name it
    overrides: Point                # everything set on top of the base config
    kind: str = 'run'               # 'run' (a full schedule) | 'parent' (constant LR) | 'cooldown'
    parent: str | None = None       # the run a cooldown branches from, and where
    branch_step: int = 0
    heldout: bool = False

    def spec(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, 'g')
    return re.sub(r'[^A-Za-z0-9.+-]', '-', str(value))


def point_name(point: Point) -> str:
    """`d_model=64,lr=0.003`: the last part of each key, or the whole key where that is ambiguous."""
    if not point:
        return 'base'
    leaves = [k.rsplit('.', 1)[-1] for k in point]
    return ','.join(f'{leaf if leaves.count(leaf) == 1 else key}={_fmt(v)}'
                    for key, leaf, v in zip(point, leaves, point.values()))


def expand(sweep: Sweep) -> list[Run]:
    """The runs of a sweep, parents before their cooldowns; names are unique and stable."""
    runs: list[Run] = []
    for point, heldout in [(p, False) for p in sweep.points] + [(p, True) for p in sweep.heldout]:
        point = dict(point)
        overrides = {**sweep.fixed, **point, **(sweep.derive(point) if sweep.derive else {})}
        name = point_name(point)
        if sweep.cooldowns is None:
            runs.append(Run(name, point, overrides, heldout=heldout))
            continue
        cd = sweep.cooldowns
        budgets = sorted(set(int(b) for b in cd.budgets))
        if not budgets or budgets[0] < 2 or not 0 < cd.fraction < 1:
            raise ConfigError(f'Cooldowns(budgets={list(cd.budgets)}, fraction={cd.fraction}): '
                              'budgets must be integers >= 2 and fraction in (0, 1)')
        decay = {b: max(1, round(cd.fraction * b)) for b in budgets}
        branch = {b: b - decay[b] for b in budgets}
        every = math.gcd(*branch.values())
        parent = f'{name}.constant'
        runs.append(Run(parent, point, {
            **overrides, 'train.steps': budgets[-1], 'schedule.kind': 'constant',
            # Checkpoints at every branch step, kept for the cooldowns (also ones added later).
            'checkpoint.every_steps': every, 'checkpoint.keep_every': every},
            kind='parent', heldout=heldout))
        for b in budgets:
            runs.append(Run(f'{name}.cooldown{b}', point, {
                **overrides, 'train.steps': b, 'schedule.kind': 'wsd', 'schedule.total_steps': b,
                'schedule.decay_steps': decay[b], 'schedule.decay_shape': cd.shape},
                kind='cooldown', parent=parent, branch_step=branch[b], heldout=heldout))
    seen: dict[str, Point] = {}
    for r in runs:
        if r.name in seen:
            raise ConfigError(f'two points of the sweep get the same run name {r.name!r}: {seen[r.name]} '
                              f'and {r.point}; make their values differ in the name')
        seen[r.name] = r.point
    return runs


def load_sweep(path: str) -> Sweep:
    """Imports a sweep file and calls its get_sweep()."""
    if not os.path.isfile(path):
        raise ConfigError(f'--sweep={path!r}: no such file')
    module = _import(path, 'sweep_definition')
    if not hasattr(module, 'get_sweep'):
        raise ConfigError(f'--sweep={path!r} must define get_sweep() returning pretrain.sweep.Sweep')
    sweep = module.get_sweep()
    if not isinstance(sweep, Sweep):
        raise ConfigError(f'{path}: get_sweep() returned {type(sweep).__name__}, expected Sweep')
    return sweep


def _import(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_config(sweep: Sweep, run: Run, workdir: str):
    """The run's locked config; a cooldown's branch_from points at its parent's workdir."""
    base = sweep.base if os.path.isabs(sweep.base) else os.path.join(ROOT, sweep.base)
    if not os.path.isfile(base):
        raise ConfigError(f'Sweep.base={sweep.base!r}: no such config file')
    overrides = dict(run.overrides)
    if run.parent:
        overrides['schedule.branch_from'] = f'{run_dir(workdir, run.parent)}@{run.branch_step}'
    try:
        return config_lib.with_overrides(_import(base, 'sweep_base_config').get_config(), overrides)
    except (AttributeError, KeyError) as e:
        raise ConfigError(f'run {run.name!r}: an override names no config key ({e}); '
                          f'overrides: {sorted(overrides)}') from None


def check(sweep: Sweep, runs: Sequence[Run], workdir: str, num_devices: int) -> None:
    """Every run's config is valid and no existing run changed: before anything trains."""
    from model_zoo import FAMILIES

    for r in runs:
        cfg = config_lib.finalize(run_config(sweep, r, workdir))
        try:
            config_lib.validate(cfg, FAMILIES.get(cfg.model.family), num_devices=num_devices)
        except ConfigError as e:
            raise ConfigError(f'run {r.name!r}: {e}') from None
        path = os.path.join(run_dir(workdir, r.name), SPEC)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old['overrides'] != r.spec()['overrides']:
                raise ConfigError(
                    f'run {r.name!r} in {workdir} was started with other overrides: {old["overrides"]} '
                    f'(now {r.spec()["overrides"]}). Use a new --workdir, or delete that run')


# --- Running one run --------------------------------------------------------------------------

def run_dir(workdir: str, name: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'runs', name)


def is_done(workdir: str, name: str) -> bool:
    return os.path.exists(os.path.join(run_dir(workdir, name), RESULT))


def run_one(sweep: Sweep, run: Run, workdir: str) -> str:
    """Trains (or resumes) one run in this process; returns 'done', 'skipped' or 'preempted'."""
    from pretrain import train
    if is_done(workdir, run.name):
        return 'skipped'
    if run.parent and not is_done(workdir, run.parent):
        raise ConfigError(f'run {run.name!r} branches from {run.parent!r}, which has not finished')
    path = run_dir(workdir, run.name)
    os.makedirs(path, exist_ok=True)
    _write_json(os.path.join(path, SPEC), run.spec())
    start = time.time()
    diverged = None
    try:
        out = train.run(run_config(sweep, run, workdir), path)
    except NonFiniteError as e:
        diverged = e.step
    else:
        if out['preempted']:
            return 'preempted'
    _write_json(os.path.join(path, RESULT), summarize(run, workdir, diverged, time.time() - start))
    return 'done'


def summarize(run: Run, workdir: str, diverged_at: int | None, wall_s: float) -> dict[str, Any]:
    """The results.jsonl row of a finished run, from its config.json and metrics.jsonl."""
    import ml_collections
    from model_zoo import FAMILIES
    from pretrain import parametrization
    from pretrain import state as state_lib
    from pretrain.metrics import read_metrics

    path = run_dir(workdir, run.name)
    with open(os.path.join(path, 'config.json')) as f:
        raw = json.load(f)
    applied = raw.pop('scaling_applied', None)
    cfg = ml_collections.ConfigDict(raw)
    family = FAMILIES.get(cfg.model.family)
    md = state_lib.model_def(family.build, cfg, parametrization.from_config(cfg))
    steps, batch = cfg.train.steps, cfg.train.global_batch_size
    records = [r for r in read_metrics(os.path.join(path, 'metrics.jsonl')) if 'step' in r]
    if run.parent:   # the parent's history up to the branch is this run's too
        parent = read_metrics(os.path.join(run_dir(workdir, run.parent), 'metrics.jsonl'))
        records = [r for r in parent if r.get('step', math.inf) <= run.branch_step] + records
    train_log: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for r in records:   # a resumed run logs steps after its checkpoint again: the later wins
        (evals if r.get('split') == 'eval' else train_log)[r['step']] = r
    curve = [[s, train_log[s]['loss'], train_log[s]['lr']] for s in sorted(train_log)
             if 'loss' in train_log[s] and 'lr' in train_log[s]]
    tail = [c[1] for c in curve[-4:]]
    final_train = sum(tail) / len(tail) if tail else math.inf
    final_eval = evals.get(steps, {}).get('loss')
    diverged = diverged_at is not None
    return {
        'name': run.name, 'kind': run.kind, 'heldout': run.heldout, 'point': run.point,
        'parent': run.parent, 'branch_step': run.branch_step if run.parent else None,
        'status': 'diverged' if diverged else 'done', 'diverged_at': diverged_at,
        'final_loss': math.inf if diverged else (final_eval if final_eval is not None else final_train),
        'final_loss_source': 'eval' if final_eval is not None else 'train (mean of the last 4 logs)',
        'final_train_loss': math.inf if diverged else final_train,
        'evals': [{'step': s, **{k: v for k, v in evals[s].items() if k not in ('step', 'split')}}
                  for s in sorted(evals)],
        'curve': curve,
        'params': state_lib.param_count(md, exclude_roles=('embedding', 'readout')),
        'params_total': state_lib.param_count(md),
        'tokens': float(steps * batch * family.tokens_per_example(cfg)),
        'flops': float(steps * batch * family.flops_per_example(cfg)),
        'steps': steps, 'lr': cfg.optim.lr, 'width': cfg.model.d_model, 'seed': cfg.seed,
        'batch_size': batch, 'scaling_applied': applied, 'overrides': run.spec()['overrides'],
        'wall_s': wall_s, 'config': cfg.to_dict(),
    }


def _write_json(path: str, obj: Any) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1, default=str)   # inf -> Infinity: Python's json reads it back
    os.replace(tmp, path)


def collect(runs: Sequence[Run], workdir: str) -> int:
    """Rewrites WORKDIR/results.jsonl from the finished runs' results; returns the row count."""
    rows = []
    for r in runs:
        path = os.path.join(run_dir(workdir, r.name), RESULT)
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, f'results.jsonl.{os.getpid()}.tmp')
    with open(tmp, 'w') as f:
        for row in rows:
            f.write(json.dumps(fit._jsonable(row)) + '\n')   # inf -> 'inf': strict JSON
    os.replace(tmp, os.path.join(workdir, 'results.jsonl'))
    return len(rows)


# --- Executors --------------------------------------------------------------------------------

def shard(runs: Sequence[Run], index: int, count: int) -> list[Run]:
    """Shard `index` of `count`: whole families (a parent with its cooldowns) round robin."""
    families = list(dict.fromkeys(r.parent or r.name for r in runs))
    mine = set(families[index::count])
    return [r for r in runs if (r.parent or r.name) in mine]


def _command(sweep_path: str, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, '-m', 'pretrain.sweep', f'--sweep={os.path.abspath(sweep_path)}',
            f'--workdir={os.path.abspath(workdir)}', *extra]


def run_local(sweep: Sweep, runs: Sequence[Run], workdir: str, sweep_path: str,
              parallel: int, say: Callable[[str], None] = print) -> dict[str, str]:
    """Runs what is unfinished, parents before their cooldowns; returns {name: outcome}."""
    outcome = {r.name: 'skipped' for r in runs if is_done(workdir, r.name)}
    todo = [r for r in runs if r.name not in outcome]
    if parallel == 0:   # in this process: no start-up cost, one compilation cache
        for r in todo:
            if any(o == 'preempted' for o in outcome.values()):
                outcome[r.name] = 'not started: the sweep was preempted'
                continue
            if r.parent and outcome.get(r.parent) not in ('done', 'skipped'):
                outcome[r.name] = f'not started: {r.parent} did not finish'
                continue
            say(f'[sweep] {r.name}: starting')
            outcome[r.name] = run_one(sweep, r, workdir)
            say(f'[sweep] {r.name}: {outcome[r.name]}')
            collect(runs, workdir)
        return outcome
    running: dict[str, subprocess.Popen] = {}
    try:
        while todo or running:
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    outcome[name] = {0: 'done', 75: 'preempted'}.get(
                        proc.returncode, f'failed (exit code {proc.returncode}; see '
                                         f'{os.path.join(run_dir(workdir, name), "log.txt")})')
                    say(f'[sweep] {name}: {outcome[name]}')
                    collect(runs, workdir)
            if todo and any(o == 'preempted' for o in outcome.values()):
                for r in todo:     # start nothing more; the ones still running stop by themselves
                    outcome[r.name] = 'not started: the sweep was preempted'
                todo = []
            for r in list(todo):
                if r.parent and r.parent in outcome and outcome[r.parent] not in ('done', 'skipped'):
                    todo.remove(r)
                    outcome[r.name] = f'not started: {r.parent} did not finish'
                elif len(running) < parallel and (not r.parent or r.parent in outcome):
                    todo.remove(r)
                    path = run_dir(workdir, r.name)
                    os.makedirs(path, exist_ok=True)
                    with open(os.path.join(path, 'log.txt'), 'ab') as log:
                        running[r.name] = subprocess.Popen(
                            _command(sweep_path, workdir, f'--run={r.name}'), cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
                    say(f'[sweep] {r.name}: started (pid {running[r.name].pid})')
            time.sleep(0.2)
    except BaseException:
        for proc in running.values():   # SIGTERM: each run saves a checkpoint and exits 75
            os.killpg(proc.pid, 15)
        for proc in running.values():
            proc.wait()
        raise
    return outcome


def write_slurm(runs: Sequence[Run], workdir: str, sweep_path: str, max_parallel: int) -> list[str]:
    """Job arrays (parents and plain runs, then cooldowns after them) and submit.sh."""
    out = os.path.join(workdir, 'slurm')
    os.makedirs(out, exist_ok=True)
    stages = [[r for r in runs if not r.parent], [r for r in runs if r.parent]]
    files = []
    for i, stage in enumerate(stages):
        if not stage:
            continue
        lists = os.path.join(out, f'stage{i}.txt')
        with open(lists, 'w') as f:
            f.write(''.join(r.name + '\n' for r in stage))
        command = ' '.join(shlex.quote(a) for a in _command(sweep_path, workdir)) + ' --run="$NAME"'
        script = os.path.join(out, f'stage{i}.sbatch')
        with open(script, 'w') as f:
            f.write(f"""#!/usr/bin/env bash
# Stage {i} of the sweep: one array task per run listed in {lists}.
#SBATCH --job-name=sweep-{i}
#SBATCH --array=0-{len(stage) - 1}%{max_parallel}
#SBATCH --output={out}/%A_%a.out
#SBATCH --signal=TERM@120             # the run saves a checkpoint and exits 75
#SBATCH --requeue
#SBATCH --time=24:00:00               # EDIT
#SBATCH --gpus-per-task=1             # EDIT (delete on CPU-only clusters)
set -uo pipefail
cd {shlex.quote(ROOT)}
NAME=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(lists)})
{command}
rc=$?
if [ $rc -eq 75 ]; then   # preempted: requeue this task; it resumes from its checkpoint
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit $rc
""")
        files.append(script)
    submit = os.path.join(out, 'submit.sh')
    lines = ['#!/usr/bin/env bash', '# Submits the sweep; cooldowns start after every parent finished.',
             'set -euo pipefail', f'cd {shlex.quote(out)}']
    if len(files) == 2:
        lines += ['first=$(sbatch --parsable stage0.sbatch)',
                  'sbatch --dependency=afterok:"$first" stage1.sbatch']
    else:
        lines += [f'sbatch {os.path.basename(f)}' for f in files]
    with open(submit, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return files + [submit]


def write_tpu(workdir: str, sweep_path: str, workers: Sequence[str], zone: str) -> list[str]:
    """launch.sh: each TPU VM runs one shard of the sweep (whole cooldown families per shard);
    every VM expands the sweep itself, so the shards are a pure function of the sweep file."""
    out = os.path.join(workdir, 'tpu')
    os.makedirs(out, exist_ok=True)
    script = os.path.join(out, 'launch.sh')
    lines = ['#!/usr/bin/env bash',
             '# One shard of the sweep per TPU VM. The code must be checked out at the same path on',
             '# each VM and --workdir must be storage they all see (a bucket mount or NFS).',
             'set -euo pipefail', f'ZONE={shlex.quote(zone)}   # EDIT', 'pids=()']
    for i, vm in enumerate(workers):
        remote = (f'cd {shlex.quote(ROOT)} && '
                  + ' '.join(shlex.quote(a) for a in _command(sweep_path, workdir))
                  + f' --shard={i}/{len(workers)} --parallel=1')
        lines.append(f'gcloud compute tpus tpu-vm ssh {shlex.quote(vm)} --zone="$ZONE" --worker=all '
                     f'--command={shlex.quote(remote)} > {shlex.quote(os.path.join(out, vm + ".log"))} '
                     '2>&1 & pids+=($!)')
    lines += ['rc=0', 'for p in "${pids[@]}"; do wait "$p" || rc=$?; done',
              'exit $rc   # re-run this script to resume: finished runs are skipped']
    with open(script, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return [script]


# --- Command line -----------------------------------------------------------------------------

def _parse(argv: Sequence[str]):
    import argparse
    p = argparse.ArgumentParser(prog='python -m pretrain.sweep', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sweep', required=True, help='sweep file (configs/sweeps/*.py)')
    p.add_argument('--workdir', required=True, help='sweep directory: runs/NAME, results.jsonl')
    p.add_argument('--dry_run', action='store_true', help='list the runs and their state')
    p.add_argument('--executor', choices=('local', 'slurm', 'tpu'), default='local',
                   help='local: run here; slurm, tpu: write the job files')
    p.add_argument('--parallel', type=int, default=1,
                   help='local: runs at once, each in a subprocess; 0 = in this process, in turn')
    p.add_argument('--shard', default='', help='I/N: only the I-th of N shards (whole families)')
    p.add_argument('--run', default='', help='train only this run, in this process')
    p.add_argument('--slurm_max_parallel', type=int, default=8, help='slurm: array tasks at once')
    p.add_argument('--tpu_workers', default='', help='tpu: comma-separated TPU VM names')
    p.add_argument('--tpu_zone', default='us-central2-b', help='tpu: zone of the TPU VMs')
    args = p.parse_args(argv)
    if args.parallel < 0:
        p.error(f'--parallel={args.parallel} must be >= 0')
    return args


def _shard(runs: list[Run], text: str) -> list[Run]:
    if not text:
        return runs
    m = re.fullmatch(r'(\d+)/(\d+)', text)
    if not m or not int(m[1]) < int(m[2]):
        raise ConfigError(f'--shard={text!r} must be I/N with 0 <= I < N, e.g. 0/4')
    return shard(runs, int(m[1]), int(m[2]))


def _select(args) -> tuple[Sweep, list[Run], list[Run]]:
    """(sweep, all runs, the runs this invocation handles), checked before anything trains."""
    import jax
    sweep = load_sweep(args.sweep)
    every = expand(sweep)
    runs = _shard(every, args.shard)
    if args.run:
        runs = [r for r in every if r.name == args.run]
        if not runs:
            raise ConfigError(f'--run={args.run!r} is not in the sweep; its runs: '
                              + ', '.join(r.name for r in every))
    check(sweep, runs, args.workdir, num_devices=jax.device_count())
    return sweep, every, runs


def _list(sweep: Sweep, runs: Sequence[Run], workdir: str) -> None:
    print(f'base {sweep.base}; every run sets {json.dumps(dict(sweep.fixed), default=str)}')
    for r in runs:
        state = 'finished' if is_done(workdir, r.name) else (
            'started' if os.path.isdir(run_dir(workdir, r.name)) else 'new')
        extra = f' <- {r.parent}@{r.branch_step}' if r.parent else ''
        print(f'{state:8s} {r.kind:8s} {r.name}{extra}{"  [held out]" if r.heldout else ""}')
        own = {k: v for k, v in r.overrides.items() if sweep.fixed.get(k, object()) != v}
        print(f'         {json.dumps(own, default=str)}')
    print(f'{len(runs)} runs, {sum(is_done(workdir, r.name) for r in runs)} finished')


def main(argv: Sequence[str] | None = None) -> int:
    import jax
    args = _parse(sys.argv[1:] if argv is None else argv)
    workdir = args.workdir
    # Runs of one shape share their compilation, also across processes and workers.
    jax.config.update('jax_compilation_cache_dir', os.path.join(os.path.abspath(workdir), '.jax_cache'))
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        sweep, every, runs = _select(args)
        if args.dry_run:
            _list(sweep, runs, workdir)
            return 0
        if args.run:
            outcome = run_one(sweep, runs[0], workdir)
            collect(every, workdir)
            print(f'[sweep] {runs[0].name}: {outcome}', flush=True)
            return 75 if outcome == 'preempted' else 0
        todo = [r for r in runs if not is_done(workdir, r.name)]
        if args.executor == 'slurm':
            files = write_slurm(todo, workdir, args.sweep, args.slurm_max_parallel)
            print('wrote ' + ', '.join(files) + f'\nsubmit with: bash {files[-1]}')
            return 0
        if args.executor == 'tpu':
            workers = [w for w in args.tpu_workers.split(',') if w]
            if not workers:
                raise ConfigError('--executor=tpu needs --tpu_workers=VM1,VM2,...')
            files = write_tpu(workdir, args.sweep, workers, args.tpu_zone)
            print(f'wrote {files[0]}; start it with: bash {files[0]}')
            return 0
        outcome = run_local(sweep, runs, workdir, args.sweep, args.parallel)
    except ConfigError as e:
        print(f'config error: {e}', file=sys.stderr)
        return 2
    rows = collect(every, workdir)
    failed = {n: o for n, o in outcome.items() if o not in ('done', 'skipped')}
    print(f'[sweep] {sum(o == "done" for o in outcome.values())} trained, '
          f'{sum(o == "skipped" for o in outcome.values())} already finished, {len(failed)} not '
          f'finished; {rows} rows in {os.path.join(workdir, "results.jsonl")}')
    for name, o in failed.items():
        print(f'[sweep]   {name}: {o}')
    if any(o == 'preempted' for o in failed.values()):
        return 75
    return 1 if failed else 0


if __name__ == '__main__':
    # Through the imported module: sweep files build pretrain.sweep.Sweep, not __main__.Sweep.
    from pretrain import sweep as _module
    sys.exit(_module.main())
