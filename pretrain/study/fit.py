"""Every fit a sweep directory allows: reads results.jsonl, writes fits.json, fit_summary.md, PNGs.

`python -m pretrain.fit --sweep_dir=DIR` calls `run`. Rows are the sweep runner's summaries
(`pretrain.study.results`); fields (all optional but `final_loss`; a fit whose fields are
missing is skipped with a printed reason):

    name        str    run name (for plots and the summary)
    params      float  N: non-embedding parameters
    tokens      float  D: training tokens
    flops       float  C: training FLOPs (6 N D if absent and N, D are given)
    budget      float  the iso-FLOP group label (default: flops rounded to 2 significant digits)
    final_loss  float  loss at the end (NaN/inf or null: diverged)
    lr          float  peak learning rate
    width       int    d_model (groups the LR sweep)
    seed        int    bootstrap resamples seeds, not rows, when runs carry one
    curve       [[step, loss, lr], ...]  step = updates done (the trainer's convention)
    evals       [{step, loss}, ...]      held-out losses; the annealing law is fitted on them
    metrics     str    path (relative to DIR) of the run's metrics.jsonl, read for `curve`
    kind        str    'parent' marks a constant-LR run that cooldowns branch from: only its
                       curve is used (its last loss is not the end of a schedule)
    parent      str    the run a cooldown branched from, at `branch_step`
    heldout     bool   not used by any fit; its final_loss (or, for a cooldown, its curve after
                       the branch) is compared with the laws' prediction
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.jsonable import jsonable
from pretrain.study import annealing, plots, report
from pretrain.study.laws import (Chinchilla, PowerLaw, budget_of, chinchilla_optimal,
                                 chinchilla_start, final_loss, fit_chinchilla, fit_isoflop,
                                 fit_power_law, optima_per_width, power_law_start)
from pretrain.study.results import load_results


def _as_dict(result: Any) -> dict[str, float]:
    if dataclasses.is_dataclass(result):
        result = dataclasses.asdict(result)
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}


def bootstrap(fit_fn: Callable[[list[Mapping[str, Any]]], Any], rows: Sequence[Mapping[str, Any]],
              n: int = 200, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of every numeric output of `fit_fn(rows)` over resamples.

    Resamples rows with replacement, or, when every row has a 'seed', whole seeds (all rows of
    each drawn seed), since runs sharing a seed are not independent. A resample whose fit fails
    is dropped.
    """
    rng = np.random.default_rng(seed)
    rows = list(rows)
    by_seed: dict[Any, list[Mapping[str, Any]]] = {}
    if rows and all('seed' in r for r in rows):
        for r in rows:
            by_seed.setdefault(r['seed'], []).append(r)
    units = list(by_seed.values()) if len(by_seed) > 1 else [[r] for r in rows]
    samples: list[dict[str, float]] = []
    for _ in range(n):
        pick = rng.integers(0, len(units), len(units))
        try:
            samples.append(_as_dict(fit_fn([r for i in pick for r in units[i]])))
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            continue
    if not samples:
        raise ValueError('bootstrap: every resample failed to fit.')
    keys = [k for k in samples[0] if all(k in s for s in samples)]
    return {k: (float(np.percentile([s[k] for s in samples], 2.5)),
                float(np.percentile([s[k] for s in samples], 97.5))) for k in keys}


def _has(rows: Sequence[Mapping[str, Any]], *keys: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if all(r.get(k) is not None for k in keys)]


_CONFIG_KEYS = ('flops', 'params', 'tokens', 'lr', 'width')


