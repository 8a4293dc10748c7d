"""µTransfer verdicts from an LR sweep with seeds: does the base model's optimal LR transfer across
width (or depth), and is every larger model better at that LR?

    python -m pretrain.study.transfer --sweep_dir=runs/mutransfer_width --axis=width --out=DIR

Runs are grouped by (variant, steps, size): the variant is the parametrization (sp, mup,
depth_mup, completep = depth_mup with alpha 1), with the optimizer appended when it is not AdamW
(mup+muon, sp+adafactor; SP of the same optimizer is the tuned baseline), the size is d_model (axis=width) or n_layers
(axis=depth). Within a group the loss of each (seed, LR) is the held-out loss at the end of the
run; a diverged run counts as an infinite loss. Every number below is computed here:

- optimum per size: the vertex of a parabola in log2 LR through the best seed-averaged grid point
  and its two neighbours; `bracketed` when at least two evaluated points lie on each side of the
  best one (a diverged LR counts as evaluated);
- drift: the least-squares slope of log2(optimal LR) against log2(size), in octaves per doubling,
  and over the whole range; a 95% bootstrap interval resamples the seeds of every size;
- larger-is-better: at the transferred LR (the base size's optimum snapped to a grid LR of the
  base within half an octave of it: the one run at the most sizes, the nearest among those) the
  loss at each size minus the previous size's, paired by seed, with a 95% t interval; a step
  whose two sizes did not both run that LR is reported as not run (SP's grids follow its optimum
  down, so its widest sizes need not share any LR with the base);
- at the largest size, mup-like variants at the transferred LR against SP tuned at that size,
  paired by seed;
- the noise floor: the median over (size, LR) of the standard deviation across seeds.
"""

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from pretrain.errors import ConfigError

TRANSFER_GOAL_OCTAVES = 0.5   # |drift over the whole range| the mup-like variants must stay under
MIN_SEEDS = 2                 # an interval (and so a verdict) needs at least this many seeds
MIN_LRS = 5                   # a size with fewer LRs run is still in progress: reported, not used
MUP_LIKE = ('mup', 'depth_mup', 'completep')


def variant_of(config: Mapping[str, Any]) -> str:
    """The parametrization a run used, with CompleteP (depth_mup, alpha 1) named apart and the
    optimizer appended unless it is AdamW."""
    p = config['parametrization']
    name = p['name']
    if name == 'depth_mup' and float(p['depth_alpha']) == 1.0:
        name = 'completep'
    optimizer = config.get('optim', {}).get('name', 'adamw')
    return name if optimizer == 'adamw' else f'{name}+{optimizer}'


def _parts(variant: str) -> tuple[str, str]:
    """'mup+muon' -> ('mup', '+muon'); 'sp' -> ('sp', '')."""
    name, plus, optimizer = variant.partition('+')
    return name, plus + optimizer


def mup_like(variant: str) -> bool:
    return _parts(variant)[0] in MUP_LIKE


@dataclasses.dataclass(frozen=True)
class Grid:
    """Losses of one (variant, steps, size): rows are seeds, columns LRs (NaN = not run)."""
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    loss_SL: np.ndarray

    def mean_over(self, seed_rows: np.ndarray) -> np.ndarray:
        picked = self.loss_SL[seed_rows]
        with np.errstate(invalid='ignore'):
            return np.array([_mean_finite_or_inf(picked[:, j]) for j in range(len(self.lrs))])


def _mean_finite_or_inf(column: np.ndarray) -> float:
    column = column[~np.isnan(column)]
    if not column.size:
        return math.nan
    return math.inf if np.isinf(column).any() else float(column.mean())


def _group_of(row: Mapping[str, Any], axis: str) -> tuple[str, int, int]:
    """A results.jsonl row's (variant, steps, size)."""
    c = row['config']
    size = c['model']['d_model'] if axis == 'width' else c['model']['n_layers']
    return variant_of(c), int(c['train']['steps']), int(size)


def up_to(rows: Sequence[Mapping[str, Any]], axis: str, max_size: int) -> list[Mapping[str, Any]]:
    """The rows of sizes <= max_size: the verdicts over a sub-range (to set a sweep beside one
    that stopped at a smaller size)."""
    kept = [r for r in rows if r.get('config') and _group_of(r, axis)[2] <= max_size]
    if not kept:
        sizes = sorted({_group_of(r, axis)[2] for r in rows if r.get('config')})
        raise ConfigError(f'--max_size={max_size} keeps no run: the sweep\'s {axis}s are {sizes}')
    return kept


