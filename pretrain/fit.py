"""Scaling-law and schedule-law fits on a finished sweep: fits.json, fit_summary.md and PNGs.

    python -m pretrain.fit --sweep_dir=runs/sweep [--bootstrap=200] [--out=DIR] [--overwrite]
    python -m pretrain.fit --sweep_dir=runs/mutransfer --transfer=width [--max_size=N]   # µTransfer verdicts

reads `DIR/results.jsonl` (one row per run, as `python -m pretrain.sweep` writes it; the fields
are listed in `pretrain.study.fit`) and runs every fit the rows allow: the power law in compute,
Chinchilla approaches 2 and 3, the optimum LR per width (`pretrain.study.laws`) and the
LR-annealing law (`pretrain.study.annealing`), with bootstrap 95% intervals. `--transfer=width`
(or `depth`) instead computes the µTransfer verdicts of an LR sweep with seeds
(`pretrain.study.transfer`): transfer.json, transfer.md, transfer.png.

Output goes to --out, by default the sweep directory when it is a sweep's own workdir (it has
runs/); a folder of committed results (results.jsonl without runs/, e.g. under docs/) is only
written over with --overwrite, so a re-fit cannot silently replace published numbers.
"""

import os
from collections.abc import Sequence

from absl import app, flags

from pretrain import logs
from pretrain.errors import ConfigError
from pretrain.study import fit, results, transfer

_SWEEP_DIR = flags.DEFINE_string('sweep_dir', None, 'Folder holding results.jsonl.', required=True)
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 200, 'Bootstrap resamples per fit (0: none).',
                                  lower_bound=0)
_OUT = flags.DEFINE_string('out', '', 'Folder for the outputs; default: the sweep directory when '
                           'it is a sweep workdir (has runs/).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Allow writing into a folder of committed '
                               'results (no runs/ in it).')
_TRANSFER = flags.DEFINE_enum('transfer', '', ['', 'width', 'depth'],
                              'Compute the µTransfer verdicts along this axis instead of the laws.')
_MAX_SIZE = flags.DEFINE_integer('max_size', 0, 'With --transfer: fit only the widths (depths) up '
                                 'to this one, e.g. to compare with a sweep that stopped there '
                                 '(0: all).', lower_bound=0)


def _out_dir(sweep_dir: str) -> str:
    if _OUT.value:
        return _OUT.value
    if os.path.isdir(os.path.join(sweep_dir, 'runs')) or _OVERWRITE.value:
        return sweep_dir
    raise SystemExit(f'--sweep_dir={sweep_dir!r} holds results without their runs (committed '
                     'results?): pass --out=DIR for the new fits, or --overwrite to replace them')


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    logs.quiet_libraries()
    if _MAX_SIZE.value and not _TRANSFER.value:
        raise SystemExit(f'--max_size={_MAX_SIZE.value} applies to --transfer fits only')
    try:
        rows = results.load_results(_SWEEP_DIR.value)   # a missing, garbled or empty file: one line
        if _MAX_SIZE.value:
            rows = transfer.up_to(rows, _TRANSFER.value, _MAX_SIZE.value)
    except ConfigError as e:
        raise SystemExit(f'config error: {e}') from None
    out = _out_dir(_SWEEP_DIR.value)
    if _TRANSFER.value:
        paths = transfer.write_report(rows, out, _TRANSFER.value,
                                      n_boot=max(_BOOTSTRAP.value, 1) * 10)
    else:
        fits = fit.run(_SWEEP_DIR.value, _BOOTSTRAP.value, out)
        paths = [os.path.join(out, 'fits.json'), os.path.join(out, 'fit_summary.md'), *fits['files']]
    for path in paths:
        print(f'wrote {path}')


if __name__ == '__main__':
    app.run(main)
