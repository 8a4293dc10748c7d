"""The sweep command: pick the runs, check them all before compute, hand them to an executor.

`python -m pretrain.sweep` parses its flags into `SweepOptions` and calls `run_sweep`; the
experiment scripts call `run_sweep` directly. Exit codes: 0 all finished, 1 some failed or were
not started, 2 a config error (before anything trained), `EXIT_PREEMPTED` when preempted.
"""

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

from pretrain.errors import ConfigError
from pretrain.preemption import EXIT_PREEMPTED
from pretrain.study import executors, reuse
from pretrain.study import sweep as sweep_lib
from pretrain.study.sweep import Run, Sweep

EXECUTORS = ('local', 'slurm', 'tpu')


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    sweep: str                       # sweep file (configs/sweeps/*.py)
    workdir: str                     # sweep directory: runs/NAME, results.jsonl
    dry_run: bool = False            # list the runs and their state
    executor: str = 'local'          # local: run here; slurm, tpu: write the job files
    parallel: int = 1                # local: runs at once, each in a subprocess; 0 = in this process
    shard: str = ''                  # I/N: only the I-th of N shards (whole families)
    run: str = ''                    # train only this run, in this process
    only: str = ''                   # regex: only the runs whose names match (and their parents)
    slurm_max_parallel: int = 8
    tpu_workers: Sequence[str] = ()
    tpu_zone: str = 'us-central2-b'
    reuse_from: Sequence[str] = ()   # other sweep dirs whose equal finished runs are adopted


def parse_shard(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    m = re.fullmatch(r'(\d+)/(\d+)', text)
    if not m or not int(m[1]) < int(m[2]):
        raise ConfigError(f'--shard={text!r} must be I/N with 0 <= I < N, e.g. 0/4')
    return int(m[1]), int(m[2])


def select(options: SweepOptions, num_devices: int) -> tuple[Sweep, list[Run], list[Run]]:
    """(sweep, all runs, the runs this invocation handles), checked before anything trains."""
    if options.executor not in EXECUTORS:
        raise ConfigError(f'--executor={options.executor!r}; allowed: {", ".join(EXECUTORS)}')
    if options.parallel < 0:
        raise ConfigError(f'--parallel={options.parallel} must be >= 0')
    sweep = sweep_lib.load(options.sweep)
    every = sweep_lib.expand(sweep)
    runs = every
    shard = parse_shard(options.shard)
    if shard is not None:
        runs = sweep_lib.shard(every, *shard)
    if options.only:
        runs = sweep_lib.only(runs, options.only)
    if options.run:
        runs = [r for r in every if r.name == options.run]
        if not runs:
            raise ConfigError(f'--run={options.run!r} is not in the sweep; its runs: '
                              + ', '.join(r.name for r in every))
    sweep_lib.check(sweep, runs, options.workdir, num_devices=num_devices)
    return sweep, every, runs


def print_runs(sweep: Sweep, runs: Sequence[Run], workdir: str) -> None:
    """The dry run: each run's state, kind, lineage and own overrides."""
    print(f'base {sweep.base}; every run sets {json.dumps(dict(sweep.fixed), default=str)}')
    for r in runs:
        state = 'finished' if executors.is_done(workdir, r.name) else (
            'started' if os.path.isdir(sweep_lib.run_dir(workdir, r.name)) else 'new')
        extra = f' <- {r.parent}@{r.branch_step}' if r.parent else ''
        print(f'{state:8s} {r.kind:8s} {r.name}{extra}{"  [held out]" if r.heldout else ""}')
        own = {k: v for k, v in r.overrides.items() if sweep.fixed.get(k, object()) != v}
        print(f'         {json.dumps(own, default=str)}')
    print(f'{len(runs)} runs, {sum(executors.is_done(workdir, r.name) for r in runs)} finished')


def run_sweep(options: SweepOptions) -> int:
    """The whole command; returns its exit code (see the module docstring)."""
    import jax
    workdir = options.workdir
    # Runs of one shape share their compilation, also across processes and workers.
    jax.config.update('jax_compilation_cache_dir', os.path.join(os.path.abspath(workdir), '.jax_cache'))
    try:
        sweep, every, runs = select(options, num_devices=jax.device_count())
        if options.dry_run:
            print_runs(sweep, runs, workdir)
            return 0
        if options.run:
            outcome = executors.run_one(sweep, runs[0], workdir)
            executors.collect(every, workdir)
            print(f'[sweep] {runs[0].name}: {outcome}', flush=True)
            return EXIT_PREEMPTED if outcome == 'preempted' else 0
        if options.reuse_from:
            reuse.adopt(sweep, runs, workdir, options.reuse_from)
            executors.collect(every, workdir)
        todo = [r for r in runs if not executors.is_done(workdir, r.name)]
        if options.executor == 'slurm':
            files = executors.write_slurm(todo, workdir, options.sweep, options.slurm_max_parallel)
            print('wrote ' + ', '.join(files) + f'\nsubmit with: bash {files[-1]}')
            return 0
        if options.executor == 'tpu':
            if not options.tpu_workers:
                raise ConfigError('--executor=tpu needs --tpu_workers=VM1,VM2,...')
            files = executors.write_tpu(workdir, options.sweep, options.tpu_workers,
                                        options.tpu_zone, options.only)
            print(f'wrote {files[0]}; start it with: bash {files[0]}')
            return 0
        outcome = executors.run_local(sweep, runs, workdir, options.sweep, options.parallel,
                                      every=every)
    except ConfigError as e:
        print(f'config error: {e}', file=sys.stderr)
        return 2
    return report(outcome, executors.collect(every, workdir), workdir)


def report(outcome: dict[str, str], rows: int, workdir: str) -> int:
    """Prints what happened to each run; the exit code of the sweep."""
    failed = {n: o for n, o in outcome.items() if o not in ('done', 'skipped')}
    print(f'[sweep] {sum(o == "done" for o in outcome.values())} trained, '
          f'{sum(o == "skipped" for o in outcome.values())} already finished, {len(failed)} not '
          f'finished; {rows} rows in {os.path.join(workdir, "results.jsonl")}')
    for name, o in failed.items():
        print(f'[sweep]   {name}: {o}')
    if any(o == 'preempted' for o in failed.values()):
        return EXIT_PREEMPTED
    return 1 if failed else 0
