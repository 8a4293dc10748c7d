"""Scaling-law and LR-optimum fits, and the fit driver, on synthetic data with known parameters."""

import json
import math
import os

import numpy as np
import pytest

from pretrain.study import annealing, fit, laws, results
from tests.test_annealing import schedules


def chinchilla_data(truth: laws.Chinchilla, noise: float = 0.003, seed: int = 0):
    """An 8 x 8 grid of N in [1e7, 1e10] and D in [1e8, 1e12], loss times exp(N(0, noise))."""
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e8, 1e12, 8))
    n, d = n.ravel(), d.ravel()
    return n, d, truth(n, d) * np.exp(rng.normal(0.0, noise, n.shape))


@pytest.mark.parametrize('truth', [laws.HOFFMANN, laws.BESIROGLU], ids=['hoffmann', 'besiroglu'])
def test_chinchilla_recovers_published_constants(truth):
    got = laws.fit_chinchilla(*chinchilla_data(truth))
    assert abs(got.alpha - truth.alpha) < 0.02
    assert abs(got.beta - truth.beta) < 0.02
    assert abs(got.E - truth.E) < 0.05
    assert got.A == pytest.approx(truth.A, rel=0.15)
    assert got.B == pytest.approx(truth.B, rel=0.15)


def test_chinchilla_objective_is_a_sum_not_a_mean():
    n, d, l = chinchilla_data(laws.HOFFMANN)
    x = (6.0, 6.0, 0.5, 0.3, 0.3)      # (a, b, e, alpha, beta), away from the optimum
    one = laws.chinchilla_objective(x, n, d, l)
    two = laws.chinchilla_objective(x, np.tile(n, 2), np.tile(d, 2), np.tile(l, 2))
    assert two == pytest.approx(2 * one, rel=1e-12)
    # Huber(1e-3): quadratic inside delta, linear outside.
    truth = laws.chinchilla_start(laws.HOFFMANN)[0]
    exact = laws.HOFFMANN(n, d)
    assert laws.chinchilla_objective(truth, n, d, exact) == pytest.approx(0.0, abs=1e-20)
    r = 0.01
    assert laws.chinchilla_objective(truth, n, d, exact * math.exp(-r)) == pytest.approx(
        len(n) * 1e-3 * (r - 0.5e-3), rel=1e-6)


def test_chinchilla_optimal_allocation():
    c = np.array([1e20, 1e22])
    n_opt, d_opt = laws.chinchilla_optimal(laws.HOFFMANN, c)
    np.testing.assert_allclose(6 * n_opt * d_opt, c, rtol=1e-12)
    # No other split of the same budget is better.
    for ci, ni in zip(c, n_opt):
        for f in (0.8, 1.25):
            assert laws.HOFFMANN(ni * f, ci / (6 * ni * f)) > laws.HOFFMANN(ni, ci / (6 * ni))
    assert laws.HOFFMANN.n_exponent + laws.HOFFMANN.d_exponent == pytest.approx(1.0)


def test_power_law_recovers_parameters():
    rng = np.random.default_rng(1)
    truth = laws.PowerLaw(E=2.0, A=1e3, alpha=0.15)
    c = np.geomspace(1e15, 1e22, 15)
    got = laws.fit_power_law(c, truth(c) * np.exp(rng.normal(0.0, 0.002, c.shape)))
    assert got.E == pytest.approx(truth.E, abs=0.05)
    assert got.alpha == pytest.approx(truth.alpha, abs=0.01)
    assert got.A == pytest.approx(truth.A, rel=0.5)       # A is exponentially sensitive to alpha
    np.testing.assert_allclose(got(c), truth(c), rtol=0.01)


def test_isoflop_recovers_exponents():
    rng = np.random.default_rng(2)
    truth = laws.HOFFMANN
    n, d, l, budget = [], [], [], []
    for c in np.geomspace(1e18, 1e21, 4):
        n_opt, _ = laws.chinchilla_optimal(truth, c)
        # Off-centre samples, a different offset per budget, as in a real sweep.
        ns = n_opt * 10 ** (np.linspace(-0.7, 0.7, 9) + rng.uniform(-0.1, 0.1))
        n += list(ns)
        d += list(c / (6 * ns))
        l += list(truth(ns, c / (6 * ns)))
        budget += [c] * len(ns)
    iso = laws.fit_isoflop(n, d, l, budget)
    assert iso.a == pytest.approx(truth.n_exponent, abs=0.02)
    assert iso.b == pytest.approx(truth.d_exponent, abs=0.02)
    assert len(iso.minima) == 4 and not iso.skipped


