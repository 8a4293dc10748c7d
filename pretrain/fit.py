"""Scaling-law and schedule-law fits on a finished sweep: fits.json, fit_summary.md and PNGs.

    python -m pretrain.fit --sweep_dir=runs/sweep [--bootstrap=200]

reads `DIR/results.jsonl` (one row per run, as `python -m pretrain.sweep` writes it; the fields
are listed in `pretrain.study.fit`) and runs every fit the rows allow: the power law in compute,
Chinchilla approaches 2 and 3, the optimum LR per width (`pretrain.study.laws`) and the
LR-annealing law (`pretrain.study.annealing`), with bootstrap 95% intervals.
"""

import os
from collections.abc import Sequence

from absl import app, flags

from pretrain.study import fit

_SWEEP_DIR = flags.DEFINE_string('sweep_dir', None, 'Folder holding results.jsonl.', required=True)
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 200, 'Bootstrap resamples per fit (0: none).',
                                  lower_bound=0)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    fits = fit.run(_SWEEP_DIR.value, _BOOTSTRAP.value)
    print(f'wrote {os.path.join(_SWEEP_DIR.value, "fits.json")}, fit_summary.md and '
          f'{len(fits["files"])} plots')


if __name__ == '__main__':
    app.run(main)
