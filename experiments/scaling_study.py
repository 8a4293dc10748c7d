"""docs/scaling_study.md: the LR-annealing law checked on unseen cooldowns, and the earlier sweep.

    python -m experiments.scaling_study [--workdir=runs/sweeps/annealing_tiny] [--parallel=0]

Runs configs/sweeps/annealing_tiny.py with the sweep runner (resumable: finished runs are
skipped), fits it with pretrain.study.fit and writes its outputs under
docs/scaling_study/annealing/. The earlier width x budget sweep (configs/sweeps/scaling_tiny.py,
rows committed in docs/scaling_study/results.jsonl) is refitted from those rows with the same
code (`--scaling_workdir=DIR` re-runs that sweep first). Every number in the page is computed
here from the rows; the prose says only what the tables show.
"""

import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from experiments import scaling_study_page as page
from pretrain.jsonable import jsonable
from pretrain.study import annealing, fit, laws, plots, results, runner

ANNEALING_SWEEP = 'configs/sweeps/annealing_tiny.py'
SCALING_SWEEP = 'configs/sweeps/scaling_tiny.py'
DOCS = 'docs'
OUT = os.path.join(DOCS, 'scaling_study')
ANNEALING_OUT = os.path.join(OUT, 'annealing')
# The paper's momentum decay is 0.999 (a timescale of 1000 steps, longer than these runs); the
# variant picks one of these per width and seed by the error on the fitted curves alone.
LAMS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)

# The trainer, imported later in this process, defines --workdir too: allow_override lets it.
_WORKDIR = flags.DEFINE_string('workdir', 'runs/sweeps/annealing_tiny', 'Annealing sweep folder.',
                               allow_override=True)
_PARALLEL = flags.DEFINE_integer('parallel', 0, 'Runs at once (0: in this process, in turn).',
                                 lower_bound=0)
_SCALING_WORKDIR = flags.DEFINE_string(
    'scaling_workdir', '', 'Re-run configs/sweeps/scaling_tiny.py here first (default: refit the '
    'committed rows of docs/scaling_study/results.jsonl).')
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 200, 'Bootstrap resamples of the earlier sweep.')


def cooldown_kind(name: str) -> str:
    """'constant', 'linear-0.2', ... from a run name such as 'd_model=32,seed=0.cooldown600-linear-0.2'."""
    if name.endswith('.constant'):
        return 'constant'
    return re.search(r'\.cooldown\d+-(.+)$', name)[1]