def grids(rows: Sequence[Mapping[str, Any]], axis: str) -> dict[tuple[str, int, int], Grid]:
    """results.jsonl rows -> {(variant, steps, size): Grid}; held-out and unfinished rows skipped."""
    cells: dict[tuple[str, int, int], dict[tuple[int, float], float]] = {}
    for r in rows:
        if r.get('heldout') or r.get('status') not in ('done', 'diverged'):
            continue
        c = r['config']
        group = _group_of(r, axis)
        loss = math.inf if r['status'] == 'diverged' or r.get('final_loss') is None else float(r['final_loss'])
        cells.setdefault(group, {})[(int(c['seed']), float(c['optim']['lr']))] = loss
    return {group: grid_from_cells(values) for group, values in sorted(cells.items())}


def grid_from_cells(values: Mapping[tuple[int, float], float]) -> Grid:
    """{(seed, lr): loss} -> a Grid (NaN where a (seed, lr) was not run)."""
    seeds = tuple(sorted({s for s, _ in values}))
    lrs = tuple(sorted({lr for _, lr in values}))
    loss_SL = np.full((len(seeds), len(lrs)), np.nan)
    for (s, lr), v in values.items():
        loss_SL[seeds.index(s), lrs.index(lr)] = v
    return Grid(seeds, lrs, loss_SL)


def every_seed_ran(g: Grid) -> Grid:
    """The grid with only the LRs that every seed has run."""
    keep = [j for j in range(len(g.lrs)) if not np.isnan(g.loss_SL[:, j]).any()]
    return Grid(g.seeds, tuple(g.lrs[j] for j in keep), g.loss_SL[:, keep])


@dataclasses.dataclass(frozen=True)
class Optimum:
    log2_lr: float
    loss: float
    bracketed: bool       # >= 2 evaluated LRs on each side of the best grid point
    at_edge: bool         # the best grid point is the lowest or highest LR run


def optimum(lrs: Sequence[float], mean_loss: np.ndarray) -> Optimum:
    """Parabola vertex in log2 LR through the best grid point and its neighbours."""
    x = np.log2(np.asarray(lrs, dtype=float))
    ran = ~np.isnan(mean_loss)
    x, y = x[ran], mean_loss[ran]
    finite = np.isfinite(y)
    if not finite.any():
        return Optimum(math.nan, math.inf, False, False)
    i = int(np.argmin(np.where(finite, y, np.inf)))
    bracketed = i >= 2 and len(x) - 1 - i >= 2
    if i == 0 or i == len(x) - 1 or not np.isfinite(y[i - 1:i + 2]).all():
        return Optimum(float(x[i]), float(y[i]), bracketed, i == 0 or i == len(x) - 1)
    a, b, c = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    if a <= 0:
        return Optimum(float(x[i]), float(y[i]), bracketed, False)
    vertex = float(np.clip(-b / (2 * a), x[i - 1], x[i + 1]))
    return Optimum(vertex, float(np.polyval([a, b, c], vertex)), bracketed, False)


def _slope(sizes: Sequence[int], log2_lrs: Sequence[float]) -> float:
    return float(np.polyfit(np.log2(sizes), log2_lrs, 1)[0])


