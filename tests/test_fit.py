"""Scaling-law, LR-optimum and annealing-law fits on synthetic data with known parameters."""

import json
import math
import os

import numpy as np
import pytest

from pretrain import fit


def chinchilla_data(truth: fit.Chinchilla, noise: float = 0.003, seed: int = 0):
    """An 8 x 8 grid of N in [1e7, 1e10] and D in [1e8, 1e12], loss times exp(N(0, noise))."""
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e8, 1e12, 8))
    n, d = n.ravel(), d.ravel()
    return n, d, truth(n, d) * np.exp(rng.normal(0.0, noise, n.shape))


@pytest.mark.parametrize('truth', [fit.HOFFMANN, fit.BESIROGLU], ids=['hoffmann', 'besiroglu'])
def test_chinchilla_recovers_published_constants(truth):
    got = fit.fit_chinchilla(*chinchilla_data(truth))
    assert abs(got.alpha - truth.alpha) < 0.02
    assert abs(got.beta - truth.beta) < 0.02
    assert abs(got.E - truth.E) < 0.05
    assert got.A == pytest.approx(truth.A, rel=0.15)
    assert got.B == pytest.approx(truth.B, rel=0.15)


def test_chinchilla_objective_is_a_sum_not_a_mean():
    n, d, l = chinchilla_data(fit.HOFFMANN)
    x = (6.0, 6.0, 0.5, 0.3, 0.3)      # (a, b, e, alpha, beta), away from the optimum
    one = fit.chinchilla_objective(x, n, d, l)
    two = fit.chinchilla_objective(x, np.tile(n, 2), np.tile(d, 2), np.tile(l, 2))
    assert two == pytest.approx(2 * one, rel=1e-12)
    # Huber(1e-3): quadratic inside delta, linear outside.
    truth = fit.chinchilla_start(fit.HOFFMANN)[0]
    exact = fit.HOFFMANN(n, d)
    assert fit.chinchilla_objective(truth, n, d, exact) == pytest.approx(0.0, abs=1e-20)
    r = 0.01
    assert fit.chinchilla_objective(truth, n, d, exact * math.exp(-r)) == pytest.approx(
        len(n) * 1e-3 * (r - 0.5e-3), rel=1e-6)


def test_chinchilla_optimal_allocation():
    c = np.array([1e20, 1e22])
    n_opt, d_opt = fit.chinchilla_optimal(fit.HOFFMANN, c)
    np.testing.assert_allclose(6 * n_opt * d_opt, c, rtol=1e-12)
    # No other split of the same budget is better.
    for ci, ni in zip(c, n_opt):
        for f in (0.8, 1.25):
            assert fit.HOFFMANN(ni * f, ci / (6 * ni * f)) > fit.HOFFMANN(ni, ci / (6 * ni))
    assert fit.HOFFMANN.n_exponent + fit.HOFFMANN.d_exponent == pytest.approx(1.0)


def test_power_law_recovers_parameters():
    rng = np.random.default_rng(1)
    truth = fit.PowerLaw(E=2.0, A=1e3, alpha=0.15)
    c = np.geomspace(1e15, 1e22, 15)
    got = fit.fit_power_law(c, truth(c) * np.exp(rng.normal(0.0, 0.002, c.shape)))
    assert got.E == pytest.approx(truth.E, abs=0.05)
    assert got.alpha == pytest.approx(truth.alpha, abs=0.01)
    assert got.A == pytest.approx(truth.A, rel=0.5)       # A is exponentially sensitive to alpha
    np.testing.assert_allclose(got(c), truth(c), rtol=0.01)


def test_isoflop_recovers_exponents():
    rng = np.random.default_rng(2)
    truth = fit.HOFFMANN
    n, d, l, budget = [], [], [], []
    for c in np.geomspace(1e18, 1e21, 4):
        n_opt, _ = fit.chinchilla_optimal(truth, c)
        # Off-centre samples, a different offset per budget, as in a real sweep.
        ns = n_opt * 10 ** (np.linspace(-0.7, 0.7, 9) + rng.uniform(-0.1, 0.1))
        n += list(ns)
        d += list(c / (6 * ns))
        l += list(truth(ns, c / (6 * ns)))
        budget += [c] * len(ns)
    iso = fit.fit_isoflop(n, d, l, budget)
    assert iso.a == pytest.approx(truth.n_exponent, abs=0.02)
    assert iso.b == pytest.approx(truth.d_exponent, abs=0.02)
    assert len(iso.minima) == 4 and not iso.skipped


