"""Where a sweep's runs train: here (in this process or one subprocess each), or job files.

`local` runs what is unfinished, parents before their cooldowns; `slurm` writes run lists and a
submit script that fills the array template `launch/sweep_array.sbatch`; `tpu` writes a script
that starts `launch/tpu_vm.sh` once per TPU VM, each with one shard of the sweep. The cluster
script text lives only in `launch/`.
"""

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from pretrain.errors import ConfigError
from pretrain.preemption import EXIT_PREEMPTED
from pretrain.study import results
from pretrain.study.sweep import ROOT, SPEC, Run, Sweep, run_config, run_dir

SLURM_TEMPLATE = os.path.join('launch', 'sweep_array.sbatch')
TPU_LAUNCHER = os.path.join('launch', 'tpu_vm.sh')
NOT_STARTED_PREEMPTED = 'not started: the sweep was preempted'


def is_done(workdir: str, name: str) -> bool:
    return results.is_done(run_dir(workdir, name))


def collect(runs: Sequence[Run], workdir: str) -> int:
    """Rewrites WORKDIR/results.jsonl from the finished runs; returns the row count."""
    return results.collect([run_dir(workdir, r.name) for r in runs], workdir)


def run_one(sweep: Sweep, run: Run, workdir: str) -> str:
    """Trains (or resumes) one run in this process; returns 'done', 'skipped' or 'preempted'."""
    if is_done(workdir, run.name):
        return 'skipped'
    if run.parent and not is_done(workdir, run.parent):
        raise ConfigError(f'run {run.name!r} branches from {run.parent!r}, which has not finished')
    path = run_dir(workdir, run.name)
    os.makedirs(path, exist_ok=True)
    spec = run.spec()
    results.write_json(os.path.join(path, SPEC), spec)
    extra = {'name': run.name, 'kind': run.kind, 'heldout': run.heldout, 'point': run.point,
             'parent': run.parent, 'branch_step': run.branch_step if run.parent else None,
             'overrides': spec['overrides']}
    parent = (run_dir(workdir, run.parent), run.branch_step) if run.parent else None
    row = results.train_and_record(run_config(sweep, run, workdir), path, extra, parent)
    return 'preempted' if row is None else 'done'


def sweep_command(sweep_path: str, workdir: str, *extra: str) -> list[str]:
    """`python -m pretrain.sweep` with this sweep and workdir (absolute) and `extra` flags."""
    return [sys.executable, '-m', 'pretrain.sweep', f'--sweep={os.path.abspath(sweep_path)}',
            f'--workdir={os.path.abspath(workdir)}', *extra]


def run_local(sweep: Sweep, runs: Sequence[Run], workdir: str, sweep_path: str,
              parallel: int, say: Callable[[str], None] = print,
              every: Sequence[Run] = ()) -> dict[str, str]:
    """Runs what is unfinished, parents before their cooldowns; returns {name: outcome}.

    After each run results.jsonl is rewritten from `every` (the whole sweep, when `runs` is a
    part of it: --only, --shard), so that it never drops the rows of the runs not selected.

    parallel=0: in this process, one run at a time (no start-up cost, one compilation cache);
    else up to `parallel` subprocesses at once, each `python -m pretrain.sweep --run=NAME`.
    A preempted run stops the sweep: nothing more starts, the rest is reported as not started.
    """
    outcome = {r.name: 'skipped' for r in runs if is_done(workdir, r.name)}
    todo = [r for r in runs if r.name not in outcome]
    every = every or runs
    if parallel == 0:
        for r in todo:
            if any(o == 'preempted' for o in outcome.values()):
                outcome[r.name] = NOT_STARTED_PREEMPTED
                continue
            if r.parent and outcome.get(r.parent) not in ('done', 'skipped'):
                outcome[r.name] = f'not started: {r.parent} did not finish'
                continue
            say(f'[sweep] {r.name}: starting')
            outcome[r.name] = run_one(sweep, r, workdir)
            say(f'[sweep] {r.name}: {outcome[r.name]}')
            collect(every, workdir)
        return outcome
    return _run_subprocesses(every, todo, outcome, workdir, sweep_path, parallel, say)


def _run_subprocesses(every: Sequence[Run], todo: list[Run], outcome: dict[str, str],
                      workdir: str, sweep_path: str, parallel: int,
                      say: Callable[[str], None]) -> dict[str, str]:
    running: dict[str, subprocess.Popen] = {}
    try:
        while todo or running:
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    outcome[name] = _outcome(proc.returncode, workdir, name)
                    say(f'[sweep] {name}: {outcome[name]}')
                    collect(every, workdir)
            if todo and any(o == 'preempted' for o in outcome.values()):
                for r in todo:     # start nothing more; the ones still running stop by themselves
                    outcome[r.name] = NOT_STARTED_PREEMPTED
                todo = []
            for r in list(todo):
                if r.parent and r.parent in outcome and outcome[r.parent] not in ('done', 'skipped'):
                    todo.remove(r)
                    outcome[r.name] = f'not started: {r.parent} did not finish'
                elif len(running) < parallel and (not r.parent or r.parent in outcome):
                    todo.remove(r)
                    running[r.name] = _start(r, workdir, sweep_path)
                    say(f'[sweep] {r.name}: started (pid {running[r.name].pid})')
            time.sleep(0.2)
    except BaseException:
        for proc in running.values():   # SIGTERM: each run saves a checkpoint and exits
            os.killpg(proc.pid, 15)
        for proc in running.values():
            proc.wait()
        raise
    return outcome


