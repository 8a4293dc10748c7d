r"""Sweeps: declare the runs once, run them anywhere, re-run to resume, collect results.jsonl.

    python -m pretrain.sweep --sweep=configs/sweeps/tiny_lr.py --workdir=runs/sweep \
        [--dry_run] [--executor=local|slurm|tpu] [--parallel=N] [--shard=I/N] [--run=NAME] \
        [--only=REGEX] [--reuse_from=OTHER_WORKDIR,...]

A sweep file (configs/sweeps/*.py) defines `get_sweep()` returning a
`pretrain.study.sweep.Sweep` (the sweep language is documented there). Each run gets a stable
name made of its point's values and a workdir `WORKDIR/runs/NAME`. A run is finished when its
`result.json` exists; re-running the same command skips those, resumes the others from their
latest checkpoint (the trainer does that by itself) and refuses a run whose overrides changed.

Executors (pretrain.study.executors): `local` runs the runs here, each in a subprocess
(`--parallel=N` at once; 0 = in this process, one at a time); `slurm` writes run lists and a
submit script for launch/sweep_array.sbatch; `tpu` writes a script that runs launch/tpu_vm.sh
with one shard (`--shard=I/N`) of the runs per TPU VM. Every invocation rewrites
`WORKDIR/results.jsonl` (one row per finished run, the format `pretrain.fit` reads).
`--only=REGEX` narrows any of these to the runs whose names match (with the parents of matched
cooldowns), e.g. to run the cheap or the decisive part of a sweep first; results.jsonl still
lists every finished run of the sweep. `--reuse_from` adopts finished runs of other sweeps whose
resolved config equals a run's (pretrain/study/reuse.py) instead of training them again.
"""

from collections.abc import Sequence

from absl import app, flags
from absl import logging as absl_logging

from pretrain import logs
from pretrain.study.runner import EXECUTORS, SweepOptions, run_sweep

_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep file (configs/sweeps/*.py).', required=True)
# The trainer, imported later in this process to train a run, defines --workdir and --dry_run
# too; allow_override lets it, after main() has read these values.
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory: runs/NAME, results.jsonl.',
                               required=True, allow_override=True)
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'List the runs and their state.',
                             allow_override=True)
_EXECUTOR = flags.DEFINE_enum('executor', 'local', EXECUTORS,
                              'local: run here; slurm, tpu: write the job files.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'local: runs at once, each in a subprocess; '
                                 '0 = in this process, in turn.', lower_bound=0)
_SHARD = flags.DEFINE_string('shard', '', 'I/N: only the I-th of N shards (whole families).')
_RUN = flags.DEFINE_string('run', '', 'Train only this run, in this process.')
_ONLY = flags.DEFINE_string('only', '', 'Only the runs whose names match this regular expression '
                            '(re.search), with the parents of matched cooldowns.')
_SLURM_MAX_PARALLEL = flags.DEFINE_integer('slurm_max_parallel', 8, 'slurm: array tasks at once.')
_TPU_WORKERS = flags.DEFINE_list('tpu_workers', [], 'tpu: comma-separated TPU VM names.')
_TPU_ZONE = flags.DEFINE_string('tpu_zone', 'us-central2-b', 'tpu: zone of the TPU VMs.')
_REUSE_FROM = flags.DEFINE_list('reuse_from', [], 'Other sweep workdirs: a finished run there '
                                'whose resolved config equals a run of this sweep is adopted '
                                'instead of trained (pretrain/study/reuse.py).')


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    absl_logging.set_verbosity(absl_logging.WARNING)
    logs.quiet_libraries()
    return run_sweep(SweepOptions(
        sweep=_SWEEP.value, workdir=_WORKDIR.value, dry_run=_DRY_RUN.value,
        executor=_EXECUTOR.value, parallel=_PARALLEL.value, shard=_SHARD.value, run=_RUN.value,
        only=_ONLY.value,
        slurm_max_parallel=_SLURM_MAX_PARALLEL.value, tpu_workers=tuple(_TPU_WORKERS.value),
        tpu_zone=_TPU_ZONE.value, reuse_from=tuple(_REUSE_FROM.value)))


if __name__ == '__main__':
    app.run(main)