def test_isoflop_skips_small_budgets():
    with pytest.raises(ValueError, match='usable budgets'):
        fit.fit_isoflop([1, 2, 3, 4], [4, 3, 2, 1], [3, 2, 2, 3], [1, 1, 2, 2])


def test_optimal_lr_parabola_edges_and_divergence():
    lrs = 2.0 ** np.arange(-12, -4)
    losses = 3.0 + 0.05 * (np.log2(lrs) + 8.3) ** 2
    opt = fit.optimal_lr(lrs, losses)
    assert math.log2(opt.lr) == pytest.approx(-8.3, abs=1e-9)
    assert opt.loss == pytest.approx(3.0)
    assert not opt.at_edge and not opt.diverged_above
    # Minimum past the largest LR: flagged, the grid's best point returned.
    edge = fit.optimal_lr(lrs, 3.0 + 0.05 * (np.log2(lrs) + 2) ** 2)
    assert edge.at_edge and edge.lr == lrs[-1]
    # Diverged runs (inf, NaN) are ignored; the best finite point at the top is an edge too.
    div = losses.copy()
    div[-2:] = [math.inf, math.nan]
    opt2 = fit.optimal_lr(lrs, div)
    assert math.log2(opt2.lr) == pytest.approx(-8.3, abs=1e-9)
    cut = losses.copy()
    cut[5:] = math.inf
    opt3 = fit.optimal_lr(lrs, cut)
    assert opt3.at_edge and opt3.diverged_above and opt3.lr == lrs[4]
    with pytest.raises(ValueError, match='diverged'):
        fit.optimal_lr(lrs, np.full(len(lrs), math.inf))


def test_optima_per_width():
    rows = [{'width': w, 'lr': lr, 'final_loss': 3.0 + 0.1 * (math.log2(lr) - shift) ** 2}
            for w, shift in ((64, -7.0), (128, -8.0)) for lr in 2.0 ** np.arange(-11, -4)]
    rows.append({'width': 128, 'lr': 2.0 ** -4, 'final_loss': None})   # diverged
    opts = fit.optima_per_width(rows)
    assert list(opts) == [64, 128]
    assert math.log2(opts[64].lr) == pytest.approx(-7.0)
    assert math.log2(opts[128].lr) == pytest.approx(-8.0)


def test_annealing_areas_by_hand():
    lrs = [1.0, 1.0, 0.5, 0.25]
    s1, s2 = fit.annealing_areas(lrs, lam=0.5)
    np.testing.assert_allclose(s1, [1.0, 2.0, 2.5, 2.75])
    # m = [0, 0, 0.5, 0.5*0.5 + 0.25 = 0.5]; S2 = cumsum(m).
    np.testing.assert_allclose(s2, [0.0, 0.0, 0.5, 1.0])
    # Warmup: the rise is negative annealing unless skipped (then m starts at the peak).
    _, s2 = fit.annealing_areas([0.5, 1.0, 0.5], lam=0.5)
    np.testing.assert_allclose(s2, [0.0, -0.5, -0.25])    # m = [0, -0.5, -0.25 + 0.5]
    _, s2 = fit.annealing_areas([0.5, 1.0, 0.5], lam=0.5, skip_warmup=True)
    np.testing.assert_allclose(s2, [0.0, 0.0, 0.5])


def schedules(steps: int = 2000, peak: float = 1e-3, warmup: int = 100) -> dict[str, np.ndarray]:
    t = np.arange(steps)
    ramp = np.minimum(1.0, (t + 1) / warmup)
    cos = np.where(t < warmup, ramp, 0.5 * (1 + np.cos(np.pi * (t - warmup) / (steps - warmup))))
    decay = int(0.8 * steps)
    wsd = np.where(t < decay, ramp, 1.0 - (t - decay) / (steps - decay))
    return {'constant': peak * ramp, 'cosine': peak * cos, 'wsd': peak * wsd}