def _frontier(rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Loss vs compute points for the power law: the lowest loss per iso-FLOP budget when
    budgets hold two or more configurations on average (seeds of one configuration averaged first, so that a
    minimum over seeds does not bias the frontier down), else the Pareto frontier when it has
    three points, else every configuration."""
    configs: dict[tuple, list[float]] = {}
    for r in rows:
        if math.isfinite(final_loss(r)):
            configs.setdefault(tuple(r.get(k) for k in _CONFIG_KEYS) + (r.get('budget'),),
                               []).append(final_loss(r))
    best: dict[float, float] = {}
    for key, losses in configs.items():
        b = key[-1] if key[-1] is not None else budget_of(key[0])
        best[b] = min(best.get(b, math.inf), float(np.mean(losses)))
    if len(configs) >= 2 * len(best) and len(best) >= 3:   # budgets really are shared
        c = np.array(sorted(best))
        return c, np.array([best[b] for b in c])
    # No shared budgets: the Pareto frontier, i.e. each run that beats every cheaper run.
    lowest: dict[float, float] = {}
    for key, losses in configs.items():
        lowest[key[0]] = min(lowest.get(key[0], math.inf), float(np.mean(losses)))
    pareto, running = [], math.inf
    for c in sorted(lowest):
        if lowest[c] < running:
            pareto.append(c)
            running = lowest[c]
    if len(pareto) >= 3:
        return np.array(pareto, float), np.array([lowest[c] for c in pareto])
    return (np.array([k[0] for k in configs], float),
            np.array([np.mean(v) for v in configs.values()]))


def _fit_power_law(rows, out, n_boot, files):
    rows = _has(rows, 'flops', 'final_loss')
    if len(rows) < 3:
        return f'needs >= 3 runs with flops and final_loss, have {len(rows)}'
    c, l = _frontier(rows)
    if len(c) < 3:
        return f'needs >= 3 finite frontier points, have {len(c)}'
    law = fit_power_law(c, l)
    result: dict[str, Any] = dataclasses.asdict(law)
    result['frontier'] = {'C': c.tolist(), 'loss': l.tolist()}
    if n_boot:
        start = power_law_start(law, c)
        result['ci'] = bootstrap(lambda rs: fit_power_law(*_frontier(rs), starts=start), rows,
                                 n_boot)
    path = os.path.join(out, 'power_law.png')
    plots.plot_compute_frontier([r['flops'] for r in rows], [final_loss(r) for r in rows], law, path, (c, l))
    files.append(path)
    return result


def _fit_chinchilla(rows, out, n_boot, files):
    rows = [r for r in _has(rows, 'params', 'tokens', 'final_loss') if math.isfinite(final_loss(r))]
    if len(rows) < 8:
        return f'needs >= 8 finite runs with params, tokens and final_loss, have {len(rows)}'
    if len({r['params'] for r in rows}) < 2 or len({r['tokens'] for r in rows}) < 2:
        return 'needs >= 2 distinct params and >= 2 distinct tokens'

    def fit(rs, starts=None):
        return fit_chinchilla([r['params'] for r in rs], [r['tokens'] for r in rs],
                              [final_loss(r) for r in rs], starts=starts)

    law = fit(rows)
    result: dict[str, Any] = dataclasses.asdict(law)
    result.update(n_exponent=law.n_exponent, d_exponent=law.d_exponent)
    # Decades from the smallest run's compute to 1000x the largest (extrapolation is the point).
    flops = [6.0 * r['params'] * r['tokens'] for r in rows]
    c = 10.0 ** np.arange(math.floor(math.log10(min(flops))), math.ceil(math.log10(max(flops))) + 4)
    n_opt, d_opt = chinchilla_optimal(law, c)
    result['optimal'] = [{'C': float(ci), 'N_opt': float(ni), 'D_opt': float(di)}
                         for ci, ni, di in zip(c, n_opt, d_opt)]
    if n_boot:
        start = chinchilla_start(law)
        result['ci'] = bootstrap(lambda rs: _with_exponents(fit(rs, start)), rows, n_boot)
    path = os.path.join(out, 'chinchilla.png')
    series = _chinchilla_series(rows, law)
    iso = len(series) > 1 or series[0]['label'].startswith('C=')
    plots.plot_law_vs_points(series, path, xlabel='params N' if iso else 'predicted loss', logx=iso,
                       title='Chinchilla approach 3' + (' per iso-FLOP budget' if iso else ''))
    files.append(path)
    return result


def _with_exponents(law: Chinchilla) -> dict[str, float]:
    return {**dataclasses.asdict(law), 'n_exponent': law.n_exponent, 'd_exponent': law.d_exponent}


def _chinchilla_series(rows, law: Chinchilla) -> list[dict[str, Any]]:
    """Loss vs N per iso-FLOP budget, the law along C = 6 N D; or, when runs do not share
    budgets, measured vs predicted loss (the identity line is the law)."""
    groups: dict[float, list] = {}
    for r in rows:
        groups.setdefault(r.get('budget', budget_of(6.0 * r['params'] * r['tokens'])), []).append(r)
    if max(len(g) for g in groups.values()) >= 3 and len(groups) <= 10:
        series = []
        for b, g in sorted(groups.items()):
            n = np.array([r['params'] for r in g], float)
            ns = np.geomspace(n.min() / 1.5, n.max() * 1.5, 60)
            series.append({'label': f'C={b:.2g}', 'x': n, 'y': [final_loss(r) for r in g],
                           'x_fit': ns, 'y_fit': law(ns, b / (6.0 * ns))})
        return series
    pred = law([r['params'] for r in rows], [r['tokens'] for r in rows])
    line = np.array([pred.min(), pred.max()])
    return [{'label': 'runs (x: predicted)', 'x': pred, 'y': [final_loss(r) for r in rows],
             'x_fit': line, 'y_fit': line}]


def _fit_isoflop(rows, out, n_boot, files):
    del n_boot, out, files
    rows = _has(rows, 'params', 'tokens', 'flops', 'final_loss')
    if not rows:
        return 'needs runs with params, tokens, flops and final_loss'
    budgets = [r.get('budget', budget_of(r['flops'])) for r in rows]
    try:
        iso = fit_isoflop([r['params'] for r in rows], [r['tokens'] for r in rows],
                          [final_loss(r) for r in rows], budgets)
    except ValueError as e:
        return str(e)
    return dataclasses.asdict(iso)


def _fit_lr(rows, out, n_boot, files):
    del n_boot
    rows = _has(rows, 'lr')
    rows = [r for r in rows if 'final_loss' in r]
    if len({r['lr'] for r in rows}) < 3:
        return f'needs >= 3 distinct lr values with final_loss, have {len({r["lr"] for r in rows})}'
    optima = optima_per_width(rows)
    result: dict[str, Any] = {'optima': {str(w): dataclasses.asdict(o) for w, o in optima.items()}}
    widths = [w for w, o in optima.items() if isinstance(w, (int, float)) and not o.at_edge]
    if len(widths) >= 2:
        # The muTransfer question: does the optimum move with width? (0 under ideal muP).
        slope, _ = np.polyfit(np.log2(widths), np.log2([optima[w].lr for w in widths]), 1)
        result['log2_lr_vs_log2_width_slope'] = float(slope)
    path = os.path.join(out, 'lr_sweep.png')
    plots.plot_lr_sweep(rows, optima, path)
    files.append(path)
    return result


def annealing_groups(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """One group per model and seed: a constant-LR parent with the cooldowns branched from it;
    rows without lineage are grouped by size (params, else width) and seed."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get('parent'):
            key = str(r['parent'])
        elif r.get('kind') == 'parent':
            key = str(r['name'])
        else:
            key = f'N={r.get("params", r.get("width", "all"))},seed={r.get("seed")}'
        groups.setdefault(key, []).append(r)
    return groups


def _eval_points(row: Mapping[str, Any]) -> list[tuple[int, float]]:
    return [(int(e['step']), float(e['loss'])) for e in row.get('evals') or [] if 'loss' in e]


def _annealing_curve(row: Mapping[str, Any], use_eval: bool,
                     seen_until: int) -> annealing.Curve:
    lrs, steps, losses = annealing.curve_to_schedule(row['curve'])
    if use_eval:
        points = [(s, v) for s, v in _eval_points(row) if s <= len(lrs)]
        steps = np.array([s for s, _ in points], dtype=int)
        losses = np.array([v for _, v in points], dtype=float)
    return annealing.Curve(lrs, steps, losses, name=str(row.get('name', '')), seen_until=seen_until)


def fit_annealing_group(group: Sequence[Mapping[str, Any]],
                        lams: Sequence[float] = (0.999,)) -> dict[str, Any]:
    """Fits the law on the group's fitted curves and scores it on the held-out ones (or, with
    none held out, on the last curve left out of the fit), on unseen points only. With several
    `lams`, the momentum decay is chosen by the error on the fitted curves."""
    fitted = [r for r in group if not r.get('heldout')]
    predicted = [r for r in group if r.get('heldout')]
    if not predicted and len(fitted) >= 2:
        last = [r for r in fitted if r.get('kind') != 'parent'][-1:]
        fitted = [r for r in fitted if r not in last]
        predicted = last
    if not fitted:
        raise ValueError('no curve to fit (every run of the group is held out)')
    # Fitted on held-out eval losses when every run has a few, else on training losses.
    use_eval = all(len(_eval_points(r)) >= 5 for r in group)
    names = {r.get('name') for r in fitted}

    def seen(r: Mapping[str, Any]) -> int:  # a branched run's history is its fitted parent's
        return int(r.get('branch_step') or 0) if r.get('parent') in names else 0

    fit_curves = [_annealing_curve(r, use_eval, seen(r)) for r in fitted]
    law = annealing.fit_annealing_choosing_lam(fit_curves, lams)
    return {
        'law': dataclasses.asdict(law), 'loss_source': 'held-out eval loss' if use_eval else
        'training loss (one batch per step: noisy; log evals often to fit on held-out loss)',
        'fitted_on': [c.name for c in fit_curves],
        'in_sample': [dataclasses.asdict(annealing.score(law, c)) for c in fit_curves],
        'predictions': [dataclasses.asdict(annealing.score(law, _annealing_curve(r, use_eval, seen(r))))
                        for r in predicted],
        '_curves': fit_curves + [_annealing_curve(r, use_eval, seen(r)) for r in predicted],
    }


def _fit_annealing(rows, out, n_boot, files):
    """The LR-annealing law per group (`annealing_groups`); rows include the held-out runs."""
    del n_boot
    rows = [r for r in rows if r.get('curve')]
    if not rows:
        return 'needs runs with a curve ([[step, loss, lr], ...]) or a metrics file'
    result: dict[str, Any] = {'noise_floor_definition': annealing.NOISE_FLOOR_DEFINITION,
                              'alpha_range': list(annealing.ALPHA_RANGE), 'groups': {}}
    series = []
    for key, group in annealing_groups(rows).items():
        try:
            entry = fit_annealing_group(group)
        except ValueError as e:
            result['groups'][key] = {'error': str(e)}
            continue
        law = annealing.AnnealingLaw(**{**entry['law'], 'at_bounds': tuple(entry['law']['at_bounds'])})
        if law.at_bounds:
            print(f'annealing law {key}: the fit ends on a bound: {"; ".join(law.at_bounds)}')
        for c in entry.pop('_curves'):
            start = max(int(np.argmax(c.lrs)), c.seen_until)
            shown = np.asarray(c.steps) > start
            series.append({'label': c.name, 'x': np.asarray(c.steps)[shown],
                           'y': np.asarray(c.losses)[shown],
                           'x_fit': np.arange(start + 1, len(c.lrs) + 1),
                           'y_fit': annealing.predict_annealing(law, c.lrs)[start:]})
        result['groups'][key] = entry
    if series:
        path = os.path.join(out, 'annealing.png')
        plots.plot_law_vs_points(series, path, title='LR-annealing law: points the fit saw or '
                                 'had to predict (after warmup and branch)')
        files.append(path)
    return result


FITS: dict[str, Callable[..., Any]] = {
    'power_law': _fit_power_law, 'chinchilla': _fit_chinchilla, 'isoflop': _fit_isoflop,
    'lr_optima': _fit_lr, 'annealing': _fit_annealing,
}


def predict_heldout(fits: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Each held-out run's measured final loss next to what the fitted laws predict for it."""
    out = []
    for r in rows:
        entry: dict[str, Any] = {'name': r.get('name'), 'measured': final_loss(r)}
        if 'power_law' in fits and r.get('flops'):
            p = fits['power_law']
            entry['power_law'] = float(PowerLaw(p['E'], p['A'], p['alpha'])(r['flops']))
        if 'chinchilla' in fits and r.get('params') and r.get('tokens'):
            p = fits['chinchilla']
            law = Chinchilla(*(p[k] for k in ('E', 'A', 'B', 'alpha', 'beta')))
            entry['chinchilla'] = float(law(r['params'], r['tokens']))
        out.append(entry)
    return out


def run(sweep_dir: str, n_boot: int = 200, out_dir: str | None = None) -> dict[str, Any]:
    """Every fit the rows allow; writes fits.json, fit_summary.md and PNGs into `out_dir`
    (default `sweep_dir`)."""
    out_dir = out_dir or sweep_dir
    os.makedirs(out_dir, exist_ok=True)
    every = load_results(sweep_dir)
    heldout = [r for r in every if r.get('heldout')]
    rows = [r for r in every if not r.get('heldout')]
    # A constant-LR parent's last loss is not the end of a schedule: only its curve is used.
    ends = [r for r in rows if r.get('kind') != 'parent']
    fits: dict[str, Any] = {'n_runs': len(rows), 'skipped': {}, 'files': []}
    for name, fn in FITS.items():
        try:
            # The annealing fit sees the held-out cooldowns' curves only to score its predictions.
            result = fn(every if name == 'annealing' else ends, out_dir, n_boot, fits['files'])
        except (ValueError, np.linalg.LinAlgError) as e:     # one failed fit must not stop the rest
            result = f'fit failed: {e}'
        if isinstance(result, str):
            fits['skipped'][name] = result
            print(f'skipping {name}: {result}')
        else:
            fits[name] = result
    if heldout:
        fits['heldout'] = predict_heldout(fits, [r for r in heldout if r.get('kind') != 'parent'])
    fits = jsonable(fits)
    with open(os.path.join(out_dir, 'fits.json'), 'w', encoding='utf-8') as f:
        json.dump(fits, f, indent=1)
    with open(os.path.join(out_dir, 'fit_summary.md'), 'w', encoding='utf-8') as f:
        f.write(report.summary_markdown(fits))
    return fits
