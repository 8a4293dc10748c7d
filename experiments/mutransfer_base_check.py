"""The rebased base model (µTransfer step 2b): better than the tuned one at the base width, and
does µP beat SP from it at width 128?

    python -m experiments.mutransfer_base_check

Reads the width sweep (the tuned base) and the rebased sweep (the same base with the per-role
constants of configs/sweeps/mutransfer_rebased.py). Compares (1) µP at width 32, where µP is SP,
tuned base against rebased, and (2) at width 128 from the rebased base, µP against SP. Each side
at its best LR among the LRs both ran (seed-averaged), the difference paired by seed with a 95%
t interval, and a verdict. Writes docs/mutransfer/rebased_sweep/base_check.md.
"""

import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from experiments import common
from pretrain.study import transfer

BASE_WIDTH, LARGE_WIDTH, STEPS = 32, 128, 1000


def _grid(sweep_dir: str, variant: str, width: int) -> transfer.Grid:
    return transfer.grids(transfer.load_rows(sweep_dir), 'width')[(variant, STEPS, width)]


def compare(tuned: transfer.Grid, rebased: transfer.Grid, names=('tuned', 'rebased'),
            shared_only: bool = True) -> dict:
    """Both at their best LR (among the shared ones); the second minus the first, by seed."""
    shared = sorted(set(tuned.lrs) & set(rebased.lrs))
    best = {}
    for name, g in zip(names, (tuned, rebased)):
        lrs = shared if shared_only else list(g.lrs)
        mean = g.mean_over(np.arange(len(g.seeds)))
        lr = min(lrs, key=lambda x: mean[g.lrs.index(x)])
        best[name] = {'lr': lr, 'mean': float(mean[g.lrs.index(lr)]), 'by_seed': transfer._by_seed(g, lr),
                      'at_edge': lr in (min(g.lrs), max(g.lrs))}
    first, second = names
    diff = transfer.paired_difference(best[first]['by_seed'], best[second]['by_seed'])
    verdict = transfer.interval_verdict(diff, f'{second} better', f'{first} better', 'no difference shown')
    return {'shared_lrs': shared, 'best': best, 'difference': diff, 'verdict': verdict, 'names': names}


def markdown(result: dict, title: str) -> str:
    first, second = result['names']
    d = result['difference']
    rows = ''.join(f'| {n} | {result["best"][n]["lr"]:.3g}{" (grid edge)" if result["best"][n]["at_edge"] else ""} | '
                   f'{result["best"][n]["mean"]:.4f} |\n' for n in result['names'])
    return (f'{title}\n\n| run | best LR | held-out loss (seed mean) |\n|---|---|---|\n{rows}\n'
            f'{second} minus {first}, paired by seed: {d["mean"]:+.4f} '
            f'{transfer._fmt_interval(d["interval"])} ({d["seeds"]} seeds): **{result["verdict"]}**.\n')


def main(argv: Sequence[str]) -> None:
    del argv
    f = flags.FLAGS   # defined below, only when run as a script (tests import this module)
    base = compare(_grid(f.width_sweep, 'mup', BASE_WIDTH), _grid(f.rebased_sweep, 'mup', BASE_WIDTH))
    large = compare(_grid(f.rebased_sweep, 'sp', LARGE_WIDTH), _grid(f.rebased_sweep, 'mup', LARGE_WIDTH),
                    names=('sp', 'mup'), shared_only=False)
    shared = ', '.join(format(x, '.3g') for x in base['shared_lrs'])
    text = (markdown(base, f'At the base width {BASE_WIDTH} (µP = SP), each base at its best of the '
                           f'LRs both ran ({shared}):')
            + '\n' + markdown(large, f'At width {LARGE_WIDTH} from the rebased base, each at its best '
                                      'LR of its own grid:'))
    common.write_report(os.path.join(f.out or f.rebased_sweep, 'base_check.md'), text)


if __name__ == '__main__':
    flags.DEFINE_string('width_sweep', 'docs/mutransfer/width_sweep', 'The tuned base.')
    flags.DEFINE_string('rebased_sweep', 'docs/mutransfer/rebased_sweep', 'The rebased one.')
    flags.DEFINE_string('out', '', 'Where base_check.md goes; default the rebased sweep.')
    app.run(main)