def test_isoflop_skips_small_budgets():
    with pytest.raises(ValueError, match='usable budgets'):
        laws.fit_isoflop([1, 2, 3, 4], [4, 3, 2, 1], [3, 2, 2, 3], [1, 1, 2, 2])


def test_optimal_lr_parabola_edges_and_divergence():
    lrs = 2.0 ** np.arange(-12, -4)
    losses = 3.0 + 0.05 * (np.log2(lrs) + 8.3) ** 2
    opt = laws.optimal_lr(lrs, losses)
    assert math.log2(opt.lr) == pytest.approx(-8.3, abs=1e-9)
    assert opt.loss == pytest.approx(3.0)
    assert not opt.at_edge and not opt.diverged_above
    # Minimum past the largest LR: flagged, the grid's best point returned.
    edge = laws.optimal_lr(lrs, 3.0 + 0.05 * (np.log2(lrs) + 2) ** 2)
    assert edge.at_edge and edge.lr == lrs[-1]
    # Diverged runs (inf, NaN) are ignored; the best finite point at the top is an edge too.
    div = losses.copy()
    div[-2:] = [math.inf, math.nan]
    opt2 = laws.optimal_lr(lrs, div)
    assert math.log2(opt2.lr) == pytest.approx(-8.3, abs=1e-9)
    cut = losses.copy()
    cut[5:] = math.inf
    opt3 = laws.optimal_lr(lrs, cut)
    assert opt3.at_edge and opt3.diverged_above and opt3.lr == lrs[4]
    with pytest.raises(ValueError, match='diverged'):
        laws.optimal_lr(lrs, np.full(len(lrs), math.inf))


def test_optima_per_width():
    rows = [{'width': w, 'lr': lr, 'final_loss': 3.0 + 0.1 * (math.log2(lr) - shift) ** 2}
            for w, shift in ((64, -7.0), (128, -8.0)) for lr in 2.0 ** np.arange(-11, -4)]
    rows.append({'width': 128, 'lr': 2.0 ** -4, 'final_loss': None})   # diverged
    opts = laws.optima_per_width(rows)
    assert list(opts) == [64, 128]
    assert math.log2(opts[64].lr) == pytest.approx(-7.0)
    assert math.log2(opts[128].lr) == pytest.approx(-8.0)


def test_bootstrap_intervals_contain_truth():
    rng = np.random.default_rng(4)
    truth = laws.PowerLaw(E=2.0, A=50.0, alpha=0.3)
    c = np.geomspace(1e6, 1e12, 20)
    rows = [{'flops': ci, 'final_loss': li, 'seed': i % 5}
            for i, (ci, li) in enumerate(zip(c, truth(c) * np.exp(rng.normal(0, 0.01, c.shape))))]
    start = None

    def fit_fn(rs):
        return laws.fit_power_law([r['flops'] for r in rs], [r['final_loss'] for r in rs],
                                 starts=start)

    best = fit_fn(rows)
    start = laws.power_law_start(best, c)
    ci = fit.bootstrap(fit_fn, [{k: v for k, v in r.items() if k != 'seed'} for r in rows], n=60)
    for key in ('E', 'alpha'):
        low, high = ci[key]
        assert low < getattr(truth, key) < high, (key, ci[key])
        assert low <= getattr(best, key) <= high
    # With seeds, whole seeds are resampled: still an interval around the estimate.
    ci_seed = fit.bootstrap(fit_fn, rows, n=30, seed=1)
    assert ci_seed['alpha'][0] <= best.alpha <= ci_seed['alpha'][1]