def drift(group_grids: Mapping[int, Grid], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Optimum per size and the drift of log2(optimal LR) per doubling, with a bootstrap interval."""
    sizes = sorted(group_grids)
    optima = {s: optimum(g.lrs, g.mean_over(np.arange(len(g.seeds)))) for s, g in group_grids.items()}
    out: dict[str, Any] = {'optima': {s: dataclasses.asdict(o) for s, o in optima.items()},
                           'seeds': {s: len(group_grids[s].seeds) for s in sizes}}
    if len(sizes) < 2 or not all(math.isfinite(optima[s].log2_lr) for s in sizes):
        return {**out, 'per_doubling': math.nan, 'total': math.nan, 'interval': [math.nan, math.nan]}
    span = math.log2(sizes[-1] / sizes[0])
    slope = _slope(sizes, [optima[s].log2_lr for s in sizes])
    rng = np.random.default_rng(seed)
    boot, boot_optima = [], {s: [] for s in sizes}
    for _ in range(n_boot):
        ys = []
        for s in sizes:
            g = group_grids[s]
            ys.append(optimum(g.lrs, g.mean_over(rng.integers(0, len(g.seeds), len(g.seeds)))).log2_lr)
            boot_optima[s].append(ys[-1])
        if all(math.isfinite(y) for y in ys):
            boot.append(_slope(sizes, ys) * span)
    low, high = _percentiles(boot)
    # Each size's own interval (its seeds resampled) says which sizes make the drift's wide.
    out['optima_interval'] = {s: _percentiles([y for y in ys if math.isfinite(y)])
                              for s, ys in boot_optima.items()}
    # 'interval' is for the drift over the whole range (what the goal bounds); per doubling it is
    # that interval / span.
    return {**out, 'per_doubling': slope, 'total': slope * span, 'interval': [low, high],
            'interval_per_doubling': [low / span, high / span],
            'all_bracketed': all(optima[s].bracketed for s in sizes)}


def _percentiles(values: Sequence[float]) -> list[float]:
    return np.percentile(values, [2.5, 97.5]).tolist() if values else [math.nan, math.nan]


def paired_difference(a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float]) -> dict[str, Any]:
    """mean of b - a over the seeds both have, with a 95% t interval (needs 2 seeds)."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    d = np.array([b_by_seed[s] - a_by_seed[s] for s in seeds], dtype=float)
    if len(d) == 0 or not np.isfinite(d).all():
        return {'mean': math.nan if len(d) == 0 else float(np.mean(d)), 'interval': [math.nan, math.nan],
                'seeds': len(d)}
    if len(d) < 2:
        return {'mean': float(d[0]), 'interval': [math.nan, math.nan], 'seeds': 1}
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return {'mean': float(d.mean()), 'interval': [float(d.mean()) - half, float(d.mean()) + half],
            'seeds': len(d)}


def _by_seed(g: Grid, lr: float) -> dict[int, float]:
    """Each seed's loss at `lr`; empty when this size did not run it."""
    if lr not in g.lrs:
        return {}
    j = g.lrs.index(lr)
    return {s: float(g.loss_SL[i, j]) for i, s in enumerate(g.seeds) if not np.isnan(g.loss_SL[i, j])}


def transferred_lr(group_grids: Mapping[int, Grid], base: int) -> float | None:
    """The base size's optimum snapped to one of the base's grid LRs within half an octave of it
    (on a half-octave grid, the nearest point and perhaps one neighbour): the one the most sizes
    ran, the nearest among those (where every size ran the LRs near it, simply the nearest)."""
    g = group_grids[base]
    best = optimum(g.lrs, g.mean_over(np.arange(len(g.seeds))))
    if not math.isfinite(best.log2_lr):
        return None
    near = [lr for lr in g.lrs if abs(math.log2(lr) - best.log2_lr) <= 0.5]
    if not near:
        return None
    sizes_running = {lr: sum(lr in x.lrs for x in group_grids.values()) for lr in near}
    return max(near, key=lambda lr: (sizes_running[lr], -abs(math.log2(lr) - best.log2_lr)))


def larger_is_better(group_grids: Mapping[int, Grid], lr: float) -> list[dict[str, Any]]:
    sizes = sorted(group_grids)
    return [{'from': a, 'to': b, **paired_difference(_by_seed(group_grids[a], lr),
                                                      _by_seed(group_grids[b], lr))}
            for a, b in zip(sizes, sizes[1:])]


def noise_floor(group_grids: Mapping[int, Grid]) -> float:
    """Median over (size, LR) of the across-seed standard deviation of finite losses."""
    stds = []
    for g in group_grids.values():
        for j in range(len(g.lrs)):
            col = g.loss_SL[:, j]
            col = col[np.isfinite(col)]
            if col.size >= 2:
                stds.append(float(col.std(ddof=1)))
    return float(np.median(stds)) if stds else math.nan


def interval_verdict(diff: Mapping[str, Any], below: str, above: str, neither: str) -> str:
    """A paired difference's verdict: `below` when its 95% interval is under 0, `above` when
    over, `neither` when it holds 0; 'not shown' from too few seeds or a non-finite interval."""
    low, high = diff['interval']
    if diff['seeds'] < MIN_SEEDS or not (math.isfinite(low) and math.isfinite(high)):
        return 'not shown'
    return below if high < 0 else above if low > 0 else neither


def _verdict(met: bool | None) -> str:
    return 'not shown' if met is None else ('met' if met else 'not met')


def report(rows: Sequence[Mapping[str, Any]], axis: str = 'width', base: int | None = None,
           n_boot: int = 2000, lengths: bool = True) -> dict[str, Any]:
    """Every criterion per (variant, steps), with numbers and a verdict; with `lengths`, also
    each criterion compared across training lengths (`across_lengths`)."""
    by_group = grids(rows, axis)
    families: dict[tuple[str, int], dict[int, Grid]] = {}
    for (variant, steps, size), g in by_group.items():
        families.setdefault((variant, steps), {})[size] = g
    out: dict[str, Any] = {'axis': axis, 'groups': [], 'verdicts': [], 'in_progress': []}
    for (variant, steps), group_grids in sorted(families.items()):
        # An LR that only some seeds have run would be a mean over fewer seeds than its
        # neighbours (and a different bootstrap); a size whose grid or seeds are still being
        # filled would move the optimum and the common LRs. Both are left out until complete.
        # A size with fewer seeds than most sizes have (the median over the sizes other than
        # the base) is still being filled. The base is left out of that median because it is
        # the one size given extra seeds (it is cheap and enters every drift): with two sizes,
        # a base of 8 seeds would otherwise make the other's 3 look unfinished. A base with
        # more seeds is kept: the bootstrap resamples each size's own seeds and the paired
        # differences use the seeds both sizes have.
        base_here = base if base in group_grids else min(group_grids)
        others = [len(g.seeds) for s, g in group_grids.items() if s != base_here]
        usual_seeds = float(np.median(others)) if others else len(group_grids[base_here].seeds)
        for size, g in list(group_grids.items()):
            complete = every_seed_ran(g)
            if len(g.seeds) < usual_seeds or len(complete.lrs) < MIN_LRS:
                del group_grids[size]
                out['in_progress'].append({'variant': variant, 'steps': steps, 'size': size,
                                           'seeds_run': len(g.seeds), 'lrs_run': len(complete.lrs)})
            else:
                group_grids[size] = complete
        if not group_grids:
            continue
        sizes = sorted(group_grids)
        base_size = base if base in group_grids else sizes[0]
        d = drift(group_grids, n_boot)
        lr = transferred_lr(group_grids, base_size)
        ladder = larger_is_better(group_grids, lr) if lr is not None else []
        entry = {'variant': variant, 'steps': steps, 'sizes': sizes, 'base': base_size,
                 'drift': d, 'transferred_lr': lr, 'larger_is_better': ladder,
                 'noise_floor': noise_floor(group_grids)}
        out['groups'].append(entry)
        low, high = d['interval']
        seeded = min(d['seeds'].values()) >= MIN_SEEDS
        enough = len(sizes) >= 2 and d.get('all_bracketed', False) and math.isfinite(low) and seeded
        if mup_like(variant):
            met = (-TRANSFER_GOAL_OCTAVES < low and high < TRANSFER_GOAL_OCTAVES) if enough else None
            criterion = f'abs(drift) < {TRANSFER_GOAL_OCTAVES} octave (95% interval inside)'
        else:
            met = (low > 0 or high < 0) if enough else None
            criterion = 'drifts clearly (95% interval excludes 0)'
        out['verdicts'].append({'variant': variant, 'steps': steps, 'criterion': criterion,
                                'verdict': _verdict(met), 'total_drift': d['total'], 'interval': d['interval']})
        if ladder:
            # One step whose interval reaches 0 fails "every step"; steps not run (or with too
            # few seeds) leave a criterion that no measured step fails undecided.
            measured = [x for x in ladder if x['seeds'] >= MIN_SEEDS and math.isfinite(x['interval'][1])]
            met = (False if any(x['interval'][1] >= 0 for x in measured) else
                   True if len(measured) == len(ladder) else None)
            out['verdicts'].append({
                'variant': variant, 'steps': steps, 'verdict': _verdict(met),
                'criterion': f'every larger {axis} better at the transferred LR (interval < 0)',
                'differences': [[x['from'], x['to'], x['mean'], x['interval']] for x in ladder]})
    out['verdicts'] += _against_tuned_sp(families, out['groups'])
    if lengths:
        out['across_lengths'] = across_lengths(rows, axis, base, n_boot)
    return out


def across_lengths(rows: Sequence[Mapping[str, Any]], axis: str = 'width', base: int | None = None,
                   n_boot: int = 2000) -> list[dict[str, Any]]:
    """Every criterion at each training length of a variant, computed on the sizes that every
    length ran (longer runs cover only the smallest sizes), so that the verdicts compare like
    with like: does each ordering still hold when training is longer?"""
    sizes_at: dict[str, dict[int, set[int]]] = {}
    for variant, steps, size in grids(rows, axis):
        sizes_at.setdefault(variant, {}).setdefault(steps, set()).add(size)
    common = {variant: set.intersection(*by_steps.values())
              for variant, by_steps in sizes_at.items() if len(by_steps) > 1}
    kept = []
    for r in rows:
        if r.get('config'):
            variant, _, size = _group_of(r, axis)
            if size in common.get(variant, ()):
                kept.append(r)
    if not kept:
        return []
    paired: dict[tuple[str, str], dict[int, Mapping[str, Any]]] = {}
    for v in report(kept, axis, base, n_boot, lengths=False)['verdicts']:
        paired.setdefault((v['variant'], v['criterion']), {})[v['steps']] = v
    out = []
    for (variant, criterion), by_steps in sorted(paired.items()):
        verdicts = {steps: v['verdict'] for steps, v in sorted(by_steps.items())}
        if len(verdicts) < 2 or 'not shown' in verdicts.values():
            holds = 'not shown'
        else:
            holds = 'yes' if len(set(verdicts.values())) == 1 else 'no'
        out.append({'variant': variant, 'criterion': criterion, 'sizes': sorted(common[variant]),
                    'holds': holds, 'by_steps': {steps: {'verdict': v['verdict'], 'numbers': _numbers(v)}
                                                 for steps, v in sorted(by_steps.items())}})
    return out


def _numbers(verdict: Mapping[str, Any]) -> str:
    """A verdict's evidence in one line: the drift, the paired differences, or the gap to SP."""
    if 'total_drift' in verdict:
        return f'drift {verdict["total_drift"]:+.2f} octave {_fmt_interval(verdict["interval"])}'
    if 'differences' in verdict:
        return '; '.join(f'{a} -> {b} {mean:+.4f} {_fmt_interval(interval)}'
                         for a, b, mean, interval in verdict['differences'])
    d = verdict['difference']
    return f'minus SP {d["mean"]:+.4f} {_fmt_interval(d["interval"])}'


def _against_tuned_sp(families, groups) -> list[dict[str, Any]]:
    """At the largest size: each mup-like variant at its transferred LR vs SP at its best grid LR."""
    verdicts = []
    for entry in groups:
        variant, steps = entry['variant'], entry['steps']
        sp = families.get(('sp' + _parts(variant)[1], steps))
        if not mup_like(variant) or sp is None or entry['transferred_lr'] is None:
            continue
        shared = set(entry['sizes']) & set(sp) - {entry['base']}   # at the base they coincide
        if not shared:
            continue
        largest = max(shared)
        g_sp = sp[largest]
        sp_lr = g_sp.lrs[_best_column(g_sp, np.arange(len(g_sp.seeds)))]
        mup_by_seed = _by_seed(families[(variant, steps)][largest], entry['transferred_lr'])
        diff = paired_difference(_by_seed(g_sp, sp_lr), mup_by_seed)
        # SP's LR chosen on the same seeds it is scored on flatters SP (the best of many noisy
        # points); chosen on the other seeds, each seed's SP loss is an out-of-sample one.
        held_out = paired_difference(_held_out_best(g_sp), mup_by_seed)
        met = None if math.isnan(diff['mean']) or diff['seeds'] < MIN_SEEDS else diff['mean'] <= 0
        verdicts.append({'variant': variant, 'steps': steps, 'size': largest, 'verdict': _verdict(met),
                         'criterion': f'{variant} (transferred LR) <= SP tuned at the largest size',
                         'sp_lr': sp_lr, 'difference': diff, 'difference_sp_held_out': held_out})
    return verdicts


def _best_column(g: Grid, seed_rows: np.ndarray) -> int:
    mean = g.mean_over(seed_rows)
    return int(np.nanargmin(np.where(np.isfinite(mean), mean, np.inf)))


def _held_out_best(g: Grid) -> dict[int, float]:
    """Per seed: its loss at the LR that is best on the mean of the other seeds."""
    if len(g.seeds) < 2:
        return {}
    out = {}
    for i, s in enumerate(g.seeds):
        j = _best_column(g, np.array([r for r in range(len(g.seeds)) if r != i]))
        if not np.isnan(g.loss_SL[i, j]):
            out[s] = float(g.loss_SL[i, j])
    return out


def choose_base(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the tuned point, its row): the finished, finite run with the lowest held-out loss."""
    done = [r for r in rows if r.get('status') == 'done' and r.get('final_loss') is not None
            and math.isfinite(float(r['final_loss']))]
    if not done:
        raise ValueError('no finished run with a finite loss to choose a base model from')
    best = min(done, key=lambda r: float(r['final_loss']))
    return dict(best['point']), best


def write_base(path: str, point: Mapping[str, Any], row: Mapping[str, Any], sweep_dir: str) -> None:
    """A config fragment the transfer sweeps import: TUNED = {dotted key: value}."""
    values = {k: v for k, v in point.items() if k != 'seed'}
    lines = [f'"""The base model chosen by the tuning sweep in '
             f'{os.path.basename(os.path.normpath(sweep_dir))} (held-out loss {float(row["final_loss"]):.4f}):',
             f'run {row["name"]}.',
             'Written by `python -m pretrain.study.transfer --choose_base`; do not edit by hand."""',
             '', 'TUNED = {']
    lines += [f'    {k!r}: {v!r},' for k, v in sorted(values.items())] + ['}', '']
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines))
    os.replace(tmp, path)