def test_annealing_fit_then_predict():
    truth = fit.AnnealingLaw(L0=2.5, A=0.8, alpha=0.5, C=0.3)
    rng = np.random.default_rng(3)
    sched = schedules()
    curves = {k: fit.predict_annealing(truth, v) for k, v in sched.items()}
    noisy = [(sched[k], curves[k] + rng.normal(0.0, 0.002, len(curves[k])))
             for k in ('constant', 'cosine')]
    got = fit.fit_annealing(noisy, min_step=100)
    assert got.alpha == pytest.approx(truth.alpha, abs=0.05)
    assert got.L0 == pytest.approx(truth.L0, abs=0.05)
    assert got.C == pytest.approx(truth.C, rel=0.05)
    pred = fit.predict_annealing(got, sched['wsd'])
    assert np.abs(pred - curves['wsd'])[100:].max() < 0.01
    # Sparse (steps, losses) curves give the same fit as dense ones.
    steps = np.arange(1, 2001, 50)
    sparse = [(sched[k], steps, curves[k][steps - 1]) for k in ('constant', 'cosine')]
    got2 = fit.fit_annealing(sparse)          # default: from each curve's peak LR
    assert got2.alpha == pytest.approx(truth.alpha, abs=1e-4)


def test_curve_to_schedule_interpolates():
    lrs, steps, losses = fit.curve_to_schedule([[10, 2.0, 0.0], [2, 3.0, 1.0], [6, 2.5, 1.0]])
    assert len(lrs) == 10
    np.testing.assert_allclose(lrs[[1, 5, 7, 9]], [1.0, 1.0, 0.5, 0.0])
    np.testing.assert_array_equal(steps, [2, 6, 10])
    np.testing.assert_allclose(losses, [3.0, 2.5, 2.0])


def test_bootstrap_intervals_contain_truth():
    rng = np.random.default_rng(4)
    truth = fit.PowerLaw(E=2.0, A=50.0, alpha=0.3)
    c = np.geomspace(1e6, 1e12, 20)
    rows = [{'flops': ci, 'final_loss': li, 'seed': i % 5}
            for i, (ci, li) in enumerate(zip(c, truth(c) * np.exp(rng.normal(0, 0.01, c.shape))))]
    start = None

    def fit_fn(rs):
        return fit.fit_power_law([r['flops'] for r in rs], [r['final_loss'] for r in rs],
                                 starts=start)

    best = fit_fn(rows)
    start = fit.power_law_start(best, c)
    ci = fit.bootstrap(fit_fn, [{k: v for k, v in r.items() if k != 'seed'} for r in rows], n=60)
    for key in ('E', 'alpha'):
        low, high = ci[key]
        assert low < getattr(truth, key) < high, (key, ci[key])
        assert low <= getattr(best, key) <= high
    # With seeds, whole seeds are resampled: still an interval around the estimate.
    ci_seed = fit.bootstrap(fit_fn, rows, n=30, seed=1)
    assert ci_seed['alpha'][0] <= best.alpha <= ci_seed['alpha'][1]


def test_entry_point_writes_fits_summary_and_plots(tmp_path):
    truth = fit.HOFFMANN
    rows = []
    for c in (1e17, 1e18, 1e19, 1e20):
        n_opt, _ = fit.chinchilla_optimal(truth, c)
        for i, f in enumerate((0.25, 0.5, 1.0, 2.0, 4.0)):
            n = n_opt * f
            rows.append({'name': f'c{c:.0e}_n{i}', 'params': n, 'tokens': c / (6 * n), 'flops': c,
                         'final_loss': float(truth(n, c / (6 * n)))})
    for w, shift in ((64, -7.0), (128, -8.0)):
        for lr in 2.0 ** np.arange(-10, -4):
            rows.append({'name': f'w{w}_lr{lr:g}', 'width': w, 'lr': float(lr),
                         'final_loss': 3.0 + 0.1 * (math.log2(lr) - shift) ** 2})
    law = fit.AnnealingLaw(L0=2.5, A=0.8, alpha=0.5, C=0.3)
    for name, lrs in schedules(steps=400, warmup=20).items():
        losses = fit.predict_annealing(law, lrs)
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
    assert on_disk['annealing']['1000000.0']['heldout']['rmse'] < 0.02
    assert on_disk['annealing']['1000000.0']['heldout']['fit_rmse'] < 0.02
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
    (row,) = fit.load_results(str(tmp_path))
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
