"""The LR-annealing law: areas by hand, recovery of known constants, bounds, unseen-only scores."""

import math

import numpy as np
import pytest

from pretrain.study import annealing, fit
from pretrain.study.annealing import AnnealingLaw, Curve


def test_annealing_areas_by_hand():
    lrs = [1.0, 1.0, 0.5, 0.25]
    s1, s2 = annealing.annealing_areas(lrs, lam=0.5)
    np.testing.assert_allclose(s1, [1.0, 2.0, 2.5, 2.75])
    # m = [0, 0, 0.5, 0.5*0.5 + 0.25 = 0.5]; S2 = cumsum(m).
    np.testing.assert_allclose(s2, [0.0, 0.0, 0.5, 1.0])
    # Warmup: the rise is negative annealing unless skipped (then m starts at the peak).
    _, s2 = annealing.annealing_areas([0.5, 1.0, 0.5], lam=0.5)
    np.testing.assert_allclose(s2, [0.0, -0.5, -0.25])    # m = [0, -0.5, -0.25 + 0.5]
    _, s2 = annealing.annealing_areas([0.5, 1.0, 0.5], lam=0.5, skip_warmup=True)
    np.testing.assert_allclose(s2, [0.0, 0.0, 0.5])


def test_wsd_areas_by_hand():
    """Constant 2e-3 for 4 updates, then a linear cooldown to 0 over 4: drops of 5e-4 each."""
    lrs = [2e-3] * 4 + [1.5e-3, 1e-3, 5e-4, 0.0]
    s1, s2 = annealing.annealing_areas(lrs, lam=0.9)
    np.testing.assert_allclose(s1, np.cumsum(lrs))
    assert s1[-1] == pytest.approx(8e-3 + 3e-3)
    # m_4 = 5e-4, m_5 = 0.9 * 5e-4 + 5e-4 = 9.5e-4, m_6 = 0.9 * 9.5e-4 + 5e-4 = 1.355e-3,
    # m_7 = 0.9 * 1.355e-3 + 5e-4 = 1.7195e-3; S2 = their running sum.
    np.testing.assert_allclose(s2, [0, 0, 0, 0, 5e-4, 1.45e-3, 2.805e-3, 4.5245e-3], atol=1e-12)


def schedules(steps: int = 2000, peak: float = 1e-3, warmup: int = 100) -> dict[str, np.ndarray]:
    t = np.arange(steps)
    ramp = np.minimum(1.0, (t + 1) / warmup)
    cos = np.where(t < warmup, ramp, 0.5 * (1 + np.cos(np.pi * (t - warmup) / (steps - warmup))))
    decay = int(0.8 * steps)
    wsd = np.where(t < decay, ramp, 1.0 - (t - decay) / (steps - decay))
    return {'constant': peak * ramp, 'cosine': peak * cos, 'wsd': peak * wsd}


def dense(lrs: np.ndarray, losses: np.ndarray, name: str = '', seen_until: int = 0) -> Curve:
    return Curve(lrs, np.arange(1, len(lrs) + 1), losses, name=name, seen_until=seen_until)


def test_synthetic_curves_recover_the_law_and_predict_another_schedule():
    truth = AnnealingLaw(L0=2.5, A=0.8, alpha=0.5, C=0.3)
    rng = np.random.default_rng(3)
    sched = schedules()
    exact = {k: annealing.predict_annealing(truth, v) for k, v in sched.items()}
    noisy = [dense(sched[k], exact[k] + rng.normal(0.0, 0.002, len(exact[k])), k)
             for k in ('constant', 'cosine')]
    got = annealing.fit_annealing(noisy, min_step=100)
    assert got.alpha == pytest.approx(truth.alpha, abs=0.05)
    assert got.L0 == pytest.approx(truth.L0, abs=0.05)
    assert got.C == pytest.approx(truth.C, rel=0.05)
    assert got.at_bounds == ()
    pred = annealing.predict_annealing(got, sched['wsd'])
    assert np.abs(pred - exact['wsd'])[100:].max() < 0.01
    # Sparse curves (every 50 steps, no noise) recover the constants themselves.
    steps = np.arange(1, 2001, 50)
    sparse = [Curve(sched[k], steps, exact[k][steps - 1]) for k in ('constant', 'cosine')]
    got2 = annealing.fit_annealing(sparse)          # default: from each curve's peak LR
    assert (got2.L0, got2.A, got2.alpha, got2.C) == pytest.approx((2.5, 0.8, 0.5, 0.3), rel=1e-4)


@pytest.mark.parametrize('truth, bound', [
    (AnnealingLaw(L0=2.5, A=0.8, alpha=1.5, C=0.3), 'alpha = 0.8 (upper bound)'),
    (AnnealingLaw(L0=2.5, A=0.8, alpha=0.5, C=-0.3), 'C = 0 (bound: >= 0)'),
    (AnnealingLaw(L0=-1.0, A=4.0, alpha=0.3, C=0.3), 'L0 = 0 (bound: >= 0)'),
])
def test_unphysical_truth_ends_on_a_reported_bound(truth, bound):
    sched = schedules()
    curves = [dense(sched[k], annealing.predict_annealing(truth, sched[k])) for k in ('constant', 'wsd')]
    got = annealing.fit_annealing(curves)
    assert bound in got.at_bounds
    assert got.L0 >= 0 and got.A >= 0 and got.C >= 0
    assert annealing.ALPHA_RANGE[0] <= got.alpha <= annealing.ALPHA_RANGE[1]


