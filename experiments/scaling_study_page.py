"""The page docs/scaling_study.md and the earlier sweep's loss-vs-tokens plot (numbers from rows)."""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pretrain.study import laws, plots


def plot_loss_vs_tokens(rows: Sequence[dict[str, Any]], law: laws.Chinchilla, path: str) -> None:
    """Cooldown end points per width against the fitted law; the held-out width dashed."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ends = [r for r in rows if r['kind'] != 'parent']
    for i, width in enumerate(sorted({r['width'] for r in ends})):
        g = sorted((r for r in ends if r['width'] == width), key=lambda r: r['tokens'])
        d = np.array([r['tokens'] for r in g])
        held = g[0].get('heldout', False)
        ds = np.geomspace(d.min() / 1.5, d.max() * 1.5, 50)
        color = f'C{i}'
        ax.plot(d, [r['final_loss'] for r in g], 'o' if not held else 's', color=color,
                label=f'd_model {width} (N={g[0]["params"]:.3g})' + (', held out' if held else ''))
        ax.plot(ds, law(g[0]['params'], ds), '--' if held else '-', color=color, alpha=0.6)
    ax.set(xscale='log', xlabel='training tokens D', ylabel='held-out loss (nats/token)',
           title='Cooldown end points vs the fitted L(N, D) (earlier sweep, one seed)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(stat: Sequence[float], spec: str = '.4f') -> str:
    """'mean ± sd' (sd over seeds)."""
    mean, sd = stat
    return f'{mean:{spec}} ± {sd:{spec.lstrip("+")}}' if math.isfinite(sd) else f'{mean:{spec}}'


def annealing_section(table: dict[str, Any]) -> list[str]:
    cells = table['cells']
    seeds = max(c['seeds'] for c in cells)
    lines = [
        '## 1. The LR-annealing law on cooldowns it never saw',
        '',
        'Sweep `configs/sweeps/annealing_tiny.py`: byte-level transformer, 2 layers, heads of 16 '
        'dims, d_ff = 3 d_model, seq 128, batch 16, stdlib corpus, muP (base width 64, '
        f'output_mult 4), peak LR 3e-3, warmup 50 steps. Widths 32 and 64, {seeds} seeds each '
        '(seed = initialisation and data order). Per width and seed: one constant-LR run of 600 '
        'steps and three cooldowns branched from its checkpoints, all ending at step 600: 20% '
        'linear (branch at 480), 10% linear (branch at 540, another length) and 20% 1-sqrt '
        '(branch at 480, another shape). The loss is the held-out eval loss on 4 fixed batches '
        '(8,192 tokens), logged every 5 steps; the LR is logged every step, so S1 and S2 are '
        'exact.',
        '',
        'The law L(s) = L0 + A S1(s)^-alpha - C S2(s) (Tissue et al. 2024; lambda = 0.999, the '
        'warmup rise left out of S2, points before the end of warmup left out of the fit) is '
        'fitted per width and seed on the constant run and the 20% linear cooldown, with L0, A, '
        f'C >= 0 and alpha in {table["alpha_range"]}, on eval loss. It then predicts the two '
        'held-out cooldowns. A prediction is scored only on steps after the cooldown\'s branch '
        'step: before it, the cooldown\'s loss is the fitted constant run\'s. Noise floor: '
        f'{table["noise_floor_definition"]}, on the same scored points.',
        '',
        '| d_model | N | cooldown | role | points scored (steps) | measured final loss | '
        'final error (nats) | final error (% of loss) | RMSE over scored points | noise floor |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for c in cells:
        lines.append(
            f'| {c["width"]} | {c["params"]:,} | {c["cooldown"]} | {c["role"]} | '
            f'{c["points_scored"]} ({c["steps_scored"][0]}-{c["steps_scored"][1]}) | '
            f'{_pm(c["final_measured"])} | {_pm(c["final_error"], "+.4f")} | '
            f'{_pm(c["final_error_pct"], "+.2f")}% | {_pm(c["rmse"])} | {_pm(c["noise_floor"])} |')
    lines += [
        '',
        f'Mean ± standard deviation over {seeds} seeds. Errors: predicted minus measured. The '
        '"fitted" row is in-sample (the fit saw those points); "predicted" rows are not. Wall '
        f'time of all runs: {table["wall_s"] / 60:.0f} min on a shared 2-core CPU.',
        '',
        '| d_model | seed | L0 | A | alpha | C | the fit ends on a bound |', '|---|---|---|---|---|---|---|',
    ]
    for width, fitted in table['laws'].items():
        for law in sorted(fitted, key=lambda f: f['seed']):
            bounds = '; '.join(law['at_bounds']) or 'no'
            lines.append(f'| {width} | {law["seed"]} | {law["L0"]:.3f} | {law["A"]:.3f} | '
                         f'{law["alpha"]:.3f} | {law["C"]:.3f} | {bounds} |')
    chosen = table['chosen_lam']
    lines += [
        '', f'The same fits with the momentum decay lambda chosen per width and seed from '
        f'{chosen["lams"]} by the squared error on the fitted curves alone (the held-out '
        'cooldowns play no part in the choice):', '',
        '| d_model | cooldown | role | final error (nats) | final error (% of loss) | RMSE | '
        'noise floor | lambda chosen (per seed) |', '|---|---|---|---|---|---|---|---|']
    for c in chosen['cells']:
        lam = ', '.join(f'{law["lam"]:g}' for law in sorted(chosen['laws'][str(c['width'])],
                                                           key=lambda f: f['seed']))
        lines.append(f'| {c["width"]} | {c["cooldown"]} | {c["role"]} | '
                     f'{_pm(c["final_error"], "+.4f")} | {_pm(c["final_error_pct"], "+.2f")}% | '
                     f'{_pm(c["rmse"])} | {_pm(c["noise_floor"])} | {lam} |')
    bounds = sorted({b for fitted in chosen['laws'].values() for law in fitted
                     for b in law['at_bounds']})
    lines += ['', 'Bounds these fits end on: ' + ('; '.join(bounds) if bounds else 'none') + '.']
    lines += ['', '![the law against the measured eval loss, and its errors on unseen points]'
              '(scaling_study/annealing/prediction.png)', '']
    return lines


def scaling_section(fits: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    ends = [r for r in rows if r['kind'] != 'parent']
    widths = sorted({r['width'] for r in ends})
    budgets = sorted({r['steps'] for r in ends})
    cell = {(r['width'], r['steps']): r for r in ends}
    parents = {r['width']: r for r in rows if r['kind'] == 'parent'}
    lines = [
        '## 2. The earlier width x budget sweep (one seed; rows committed before this page)',
        '',
        'Sweep `configs/sweeps/scaling_tiny.py`, run once (seed 0) before this page was rewritten; '
        'its rows are `docs/scaling_study/results.jsonl` and are refitted here by the current '
        'code. Same model and muP setup as section 1, widths 32-128 fitted and 256 held out. Per '
        'width one constant-LR run of 600 steps; 1-sqrt cooldowns over the last 20% branch from '
        'it to end at 150, 300 and 600 steps. Loss: held-out, 8 batches, at the end of each '
        'cooldown. The eval set (8 batches) is not the one of section 1 (4 batches), so losses '
        'of the two sections are not comparable.',
        '',
        '| d_model | N (non-embedding) | ' + ' | '.join(f'{b} steps ({b * 2048 / 1e6:.2f}M tok)'
                                                      for b in budgets)
        + ' | constant LR at 600, no cooldown |',
        '|---|---|' + '---|' * (len(budgets) + 1),
    ]
    for w in widths:
        held = ' (held out)' if cell[w, budgets[0]].get('heldout') else ''
        no_cd = parents[w]['evals'][-1]['loss'] if w in parents and parents[w]['evals'] else math.nan
        lines.append(f'| {w}{held} | {cell[w, budgets[0]]["params"]:,} | '
                     + ' | '.join(f'{cell[w, b]["final_loss"]:.4f}' for b in budgets)
                     + f' | {no_cd:.4f} |')
    ch, pl = fits.get('chinchilla'), fits.get('power_law')
    lines.append('')
    if ch:
        ci = ch.get('ci', {})
        rng = lambda k: f' [{ci[k][0]:.3g}, {ci[k][1]:.3g}]' if k in ci else ''  # noqa: E731
        lines.append(
            f'Chinchilla approach 3 (held-out width excluded): L(N, D) = {ch["E"]:.3f} + '
            f'{ch["A"]:.3g} / N^{ch["alpha"]:.3f} + {ch["B"]:.3g} / D^{ch["beta"]:.3f}; bootstrap '
            f'95% intervals: alpha{rng("alpha")}, beta{rng("beta")}, E{rng("E")}.')
    if pl:
        lines.append(f'Power law through the compute frontier: L(C) = {pl["E"]:.3f} + '
                     f'{pl["A"]:.3g} C^-{pl["alpha"]:.4f}.')
    if fits.get('heldout'):
        lines += ['', '| held-out run | measured | Chinchilla L(N, D) | power law L(C) |',
                  '|---|---|---|---|']
        for e in fits['heldout']:
            fmt = lambda k: f'{e[k]:.4f} ({e[k] - e["measured"]:+.4f})' if k in e else 'n/a'  # noqa: E731
            lines.append(f'| {e["name"]} | {e["measured"]:.4f} | {fmt("chinchilla")} | '
                         f'{fmt("power_law")} |')
        lines += ['', 'In brackets: predicted minus measured (nats/token).']
    if 'annealing' in fits:
        lines += ['', 'The LR-annealing check of this sweep, redone with the rules of section 1: '
                  'per width, the law is fitted on the constant run and the 150- and 300-step '
                  'cooldowns (training loss: this sweep evaluated only every 150 steps) and '
                  'scored on the 600-step cooldown after its branch step only.', '',
                  '| d_model | points scored (steps) | final error (nats) | final error (% of '
                  'loss) | RMSE | noise floor | bounds hit |', '|---|---|---|---|---|---|---|']
        by_name = {r['name']: r for r in rows}
        for key, g in fits['annealing']['groups'].items():
            if 'error' in g:
                continue
            for s in g['predictions']:
                lines.append(f'| {by_name[key]["width"]} | {s["n_points"]} ({s["first_step"]}-'
                             f'{s["last_step"]}) | {s["final_error"]:+.4f} | '
                             f'{s["final_error_pct"]:+.2f}% | {s["rmse"]:.4f} | '
                             f'{s["noise_floor"]:.4f} | {"; ".join(g["law"]["at_bounds"]) or "no"} |')
    lines += ['', '![loss vs tokens per width with the fitted law](scaling_study/loss_vs_tokens.png)',
              '', '![power law through the frontier](scaling_study/power_law.png)', '']
    return lines


def write(table: dict[str, Any], scaling_fits: dict[str, Any],
          scaling_rows: Sequence[dict[str, Any]], path: str) -> None:
    lines = [
        '# Scaling study: the LR-annealing law on unseen cooldowns, and a width x budget sweep',
        '',
        'Generated by `python -m experiments.scaling_study` with the sweep runner '
        '(`python -m pretrain.sweep`) and the fits of `python -m pretrain.fit`. Rows, fits and '
        'plots: `docs/scaling_study/annealing/` (section 1) and `docs/scaling_study/` (section '
        '2). Section 1 is new; section 2 keeps the earlier sweep\'s numbers where they are still '
        'supported, labelled as one seed. Where a claim would need runs that do not exist, the '
        'page says "not shown".',
        '',
    ]
    lines += annealing_section(table)
    lines += ['### What section 1 shows', '', ANNEALING_FINDINGS.strip(), '']
    lines += scaling_section(scaling_fits, scaling_rows)
    lines += ['### What section 2 shows', '', SCALING_FINDINGS.strip(), '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


# Written after reading docs/scaling_study/annealing/summary.json and docs/scaling_study/fits.json.
ANNEALING_FINDINGS = """
"""

SCALING_FINDINGS = """
"""