def base_ranking_markdown(rows: Sequence[Mapping[str, Any]], top: int = 10) -> str:
    """The best `top` runs of a tuning sweep and how far apart they are (one seed each)."""
    done = sorted((r for r in rows if r.get('status') == 'done' and r.get('final_loss') is not None
                   and math.isfinite(float(r['final_loss']))), key=lambda r: float(r['final_loss']))
    keys = sorted({k for r in done for k in r['point'] if k != 'seed'})
    lines = ['| rank | held-out loss | ' + ' | '.join(k.rsplit('.', 1)[-1] for k in keys) + ' |',
             '|---' * (len(keys) + 2) + '|']
    for rank, r in enumerate(done[:top], 1):
        lines.append(f'| {rank} | {float(r["final_loss"]):.4f} | '
                     + ' | '.join(format(r['point'][k], '.4g') if isinstance(r['point'].get(k), float)
                                  else str(r['point'].get(k, '')) for k in keys) + ' |')
    losses = [float(r['final_loss']) for r in done]
    lines += ['', f'{len(rows)} runs, {len(done)} finished with a finite loss, '
              f'{sum(r.get("status") == "diverged" for r in rows)} diverged; best {losses[0]:.4f}, '
              f'10th {losses[min(9, len(losses) - 1)]:.4f}, median {float(np.median(losses)):.4f}.']
    return '\n'.join(lines) + '\n'