def test_entry_point_writes_fits_summary_and_plots(tmp_path):
    truth = laws.HOFFMANN
    rows = []
    for c in (1e17, 1e18, 1e19, 1e20):
        n_opt, _ = laws.chinchilla_optimal(truth, c)
        for i, f in enumerate((0.25, 0.5, 1.0, 2.0, 4.0)):
            n = n_opt * f
            rows.append({'name': f'c{c:.0e}_n{i}', 'params': n, 'tokens': c / (6 * n), 'flops': c,
                         'final_loss': float(truth(n, c / (6 * n)))})
    for w, shift in ((64, -7.0), (128, -8.0)):
        for lr in 2.0 ** np.arange(-10, -4):
            rows.append({'name': f'w{w}_lr{lr:g}', 'width': w, 'lr': float(lr),
                         'final_loss': 3.0 + 0.1 * (math.log2(lr) - shift) ** 2})
    law = annealing.AnnealingLaw(L0=2.5, A=0.8, alpha=0.5, C=0.3)
    for name, lrs in schedules(steps=400, warmup=20).items():
        losses = annealing.predict_annealing(law, lrs)
        curve = [[s, float(losses[s - 1]), float(lrs[s - 1])] for s in range(1, 401)]
        rows.append({'name': name, 'params': 1e6, 'curve': curve})
    with open(tmp_path / 'results.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)

    fits = fit.run(str(tmp_path), n_boot=5)
    on_disk = json.loads((tmp_path / 'fits.json').read_text())
    assert on_disk['n_runs'] == len(rows)
    for key in ('power_law', 'chinchilla', 'isoflop', 'lr_optima', 'annealing'):
        assert key in on_disk, on_disk['skipped']
    assert on_disk['chinchilla']['alpha'] == pytest.approx(truth.alpha, abs=0.05)
    assert on_disk['isoflop']['a'] == pytest.approx(truth.n_exponent, abs=0.03)
    assert set(on_disk['chinchilla']['ci']) >= {'alpha', 'beta', 'n_exponent'}
    assert on_disk['lr_optima']['log2_lr_vs_log2_width_slope'] == pytest.approx(-1.0, abs=1e-6)
    # No lineage, nothing held out: fitted on the first curves, the last one predicted.
    group = on_disk['annealing']['groups']['N=1000000.0,seed=None']
    assert group['fitted_on'] == ['constant', 'cosine'] and group['loss_source'].startswith('training loss')
    (pred,) = group['predictions']
    assert pred['run'] == 'wsd' and (pred['first_step'], pred['last_step']) == (20, 400)
    assert pred['rmse'] < 0.02 and all(s['rmse'] < 0.02 for s in group['in_sample'])
    summary = (tmp_path / 'fit_summary.md').read_text()
    assert '## Chinchilla approach 3' in summary and '## Optimum LR per width' in summary
    for path in fits['files']:
        assert os.path.getsize(path) > 1000 and path.endswith('.png')
    assert len(fits['files']) == 4


def test_entry_point_skips_with_reasons(tmp_path, capsys):
    (tmp_path / 'results.jsonl').write_text(json.dumps({'name': 'a', 'final_loss': 3.0}) + '\n')
    fits = fit.run(str(tmp_path), n_boot=0)
    assert set(fits['skipped']) == {'power_law', 'chinchilla', 'isoflop', 'lr_optima', 'annealing'}
    assert 'skipping chinchilla' in capsys.readouterr().out
    assert (tmp_path / 'fit_summary.md').exists()


def test_curve_read_from_metrics_file(tmp_path):
    lines = [{'step': 1, 'split': 'train', 'loss': 5.0, 'lr': 1e-3},
             {'step': 2, 'split': 'train', 'loss': 4.0, 'lr': 1e-3},
             {'step': 2, 'split': 'eval', 'loss': 4.5},
             {'step': 2, 'split': 'train', 'loss': 3.9, 'lr': 1e-3}]    # resumed: the later wins
    (tmp_path / 'm.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines) + '{"step": 3')
    (tmp_path / 'results.jsonl').write_text(
        json.dumps({'name': 'a', 'params': 10.0, 'tokens': 20.0, 'metrics': 'm.jsonl'}) + '\n')
    (row,) = results.load_results(str(tmp_path))
    assert row['curve'] == [[1, 5.0, 1e-3], [2, 3.9, 1e-3]]
    assert row['flops'] == 6 * 10.0 * 20.0


def test_import_defines_no_flags():
    from absl import flags
    assert 'sweep_dir' not in flags.FLAGS


def test_frontier_without_shared_budgets_is_the_pareto_front():
    rows = [{'flops': c, 'final_loss': l} for c, l in
            ((1e15, 4.0), (2.1e15, 4.2), (4.3e15, 3.5), (8.7e15, 3.6), (1.9e16, 3.1), (4.1e16, 2.9))]
    c, loss = fit._frontier(rows)
    assert c.tolist() == [1e15, 4.3e15, 1.9e16, 4.1e16] and loss.tolist() == [4.0, 3.5, 3.1, 2.9]
    # Two runs that happen to round to one budget do not make the budgets shared.
    rows.append({'flops': 1.01e15, 'final_loss': 4.1})
    assert fit._frontier(rows)[0].tolist() == [1e15, 4.3e15, 1.9e16, 4.1e16]


def test_jsonable_is_strict_json():
    from pretrain.jsonable import jsonable
    value = {1: np.float32(1.5), 'x': (math.inf, -math.inf, math.nan, np.int64(3), np.bool_(True)),
             'a': np.array([0.25, math.nan])}
    out = jsonable(value)
    assert out == {'1': 1.5, 'x': ['inf', '-inf', 'nan', 3, True], 'a': [0.25, 'nan']}
    assert json.loads(json.dumps(out, allow_nan=False)) == out
