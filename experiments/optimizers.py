"""Muon vs AdamW under µP at equal tokens, and whether Muon's optimal LR transfers across width.

    python -m pretrain.sweep --sweep=configs/sweeps/optimizers.py \
        --workdir=docs/optimizers/sweep --parallel=1        # resumable; hours on 2 CPU cores
    .venv/bin/python -m experiments.optimizers

Reads the sweep's results.jsonl and writes docs/optimizers.{json,md,png}. Every verdict is
computed here (pretrain.study.transfer for the per-optimizer transfer criteria):

- head to head, per width: each optimizer at its own best grid LR (the lowest seed-mean held-out
  loss), Muon minus AdamW paired by seed with a 95% t interval. Met when the interval lies below
  0, not met when it lies above, otherwise (or with fewer than 2 seeds) not shown. Both LRs are
  picked on the same seeds they are scored on, which favours neither optimizer but makes both
  losses slightly optimistic;
- transfer: the drift of Muon's optimal LR per doubling of width with a bootstrap interval,
  against the |drift| < 0.5 octave goal, and wider-is-better at the transferred LR;
- the noise floor: the median across-seed standard deviation of a (width, LR) cell.
"""

import math
import os
from typing import Any

import numpy as np
from absl import app, flags

from pretrain.study import transfer

SWEEP_DIR = 'docs/optimizers/sweep'
OPTIMIZERS = ('adamw', 'muon')
_SWEEP_DIR = flags.DEFINE_string('sweep_dir', SWEEP_DIR, 'The sweep folder (results.jsonl).')
_OUT = flags.DEFINE_string('out', 'docs', 'Folder of optimizers.{json,md,png}.')


def _variant(optimizer: str) -> str:
    return 'mup' if optimizer == 'adamw' else f'mup+{optimizer}'


def head_to_head(by_group: dict, steps: int) -> list[dict[str, Any]]:
    """Per width: each optimizer's best grid LR and loss, and Muon - AdamW paired by seed."""
    widths = sorted({size for (v, s, size) in by_group if s == steps})
    out = []
    for width in widths:
        entry: dict[str, Any] = {'width': width}
        best_by_seed = {}
        for optimizer in OPTIMIZERS:
            g = by_group.get((_variant(optimizer), steps, width))
            if g is None:
                continue
            mean = g.mean_over(np.arange(len(g.seeds)))
            j = int(np.nanargmin(np.where(np.isfinite(mean), mean, np.inf)))
            entry[optimizer] = {'best_lr': g.lrs[j], 'loss': float(mean[j]), 'seeds': len(g.seeds),
                                'lrs_run': int(np.sum(~np.isnan(g.loss_SL).all(axis=0))),
                                'at_edge': j in (0, len(g.lrs) - 1)}
            best_by_seed[optimizer] = transfer._by_seed(g, g.lrs[j])
        if len(best_by_seed) == 2:
            diff = transfer.paired_difference(best_by_seed['adamw'], best_by_seed['muon'])
            low, high = diff['interval']
            met = None if diff['seeds'] < transfer.MIN_SEEDS or math.isnan(low) else (
                True if high < 0 else (False if low > 0 else None))
            entry['muon_minus_adamw'] = diff
            entry['verdict'] = transfer._verdict(met)
        out.append(entry)
    return out


def report(rows: list[dict[str, Any]], n_boot: int = 2000) -> dict[str, Any]:
    by_group = transfer.grids(rows, 'width')
    steps = sorted({s for (_, s, _) in by_group})
    return {'transfer': transfer.report(rows, 'width', n_boot=n_boot),
            'head_to_head': {s: head_to_head(by_group, s) for s in steps},
            'runs': len([r for r in rows if r.get('status') in ('done', 'diverged')])}


def markdown(result: dict[str, Any]) -> str:
    from configs.sweeps import optimizers as sweep_file
    planned = len(sweep_file.points())
    status = ('complete' if result['runs'] >= planned else
              'in progress: rerunning the sweep command resumes it, and every table below is '
              'recomputed from what has finished; a verdict needs 2 seeds')
    lines = ['# Muon vs AdamW under µP (computed by experiments/optimizers.py)', '',
             f'{result["runs"]} of {planned} runs of `configs/sweeps/optimizers.py` finished '
             f'({status}). Held-out loss (nats per byte) after equal tokens (1,000 steps of '
             '1,024 tokens); intervals are 95%.', '',
             '## Head to head: each optimizer at its own best grid LR', '',
             '| steps | width | AdamW best LR | AdamW loss | Muon best LR | Muon loss | seeds | '
             'Muon - AdamW (95% interval) | Muon better? |', '|---|---|---|---|---|---|---|---|---|']
    for steps, entries in result['head_to_head'].items():
        for e in entries:
            if 'muon_minus_adamw' not in e:
                continue
            a, m, d = e['adamw'], e['muon'], e['muon_minus_adamw']
            edge = lambda x: ' (grid edge)' if x['at_edge'] else ''   # noqa: E731
            interval = ('-' if math.isnan(d['interval'][0])
                        else f'[{d["interval"][0]:+.4f}, {d["interval"][1]:+.4f}]')
            lines.append(f'| {steps} | {e["width"]} | {a["best_lr"]:.4g}{edge(a)} | {a["loss"]:.4f} | '
                         f'{m["best_lr"]:.4g}{edge(m)} | {m["loss"]:.4f} | {d["seeds"]} | '
                         f'{d["mean"]:+.4f} {interval} | **{e["verdict"]}** |')
    lines += ['', '## Transfer of the optimal LR across width (pretrain.study.transfer)', '',
              transfer.markdown(result['transfer'])]
    return '\n'.join(lines) + '\n'


def main(argv) -> None:
    del argv
    rows = transfer.load_rows(_SWEEP_DIR.value)
    result = report(rows)
    os.makedirs(_OUT.value, exist_ok=True)
    base = os.path.join(_OUT.value, 'optimizers')
    with open(base + '.json', 'w') as f:
        f.write(transfer.to_json({**result, 'head_to_head': {str(k): v for k, v in
                                                             result['head_to_head'].items()}}))
    with open(base + '.md', 'w') as f:
        f.write(markdown(result))
    transfer.plot(rows, result['transfer'], base + '.png')
    print(f'wrote {base}.json, {base}.md and {base}.png')


if __name__ == '__main__':
    app.run(main)