def to_json(result: Mapping[str, Any]) -> str:
    from pretrain.jsonable import jsonable
    return json.dumps(jsonable(result), indent=1)


def _fmt_interval(interval: Sequence[float]) -> str:
    low, high = interval
    return 'n/a' if not (math.isfinite(low) and math.isfinite(high)) else f'[{low:+.3f}, {high:+.3f}]'


def markdown(result: Mapping[str, Any]) -> str:
    """Tables of the optima, drifts, paired differences and verdicts."""
    axis = result['axis']
    lines = [f'| variant | steps | {axis} | seeds | optimal LR | log2 LR, 95% interval (seeds '
             'resampled) | loss at optimum | bracketed |', '|---|---|---|---|---|---|---|---|']
    for g in result['groups']:
        for size, o in g['drift']['optima'].items():
            interval = g['drift'].get('optima_interval', {}).get(size, [math.nan, math.nan])
            lines.append(f'| {g["variant"]} | {g["steps"]} | {size} | {g["drift"]["seeds"][size]} | '
                         f'2^{o["log2_lr"]:.2f} = {2 ** o["log2_lr"]:.3g} | '
                         f'{_fmt_interval(interval)} | {o["loss"]:.4f} | '
                         f'{"yes" if o["bracketed"] else "no (edge)" if o["at_edge"] else "no"} |')
    lines += ['', '| variant | steps | drift per doubling (octaves) | its 95% interval | over the range | '
              'its 95% interval | '
              'noise floor (nats, seed std) | transferred LR |', '|---|---|---|---|---|---|---|---|']
    for g in result['groups']:
        d = g['drift']
        lr = g['transferred_lr']
        per_doubling = d.get('interval_per_doubling', [math.nan, math.nan])
        lines.append(f'| {g["variant"]} | {g["steps"]} | {d["per_doubling"]:+.3f} | '
                     f'{_fmt_interval(per_doubling)} | {d["total"]:+.3f} | '
                     f'{_fmt_interval(d["interval"])} | '
                     f'{"n/a" if math.isnan(g["noise_floor"]) else format(g["noise_floor"], ".4f")} | '
                     f'{"n/a" if lr is None else f"{lr:.3g}"} |')
    lines += ['', f'Larger-is-better at the transferred LR (loss of the larger {axis} minus the smaller, '
              'paired by seed, 95% t interval):', '',
              '| variant | steps | step | mean | 95% interval | seeds |', '|---|---|---|---|---|---|']
    for g in result['groups']:
        for x in g['larger_is_better']:
            mean = f'{x["mean"]:+.4f}' if x['seeds'] else f'not run at both {axis}s'
            lines.append(f'| {g["variant"]} | {g["steps"]} | {x["from"]} -> {x["to"]} | {mean} | '
                         f'{_fmt_interval(x["interval"])} | {x["seeds"]} |')
    if result.get('in_progress'):
        lines += ['', f'In progress, left out until every seed has run at least {MIN_LRS} LRs: '
                  + ', '.join(f'{x["variant"]} {axis} {x["size"]} ({x["steps"]} steps, '
                              f'{x["seeds_run"]} seeds, {x["lrs_run"]} LRs run by all of them)'
                              for x in result['in_progress']) + '.']
    against = [v for v in result['verdicts'] if 'difference' in v]
    if against:
        lines += ['', 'At the largest size, mup-like (transferred LR) minus SP tuned there, paired by seed '
                  '(SP\'s LR chosen on all seeds, and on the other seeds only):', '',
                  '| variant | steps | size | SP LR | minus SP | 95% interval | minus SP (LR held out) | '
                  '95% interval |', '|---|---|---|---|---|---|---|---|']
        for v in against:
            d, h = v['difference'], v.get('difference_sp_held_out', {'mean': math.nan,
                                                                     'interval': [math.nan, math.nan]})
            lines.append(f'| {v["variant"]} | {v["steps"]} | {v["size"]} | {v["sp_lr"]:.3g} | '
                         f'{d["mean"]:+.4f} | {_fmt_interval(d["interval"])} | {h["mean"]:+.4f} | '
                         f'{_fmt_interval(h["interval"])} |')
    lines += ['', '| variant | steps | criterion | verdict |', '|---|---|---|---|']
    for v in result['verdicts']:
        lines.append(f'| {v["variant"]} | {v["steps"]} | {v["criterion"]} | **{v["verdict"]}** |')
    if result.get('across_lengths'):
        lines += ['', 'Across training lengths: each criterion recomputed on the sizes that every '
                  'length ran, its verdict per length, and whether it holds at all of them:', '',
                  f'| variant | {axis}s | criterion | per length (steps: verdict, numbers) | holds |',
                  '|---|---|---|---|---|']
        for x in result['across_lengths']:
            per = '<br>'.join(f'{steps}: {v["verdict"]}, {v["numbers"]}' for steps, v in x['by_steps'].items())
            lines.append(f'| {x["variant"]} | {", ".join(map(str, x["sizes"]))} | {x["criterion"]} | '
                         f'{per} | **{x["holds"]}** |')
    return '\n'.join(lines) + '\n'