def test_choosing_lam_finds_the_generating_one():
    truth = AnnealingLaw(L0=2.5, A=0.8, alpha=0.5, C=30.0, lam=0.99)
    sched = schedules()
    curves = [dense(sched[k], annealing.predict_annealing(truth, sched[k])) for k in ('constant', 'wsd')]
    got = annealing.fit_annealing_choosing_lam(curves, lams=(0.9, 0.99, 0.999))
    assert got.lam == 0.99 and got.C == pytest.approx(30.0, rel=1e-3)
    assert annealing.squared_error(got, curves) < 1e-12


def test_noise_floor_by_hand():
    # A straight fall has no scatter around its local trend; neither has a constant.
    assert annealing.noise_floor(3.0 - 1e-3 * np.arange(10, 60, 10)) == pytest.approx(0.0, abs=1e-12)
    # +d, -d, +d, -d, +d: every second difference is +-4d, so sqrt(16 d^2 / 6) = d sqrt(8/3).
    d = 0.01
    signs = np.array([1, -1, 1, -1, 1])
    assert annealing.noise_floor(2.0 + d * signs) == pytest.approx(d * math.sqrt(8 / 3))
    # Independent noise of std 0.02 on a smooth decay: the floor estimates 0.02.
    rng = np.random.default_rng(0)
    y = 2.0 + np.exp(-np.arange(2000) / 500) + rng.normal(0.0, 0.02, 2000)
    assert annealing.noise_floor(y) == pytest.approx(0.02, rel=0.05)
    assert math.isnan(annealing.noise_floor(np.ones(4)))


def test_score_uses_only_points_after_the_branch():
    law = AnnealingLaw(L0=2.0, A=0.0, alpha=0.5, C=0.0)    # predicts 2.0 everywhere
    lrs = np.full(600, 1e-3)
    steps = np.arange(10, 601, 10)                          # 60 logged points
    losses = np.where(steps <= 480, 2.0, 2.5)              # after the branch: off by 0.5
    whole = annealing.score(law, Curve(lrs, steps, losses, 'cooldown'))
    unseen = annealing.score(law, Curve(lrs, steps, losses, 'cooldown', seen_until=480))
    assert whole.n_points == 60 and whole.rmse == pytest.approx(0.5 * math.sqrt(12 / 60))
    assert (unseen.n_points, unseen.first_step, unseen.last_step) == (12, 490, 600)
    assert unseen.rmse == pytest.approx(0.5) and unseen.mean_error == pytest.approx(-0.5)
    assert unseen.final_error == pytest.approx(-0.5) and unseen.final_error_pct == pytest.approx(-20.0)
    assert unseen.noise_floor == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match='no point after step 600'):
        annealing.score(law, Curve(lrs, steps, losses, 'x', seen_until=600))


def sweep_rows(law: AnnealingLaw) -> list[dict]:
    """A constant parent of 600 steps and three cooldowns branched from it, as the sweep writes
    them: each cooldown's curve and evals repeat the parent's up to the branch step."""
    def lrs(branch, decay, shape):
        t = np.arange(600)
        frac = np.clip((t - branch + 1) / decay, 0.0, 1.0)
        cool = 1 - frac if shape == 'linear' else 1 - np.sqrt(frac)
        return 1e-3 * np.minimum(np.minimum(1.0, (t + 1) / 50), np.where(t >= branch, cool, 1.0))

    rows = []
    for name, branch, decay, shape, heldout in (
            ('p.constant', 0, 0, '', False), ('p.cooldown600-linear-0.2', 480, 120, 'linear', False),
            ('p.cooldown600-linear-0.1', 540, 60, 'linear', True),
            ('p.cooldown600-1-sqrt-0.2', 480, 120, '1-sqrt', True)):
        lr = lrs(branch, decay, shape) if branch else 1e-3 * np.minimum(1.0, (np.arange(600) + 1) / 50)
        loss = annealing.predict_annealing(law, lr)
        rows.append({'name': name, 'kind': 'cooldown' if branch else 'parent', 'heldout': heldout,
                     'parent': 'p.constant' if branch else None, 'branch_step': branch or None,
                     'params': 1e5, 'seed': 0,
                     'curve': [[s, float(loss[s - 1]) + 0.05, float(lr[s - 1])] for s in range(1, 601)],
                     'evals': [{'step': s, 'loss': float(loss[s - 1])} for s in range(5, 601, 5)]})
    return rows


def test_fit_driver_fits_eval_loss_and_scores_unseen_points_only(tmp_path):
    truth = AnnealingLaw(L0=1.2, A=0.3, alpha=0.4, C=0.2)
    result = fit._fit_annealing(sweep_rows(truth), str(tmp_path), 0, [])
    group = result['groups']['p.constant']
    # Fitted on the eval points (the training curve is 0.05 higher and was not used).
    assert group['loss_source'] == 'held-out eval loss'
    assert group['fitted_on'] == ['p.constant', 'p.cooldown600-linear-0.2']
    assert group['law']['L0'] == pytest.approx(1.2, rel=1e-3) and not group['law']['at_bounds']
    constant, cooldown = group['in_sample']
    assert (constant['first_step'], constant['n_points']) == (50, 111)   # after the warmup
    assert (cooldown['first_step'], cooldown['n_points']) == (485, 24)   # after its branch
    short, shape = group['predictions']
    assert (short['run'], short['first_step'], short['n_points']) == ('p.cooldown600-linear-0.1', 545, 12)
    assert (shape['run'], shape['first_step'], shape['n_points']) == ('p.cooldown600-1-sqrt-0.2', 485, 24)
    assert short['rmse'] < 1e-4 and shape['rmse'] < 1e-4
    assert result['alpha_range'] == list(annealing.ALPHA_RANGE)