def _start(run: Run, workdir: str, sweep_path: str) -> subprocess.Popen:
    path = run_dir(workdir, run.name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'log.txt'), 'ab') as log:
        return subprocess.Popen(sweep_command(sweep_path, workdir, f'--run={run.name}'), cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _outcome(code: int, workdir: str, name: str) -> str:
    if code == 0:
        return 'done'
    if code == EXIT_PREEMPTED:
        return 'preempted'
    return f'failed (exit code {code}; see {os.path.join(run_dir(workdir, name), "log.txt")})'


def _repo_path(path: str) -> str:
    """`path` relative to the repository root when inside it (the hosts check out the code)."""
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full.startswith(ROOT + os.sep) else full


def write_slurm(runs: Sequence[Run], workdir: str, sweep_path: str, max_parallel: int) -> list[str]:
    """Run lists (parents and plain runs, then the cooldowns) and submit.sh, which submits
    `launch/sweep_array.sbatch` once per list, the cooldowns after every parent finished."""
    out = os.path.join(os.path.abspath(workdir), 'slurm')
    os.makedirs(out, exist_ok=True)
    stages = [[r for r in runs if not r.parent], [r for r in runs if r.parent]]
    args = ' '.join(shlex.quote(a) for a in (f'--sweep={_repo_path(sweep_path)}',
                                             f'--workdir={os.path.abspath(workdir)}'))
    lines = ['#!/usr/bin/env bash',
             f'# Submits the sweep as SLURM arrays of {SLURM_TEMPLATE}; cooldowns start after '
             'every parent finished.', 'set -euo pipefail', f'cd {shlex.quote(ROOT)}']
    files, previous = [], None
    for i, stage in enumerate(stages):
        if not stage:
            continue
        run_list = os.path.join(out, f'stage{i}.txt')
        with open(run_list, 'w') as f:
            f.write(''.join(r.name + '\n' for r in stage))
        files.append(run_list)
        after = f' --dependency=afterok:"${previous}"' if previous else ''
        lines.append(f'stage{i}=$(sbatch --parsable{after} --job-name=sweep-{i} '
                     f'--array=0-{len(stage) - 1}%{max_parallel} '
                     f'--output={shlex.quote(out)}/%A_%a.out {SLURM_TEMPLATE} '
                     f'{shlex.quote(run_list)} {args})')
        lines.append(f'echo "stage {i}: job $stage{i}, {len(stage)} runs"')
        previous = f'stage{i}'
    submit = os.path.join(out, 'submit.sh')
    with open(submit, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return files + [submit]


def write_tpu(workdir: str, sweep_path: str, workers: Sequence[str], zone: str,
              only: str = '') -> list[str]:
    """launch.sh: `launch/tpu_vm.sh` on each TPU VM with one shard of the sweep (whole cooldown
    families per shard); every VM expands the sweep itself (narrowed by `only`, a --only
    pattern), so the shards are a pure function of the sweep file and the pattern. --workdir
    must be storage every VM sees."""
    out = os.path.join(os.path.abspath(workdir), 'tpu')
    os.makedirs(out, exist_ok=True)
    script = os.path.join(out, 'launch.sh')
    lines = ['#!/usr/bin/env bash', f'# One shard of the sweep per TPU VM, through {TPU_LAUNCHER}.',
             'set -euo pipefail', f'cd {shlex.quote(ROOT)}', f'ZONE={shlex.quote(zone)}   # EDIT',
             'pids=()']
    for i, vm in enumerate(workers):
        args = ' '.join(shlex.quote(a) for a in (
            f'--sweep={_repo_path(sweep_path)}', f'--workdir={os.path.abspath(workdir)}',
            f'--shard={i}/{len(workers)}', '--parallel=1', *([f'--only={only}'] if only else [])))
        log = shlex.quote(os.path.join(out, vm + '.log'))
        lines.append(f'MODULE=pretrain.sweep bash {TPU_LAUNCHER} {shlex.quote(vm)} "$ZONE" -- '
                     f'{args} > {log} 2>&1 & pids+=($!)')
    lines += ['rc=0', 'for p in "${pids[@]}"; do wait "$p" || rc=$?; done',
              'exit $rc   # re-run this script to resume: finished runs are skipped']
    with open(script, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return [script]