def plot(rows: Sequence[Mapping[str, Any]], result: Mapping[str, Any], path: str) -> None:
    """Seed-mean loss vs log2 LR, one panel per (variant, steps), one line per size (bars: seed std)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    by_group = grids(rows, result['axis'])
    panels = [(g['variant'], g['steps']) for g in result['groups']]
    if not panels:   # every size still filling its LR grid: say so rather than fail
        fig, ax = plt.subplots(figsize=(4.5, 1.5))
        ax.axis('off')
        ax.text(0.5, 0.5, f'no size has {MIN_LRS} LRs yet', ha='center', va='center')
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (variant, steps), entry in zip(axes[0], panels, result['groups']):
        for (v, s, size), g in by_group.items():
            if (v, s) != (variant, steps):
                continue
            finite = np.where(np.isfinite(g.loss_SL), g.loss_SL, np.nan)
            with np.errstate(invalid='ignore'):
                mean, std = np.nanmean(finite, axis=0), np.nanstd(finite, axis=0)
            ax.errorbar(np.log2(g.lrs), mean, yerr=std, marker='o', ms=3, capsize=2,
                        label=f'{result["axis"]} {size}')
        lowest = min((float(np.nanmin(np.where(np.isfinite(g.loss_SL), g.loss_SL, np.nan)))
                      for (v, s, _), g in by_group.items() if (v, s) == (variant, steps)), default=0.0)
        ax.set_ylim(lowest - 0.02, lowest + 0.5)   # diverged and far-off points leave the panel
        if entry['transferred_lr']:
            ax.axvline(math.log2(entry['transferred_lr']), color='gray', ls=':', lw=1)
        ax.set(title=f'{variant}, {steps} steps', xlabel='log2 peak LR', ylabel='held-out loss')
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_rows(sweep_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(sweep_dir, 'results.jsonl')
    if not os.path.isfile(path):
        raise SystemExit(f'--sweep_dir={sweep_dir!r}: no results.jsonl (run the sweep first)')
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f'{path}:{number}: not a JSON row ({e.msg})') from None
    if not rows:
        raise SystemExit(f'{path} is empty: no finished run yet')
    return rows


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str, axis: str,
                 base: int | None = None, n_boot: int = 2000) -> list[str]:
    """transfer.json, transfer.md and transfer.png in out_dir; returns their paths."""
    result = report(rows, axis, base, n_boot)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f'transfer.{ext}') for ext in ('json', 'md', 'png')]
    with open(paths[0], 'w') as f:
        f.write(to_json(result))
    with open(paths[1], 'w') as f:
        f.write(markdown(result))
    plot(rows, result, paths[2])
    return paths


def main(argv: Sequence[str]) -> None:
    from absl import flags
    if len(argv) > 1:
        raise SystemExit(f'unexpected arguments: {argv[1:]}')
    f = flags.FLAGS
    rows = load_rows(f.sweep_dir)
    if f.choose_base:
        point, row = choose_base(rows)
        write_base(f.choose_base, point, row, f.sweep_dir)
        ranking = os.path.join(f.out or f.sweep_dir, 'base_ranking.md')
        os.makedirs(os.path.dirname(ranking), exist_ok=True)
        with open(ranking, 'w') as out:
            out.write(base_ranking_markdown(rows))
        print(f'chose {row["name"]} (held-out loss {float(row["final_loss"]):.4f} of {len(rows)} runs); '
              f'wrote {f.choose_base} and {ranking}')
        return
    for path in write_report(rows, f.out or f.sweep_dir, f.axis, f.base or None, f.n_boot):
        print(f'wrote {path}')


if __name__ == '__main__':
    from absl import app, flags
    flags.DEFINE_string('sweep_dir', None, 'Sweep workdir holding results.jsonl.', required=True)
    flags.DEFINE_enum('axis', 'width', ['width', 'depth'], 'What the sweep scales.')
    flags.DEFINE_integer('base', 0, 'The base size (0 = the smallest).')
    flags.DEFINE_string('out', '', 'Folder for transfer.{json,md,png}; default the sweep dir.')
    flags.DEFINE_integer('n_boot', 2000, 'Bootstrap resamples of the seeds.')
    flags.DEFINE_string('choose_base', '', 'Instead of a report: write the best run of a tuning '
                        'sweep to this config file (TUNED = {...}).')
    app.run(main)
