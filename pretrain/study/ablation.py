"""Ablation verdicts: which ingredient of a parametrization explains a gap between two references.

    python -m pretrain.study.ablation --sweep=configs/sweeps/mutransfer_ablation.py \
        --sweep_dir=docs/mutransfer/ablation_sweep

The sweep file declares VARIANTS = {label: (overrides, half-octave LR points)} and
REFERENCES = (explained, competitor), e.g. ('mup', 'sp'): the gap is competitor's loss minus the
explained reference's. Every number below is computed here from the sweep's results.jsonl:

- per variant: the seed-averaged held-out loss at each LR, the best LR (at an edge of its grid or
  not) and, per seed, the loss at that LR;
- each variant against each reference at their own best LRs, paired by seed, with a 95% t
  interval, and the fraction of the gap it closes (its mean difference from the explained
  reference over the gap);
- a verdict per variant: 'better than <explained>' when that interval is below 0, 'worse' when
  above, otherwise 'no difference shown'; against the competitor 'still worse', 'better' or 'not
  distinguishable'.

The best LR is chosen on the same runs it is scored on, for the references as for the variants,
so every entry shares the same small optimism; a variant whose best LR is at its grid's edge is
flagged, since its true optimum may be better still.
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.study import sweep as sweep_lib
from pretrain.study import transfer

_FREE_KEYS = ('model.d_model', 'seed', 'optim.lr')   # what varies inside one variant


def _label(point: Mapping[str, Any], variants: Mapping[str, Any]) -> str | None:
    keys = set(point) - set(_FREE_KEYS)
    for label, (overrides, _) in variants.items():
        if set(overrides) == keys and all(point[k] == v for k, v in overrides.items()):
            return label
    return None


def grids(rows: Sequence[Mapping[str, Any]], variants: Mapping[str, Any]) -> dict[str, transfer.Grid]:
    """{label: Grid of seeds x LRs}; a diverged run counts as an infinite loss."""
    cells: dict[str, dict[tuple[int, float], float]] = {}
    for r in rows:
        if r.get('status') not in ('done', 'diverged'):
            continue
        label = _label(r['point'], variants)
        if label is None:
            continue
        loss = math.inf if r['status'] == 'diverged' or r.get('final_loss') is None else float(r['final_loss'])
        cells.setdefault(label, {})[(int(r['point']['seed']), float(r['point']['optim.lr']))] = loss
    return {label: transfer.grid_from_cells(values) for label, values in cells.items()}


def best(g: transfer.Grid) -> dict[str, Any]:
    """The grid LR with the lowest seed-averaged loss, and the loss there per seed."""
    mean = g.mean_over(np.arange(len(g.seeds)))
    j = transfer._best_column(g, np.arange(len(g.seeds)))
    return {'lr': g.lrs[j], 'mean_loss': float(mean[j]), 'at_edge': j in (0, len(g.lrs) - 1),
            'seeds': len(g.seeds), 'by_seed': transfer._by_seed(g, g.lrs[j]),
            'curve': {lr: float(x) for lr, x in zip(g.lrs, mean)}}


def report(rows: Sequence[Mapping[str, Any]], variants: Mapping[str, Any],
           references: Sequence[str]) -> dict[str, Any]:
    explained, competitor = references
    g = grids(rows, variants)
    bests = {label: best(x) for label, x in g.items()}
    out: dict[str, Any] = {'references': list(references), 'variants': bests, 'comparisons': []}
    if explained not in bests or competitor not in bests:
        return {**out, 'gap': None}
    gap = transfer.paired_difference(bests[explained]['by_seed'], bests[competitor]['by_seed'])
    out['gap'] = gap
    for label, b in bests.items():
        if label in references:
            continue
        vs_explained = transfer.paired_difference(bests[explained]['by_seed'], b['by_seed'])
        vs_competitor = transfer.paired_difference(bests[competitor]['by_seed'], b['by_seed'])
        closed = (vs_explained['mean'] / gap['mean']
                  if gap['mean'] and math.isfinite(gap['mean']) else math.nan)
        out['comparisons'].append({
            'variant': label, f'minus_{explained}': vs_explained, f'minus_{competitor}': vs_competitor,
            'gap_closed': closed,
            f'verdict_vs_{explained}': transfer.interval_verdict(
                vs_explained, f'better than {explained}', 'worse', 'no difference shown'),
            f'verdict_vs_{competitor}': transfer.interval_verdict(
                vs_competitor, f'better than {competitor}', f'still worse than {competitor}',
                'not distinguishable')})
    return out


def markdown(result: Mapping[str, Any]) -> str:
    explained, competitor = result['references']
    lines = ['| variant | seeds | best LR | loss at best LR (seed mean) | best LR at grid edge | '
             'seed-mean loss per LR |', '|---|---|---|---|---|---|']
    for label, b in result['variants'].items():
        curve = ', '.join(f'{lr:.3g}: {x:.4f}' for lr, x in sorted(b['curve'].items()))
        lines.append(f'| {label} | {b["seeds"]} | {b["lr"]:.3g} | {b["mean_loss"]:.4f} | '
                     f'{"yes" if b["at_edge"] else "no"} | {curve} |')
    if result['gap'] is not None:
        gap = result['gap']
        lines += ['', f'Gap ({competitor} minus {explained}, each at its best LR, paired by seed): '
                  f'{gap["mean"]:+.4f} {transfer._fmt_interval(gap["interval"])}, {gap["seeds"]} seeds.']
    lines += ['', f'| variant | minus {explained} | 95% interval | minus {competitor} | 95% interval | '
              f'gap closed | vs {explained} | vs {competitor} |', '|---|---|---|---|---|---|---|---|']
    for c in result['comparisons']:
        a, b = c[f'minus_{explained}'], c[f'minus_{competitor}']
        lines.append(f'| {c["variant"]} | {a["mean"]:+.4f} | {transfer._fmt_interval(a["interval"])} | '
                     f'{b["mean"]:+.4f} | {transfer._fmt_interval(b["interval"])} | '
                     f'{c["gap_closed"]:.0%} | **{c[f"verdict_vs_{explained}"]}** | '
                     f'**{c[f"verdict_vs_{competitor}"]}** |')
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str]) -> None:
    from absl import flags
    if len(argv) > 1:
        raise SystemExit(f'unexpected arguments: {argv[1:]}')
    f = flags.FLAGS
    if not os.path.isfile(f.sweep):
        raise SystemExit(f'--sweep={f.sweep!r}: no such file')
    module = sweep_lib._import(f.sweep, 'ablation_definition')
    for name in ('VARIANTS', 'REFERENCES'):
        if not hasattr(module, name):
            raise SystemExit(f'--sweep={f.sweep!r} must define {name} for an ablation report')
    result = report(transfer.load_rows(f.sweep_dir), module.VARIANTS, module.REFERENCES)
    out = f.out or f.sweep_dir
    os.makedirs(out, exist_ok=True)
    for ext, text in (('json', transfer.to_json(result)), ('md', markdown(result))):
        path = os.path.join(out, f'ablation.{ext}')
        with open(path, 'w') as handle:
            handle.write(text)
        print(f'wrote {path}')


if __name__ == '__main__':
    from absl import app, flags
    flags.DEFINE_string('sweep', None, 'The ablation sweep file (VARIANTS, REFERENCES).', required=True)
    flags.DEFINE_string('sweep_dir', None, 'Its workdir holding results.jsonl.', required=True)
    flags.DEFINE_string('out', '', 'Folder for ablation.{json,md}; default the sweep dir.')
    app.run(main)