def chosen_lam_groups(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The same fits with the momentum decay chosen per group from LAMS on the fitted curves."""
    groups = {}
    for key, group in fit.annealing_groups(rows).items():
        groups[key] = fit.fit_annealing_group(group, LAMS)
        groups[key].pop('_curves')
    return groups


def annealing_table(groups: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per width and cooldown kind, over seeds: the errors of the law on unseen points, the
    noise floor, and the spread of the measured final loss; per width the fitted constants."""
    by_name = {r['name']: r for r in rows}
    cells: dict[tuple[int, str], list[dict[str, Any]]] = {}
    laws_by_width: dict[int, list[dict[str, Any]]] = {}
    for key, group in groups.items():
        width = by_name[key]['width']
        laws_by_width.setdefault(width, []).append({**group['law'], 'seed': by_name[key]['seed']})
        for role, scores in (('fitted', group['in_sample']), ('predicted', group['predictions'])):
            for s in scores:
                if role == 'fitted' and s['run'] == key:
                    continue            # the constant run: its last point is not a cooldown end
                cells.setdefault((width, cooldown_kind(s['run'])), []).append({**s, 'role': role})
    table = []
    order = lambda item: (item[0][0], item[1][0]['role'] != 'fitted', item[0][1])  # noqa: E731
    for (width, kind), scores in sorted(cells.items(), key=order):
        def stats(field: str) -> tuple[float, float]:
            v = np.array([float(s[field]) for s in scores])
            return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan
        table.append({
            'width': width, 'cooldown': kind, 'role': scores[0]['role'], 'seeds': len(scores),
            'params': by_name[scores[0]['run']]['params'],
            'points_scored': scores[0]['n_points'],
            'steps_scored': [scores[0]['first_step'], scores[0]['last_step']],
            'final_measured': stats('final_measured'), 'final_error': stats('final_error'),
            'final_error_pct': stats('final_error_pct'), 'rmse': stats('rmse'),
            'noise_floor': stats('noise_floor'),
        })
    return {'cells': table, 'laws': {str(w): v for w, v in sorted(laws_by_width.items())},
            'noise_floor_definition': annealing.NOISE_FLOOR_DEFINITION,
            'alpha_range': list(annealing.ALPHA_RANGE)}


def plot_predictions(fits: dict[str, Any], rows: Sequence[dict[str, Any]], path: str) -> None:
    """Top: seed 0 of each width, measured eval loss (points) and the law (lines) from step 400;
    bottom: predicted minus measured on the unseen points, every seed."""
    plt = plots.pyplot()
    widths = sorted({r['width'] for r in rows})
    fig, axes = plt.subplots(2, len(widths), figsize=(6 * len(widths), 8), squeeze=False)
    colors = {'constant': '0.5', 'linear-0.2': 'C0', 'linear-0.1': 'C1', '1-sqrt-0.2': 'C2'}
    for j, width in enumerate(widths):
        top, bottom = axes[0][j], axes[1][j]
        for key, group in fits['annealing']['groups'].items():
            law = annealing.AnnealingLaw(**{**group['law'], 'at_bounds': ()})
            seed = next(r['seed'] for r in rows if r['name'] == key)
            if next(r['width'] for r in rows if r['name'] == key) != width:
                continue
            for r in (r for r in rows if r['name'] == key or r.get('parent') == key):
                kind = cooldown_kind(r['name'])
                lrs, _, _ = annealing.curve_to_schedule(r['curve'])
                pred = annealing.predict_annealing(law, lrs)
                evals = [(e['step'], e['loss']) for e in r['evals']
                         if e['step'] > max(400, r.get('branch_step') or 0)]
                steps = np.array([s for s, _ in evals])
                measured = np.array([v for _, v in evals])
                if seed == 0:
                    role = 'predicted' if r.get('heldout') else 'fitted'
                    top.scatter(steps, measured, s=8, color=colors[kind], alpha=0.7)
                    start = max(400, r.get('branch_step') or 0)
                    top.plot(np.arange(start + 1, len(lrs) + 1), pred[start:], color=colors[kind],
                             ls='--' if r.get('heldout') else '-', label=f'{kind} ({role})')
                if r.get('heldout'):
                    bottom.plot(steps, pred[steps - 1] - measured, color=colors[kind], alpha=0.8,
                                label=f'{kind} (seeds: one line each)' if seed == 0 else None)
        top.set(title=f'd_model {width}, seed 0: eval loss (points) and the law (lines)',
                xlabel='step', ylabel='held-out loss (nats/token)')
        top.legend(fontsize=7)
        bottom.axhline(0.0, color='k', lw=0.8)
        bottom.set(title=f'd_model {width}: predicted - measured on unseen points, 3 seeds',
                   xlabel='step', ylabel='error (nats)')
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value   # 'inf' strings stay


def slim_copy(src: str, dst: str) -> None:
    """results.jsonl for the docs: without each run's full config (its overrides stay), losses
    to 1e-6 nats and LRs to 8 significant digits (far below the noise; a smaller commit)."""
    with open(src) as f, open(dst, 'w') as out:
        for line in f:
            row = json.loads(line)
            row.pop('config', None)
            row['curve'] = [[s, _round(loss), float(f'{lr:.8g}')] for s, loss, lr in row['curve']]
            row['evals'] = [{k: _round(v) for k, v in e.items()} for e in row['evals']]
            out.write(json.dumps(row) + '\n')


def run_annealing(workdir: str, parallel: int) -> dict[str, Any]:
    code = runner.run_sweep(runner.SweepOptions(ANNEALING_SWEEP, workdir, parallel=parallel))
    if code:
        raise SystemExit(code)
    os.makedirs(ANNEALING_OUT, exist_ok=True)
    slim_copy(os.path.join(workdir, 'results.jsonl'), os.path.join(ANNEALING_OUT, 'results.jsonl'))
    fits = fit.run(ANNEALING_OUT, n_boot=0)
    rows = results.load_results(ANNEALING_OUT)
    plot_predictions(json.loads(json.dumps(fits)), rows, os.path.join(ANNEALING_OUT, 'prediction.png'))
    table = annealing_table(fits['annealing']['groups'], rows)
    table['wall_s'] = sum(r['wall_s'] for r in rows)
    table['chosen_lam'] = annealing_table(chosen_lam_groups(rows), rows)
    table['chosen_lam']['lams'] = list(LAMS)
    with open(os.path.join(ANNEALING_OUT, 'summary.json'), 'w') as f:
        json.dump(jsonable(table), f, indent=1)
    return table


def run_scaling(scaling_workdir: str, n_boot: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Refits the earlier sweep's rows (re-running the sweep first when asked)."""
    if scaling_workdir:
        code = runner.run_sweep(runner.SweepOptions(SCALING_SWEEP, scaling_workdir, parallel=0))
        if code:
            raise SystemExit(code)
        slim_copy(os.path.join(scaling_workdir, 'results.jsonl'), os.path.join(OUT, 'results.jsonl'))
    fits = fit.run(OUT, n_boot=n_boot)
    rows = results.load_results(OUT)
    if 'chinchilla' in fits:
        law = laws.Chinchilla(*(fits['chinchilla'][k] for k in ('E', 'A', 'B', 'alpha', 'beta')))
        page.plot_loss_vs_tokens(rows, law, os.path.join(OUT, 'loss_vs_tokens.png'))
    return json.loads(json.dumps(jsonable(fits))), rows


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    table = run_annealing(_WORKDIR.value, _PARALLEL.value)
    scaling_fits, scaling_rows = run_scaling(_SCALING_WORKDIR.value, _BOOTSTRAP.value)
    page.write(table, scaling_fits, scaling_rows, os.path.join(DOCS, 'scaling_study.md'))
    shutil.rmtree(os.path.join(OUT, '__pycache__'), ignore_errors=True)
    print(f'wrote {os.path.join(DOCS, "scaling_study.md")}, {OUT}/ and {ANNEALING_OUT}/')


if __name__ == '__main__':
    app.run(main)
