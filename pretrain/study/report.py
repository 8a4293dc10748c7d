"""fit_summary.md: a human-readable page of what `pretrain.study.fit.run` wrote to fits.json."""

import os
from collections.abc import Mapping
from typing import Any


def _ci(fit: Mapping[str, Any], key: str) -> str:
    ci = fit.get('ci', {}).get(key)
    return f' [{ci[0]:.4g}, {ci[1]:.4g}]' if ci else ''


def summary_markdown(fits: Mapping[str, Any]) -> str:
    """A human-readable page of `fits` (as written to fits.json)."""
    lines = ['# Fit summary', '', f'{fits["n_runs"]} runs. Brackets: bootstrap 95% intervals.', '']
    if 'power_law' in fits:
        p = fits['power_law']
        lines += ['## Loss vs compute: L(C) = E + A C^-alpha', '',
                  f'- E = {p["E"]:.4g}{_ci(p, "E")}', f'- A = {p["A"]:.4g}{_ci(p, "A")}',
                  f'- alpha = {p["alpha"]:.4g}{_ci(p, "alpha")}', '']
    if 'chinchilla' in fits:
        p = fits['chinchilla']
        lines += ['## Chinchilla approach 3: L(N, D) = E + A/N^alpha + B/D^beta', '']
        lines += [f'- {k} = {p[k]:.4g}{_ci(p, k)}'
                  for k in ('E', 'A', 'B', 'alpha', 'beta', 'n_exponent', 'd_exponent')]
        lines += ['', '| C | N_opt | D_opt | D/N |', '|---|---|---|---|']
        lines += [f'| {o["C"]:.2g} | {o["N_opt"]:.3g} | {o["D_opt"]:.3g} | '
                  f'{o["D_opt"] / o["N_opt"]:.1f} |' for o in p['optimal']]
        lines.append('')
    if 'isoflop' in fits:
        p = fits['isoflop']
        lines += ['## Chinchilla approach 2 (iso-FLOP parabolas)', '',
                  f'- N_opt ∝ C^{p["a"]:.4f}, D_opt ∝ C^{p["b"]:.4f}', '',
                  '| C | N_opt | D_opt | min loss |', '|---|---|---|---|']
        lines += [f'| {m["C"]:.3g} | {m["N_opt"]:.3g} | {m["D_opt"]:.3g} | {m["loss"]:.4f} |'
                  for m in p['minima']]
        lines += [f'- budget {k} not used: {v}' for k, v in p['skipped'].items()]
        lines.append('')
    if 'lr_optima' in fits:
        p = fits['lr_optima']
        lines += ['## Optimum LR per width', '', '| width | LR* | loss | note |',
                  '|---|---|---|---|']
        for w, o in p['optima'].items():
            note = ''
            if o['at_edge']:
                note = ('best finite LR; a larger one diverged' if o['diverged_above']
                        else 'at grid edge')
            lines.append(f'| {w} | {o["lr"]:.4g} | {o["loss"]:.4f} | {note} |')
        if 'log2_lr_vs_log2_width_slope' in p:
            lines.append(f'\nslope of log2 LR* vs log2 width: '
                         f'{p["log2_lr_vs_log2_width_slope"]:+.3f}')
        lines.append('')
    if 'annealing' in fits:
        lines += annealing_markdown(fits['annealing'])
    if fits.get('heldout'):
        lines += ['## Held-out runs (not used by any fit)', '',
                  '| run | measured | power law L(C) | Chinchilla L(N, D) |', '|---|---|---|---|']
        fmt = lambda e, k: f'{e[k]:.4f} ({e[k] - e["measured"]:+.4f})' if k in e else 'n/a'  # noqa: E731
        lines += [f'| {e["name"]} | {e["measured"]:.4f} | {fmt(e, "power_law")} | '
                  f'{fmt(e, "chinchilla")} |' for e in fits['heldout']]
        lines += ['', 'In brackets: predicted minus measured.', '']
    if fits['skipped']:
        lines += ['## Skipped', ''] + [f'- {k}: {v}' for k, v in fits['skipped'].items()] + ['']
    if fits['files']:
        lines += ['## Plots', ''] + [f'![{os.path.basename(p)}]({os.path.basename(p)})'
                                     for p in fits['files']] + ['']
    return '\n'.join(lines)


def _number(x: float | str, spec: str) -> str:
    """`x` formatted, or as written when fits.json holds it as a string ('nan', 'inf')."""
    return x if isinstance(x, str) else format(x, spec)


def annealing_markdown(result: Mapping[str, Any]) -> list[str]:
    """The annealing-law section: per group the law, its bounds, and each prediction's error on
    unseen points next to the noise floor."""
    lines = ['## LR-annealing law: L = L0 + A S1^-alpha - C S2 (Tissue et al. 2024)', '',
             f'Constraints: L0, A, C >= 0, alpha in {result["alpha_range"]}. Errors are predicted '
             'minus measured, in nats, on points the fit never saw. Noise floor: '
             f'{result["noise_floor_definition"]}.', '']
    for key, e in result['groups'].items():
        if 'error' in e:
            lines += [f'- {key}: not fitted: {e["error"]}', '']
            continue
        law = e['law']
        lines.append(f'### {key}')
        lines.append(f'- fitted on {", ".join(e["fitted_on"])} ({e["loss_source"]}): '
                     f'L0={law["L0"]:.4g} A={law["A"]:.4g} alpha={law["alpha"]:.4g} '
                     f'C={law["C"]:.4g} (lam={law["lam"]})')
        if law['at_bounds']:
            lines.append(f'- **the fit ends on a bound**: {"; ".join(law["at_bounds"])}; those '
                         'values are limits, not estimates')
        lines += ['', '| curve | role | points scored (steps) | RMSE | final error (nats) | '
                  'final error (% of loss) | noise floor |', '|---|---|---|---|---|---|---|']
        for role, scores in (('fitted (in-sample)', e['in_sample']),
                             ('predicted', e['predictions'])):
            lines += [f'| {s["run"]} | {role} | {s["n_points"]} ({s["first_step"]}-{s["last_step"]})'
                      f' | {_number(s["rmse"], ".4f")} | {_number(s["final_error"], "+.4f")} | '
                      f'{_number(s["final_error_pct"], "+.2f")}% | '
                      f'{_number(s["noise_floor"], ".4f")} |' for s in scores]
        lines.append('')
    return lines
