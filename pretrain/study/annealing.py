"""The LR-annealing law (Tissue et al. 2024): L(s) = L0 + A * S1(s)^-alpha - C * S2(s).

S1 is the area under the LR curve up to step s (the "forward area"), S2 the annealing area: the
sum of a momentum of LR drops. The law is fitted on some curves of one model and then predicts
the loss curve of other schedules. Three rules keep that check honest:

- a prediction is scored only on points the fit never saw: for a cooldown branched from a
  fitted run, the steps after its branch step (before it, its loss is the fitted run's);
- the parameters are physical: L0, A, C >= 0 and alpha in `ALPHA_RANGE`; a fit that ends on
  one of these bounds says so (`AnnealingLaw.at_bounds`), since its values are then not
  estimates of the law's constants;
- every error comes with a noise floor (`noise_floor`): how far the measured points scatter
  around their own local trend, below which no prediction can be judged.
"""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize

from pretrain.study.laws import ArrayLike

# The authors' released fitting code constrains L0, A, C, alpha >= 0 and starts alpha on a grid
# over [0, 0.8]; alpha is kept in [0.05, 0.8] here. Towards 0, A S1^-alpha becomes a constant
# plus a logarithm that trades off against L0 (the degenerate fit: alpha 0.01, L0 about -30).
# A fit that ends on an edge is reported as bound-limited, not as a measurement of alpha.
ALPHA_RANGE = (0.05, 0.8)
NOISE_FLOOR_DEFINITION = (
    'the scatter of the measured loss around its local trend, from second differences of '
    'neighbouring points: sqrt(mean((y[i-1] - 2 y[i] + y[i+1])^2) / 6), the standard deviation '
    'of independent noise on a trend that is straight over three points')


@dataclasses.dataclass(frozen=True)
class AnnealingLaw:
    """L(s) = L0 + A * S1(s)^-alpha - C * S2(s), momentum decay `lam`; `skip_warmup` as in
    `annealing_areas`; `at_bounds` names the constraints the fit ended on."""
    L0: float
    A: float
    alpha: float
    C: float
    lam: float = 0.999
    skip_warmup: bool = True
    at_bounds: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Curve:
    """One run's measured loss at some steps (updates done, >= 1) and the LR of every update
    (`lrs[i]` is the LR of update i, logged at step i + 1). Points at or before `seen_until` are
    left out of fits and scores (a branched run's history that belongs to its parent)."""
    lrs: np.ndarray
    steps: np.ndarray
    losses: np.ndarray
    name: str = ''
    seen_until: int = 0


def annealing_areas(lrs: ArrayLike, lam: float = 0.999,
                    skip_warmup: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) after each update i: S1 = sum of eta_0..eta_i, S2 = sum of m_0..m_i with
    m_i = lam m_{i-1} + (eta_{i-1} - eta_i) and m_0 = 0 (nothing annealed before the first step).

    skip_warmup: LR changes before the LR first reaches its maximum add nothing to m. Otherwise
    the warmup's rise counts as negative annealing that decays over ~1/(1 - lam) steps and raises
    the predicted loss long after warmup; a later re-warmup still counts.
    """
    eta = np.asarray(lrs, dtype=float)
    drops = np.concatenate([[0.0], eta[:-1] - eta[1:]])
    if skip_warmup and len(eta):
        drops[:int(np.argmax(eta)) + 1] = 0.0
    m = np.empty_like(eta)
    acc = 0.0
    for i, x in enumerate(drops):        # a linear recurrence; plain loop is fast enough here
        acc = lam * acc + x
        m[i] = acc
    return np.cumsum(eta), np.cumsum(m)


def predict_annealing(law: AnnealingLaw, lrs: ArrayLike) -> np.ndarray:
    """Predicted loss after each update of the schedule `lrs`."""
    s1, s2 = annealing_areas(lrs, law.lam, law.skip_warmup)
    with np.errstate(divide='ignore'):
        return law.L0 + law.A * s1 ** -law.alpha - law.C * s2


def curve_to_schedule(curve: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """[[step, loss, lr], ...] logged every few steps -> (per-update lrs, steps, losses).

    The LR of update s-1 is logged at step s; between logged steps it is interpolated linearly
    (exact when logged every step or at a piecewise-linear schedule's corners).
    """
    arr = np.asarray(curve, dtype=float)
    arr = arr[np.argsort(arr[:, 0], kind='stable')]
    steps = arr[:, 0].astype(int)
    lrs = np.interp(np.arange(steps.max()), steps - 1, arr[:, 2])
    return lrs, steps, arr[:, 1]


def _usable(curve: Curve, min_step: int | None) -> np.ndarray:
    """Mask of the curve's points a fit or score may use: finite, within the schedule, after
    `min_step` (None: after the warmup, the first peak of the LR) and after `seen_until`."""
    idx = np.asarray(curve.steps, dtype=int) - 1
    first = int(np.argmax(curve.lrs)) if min_step is None else min_step
    return ((idx >= first) & (idx < len(curve.lrs)) & np.isfinite(curve.losses)
            & (np.asarray(curve.steps) > curve.seen_until))


def _points(curves: Sequence[Curve], lam: float, min_step: int | None,
            skip_warmup: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S1, S2, loss) of every usable point, stacked over curves."""
    s1s, s2s, ls = [], [], []
    for c in curves:
        s1, s2 = annealing_areas(c.lrs, lam, skip_warmup)
        keep = _usable(c, min_step)
        idx = np.asarray(c.steps, dtype=int)[keep] - 1
        s1s.append(s1[idx])
        s2s.append(s2[idx])
        ls.append(np.asarray(c.losses, dtype=float)[keep])
    return np.concatenate(s1s), np.concatenate(s2s), np.concatenate(ls)


def _nonnegative_fit(alpha: float, s1: np.ndarray, s2: np.ndarray,
                     loss: np.ndarray) -> tuple[np.ndarray, float]:
    """For fixed alpha the law is linear in (L0, A, C): non-negative least squares, and its SSE."""
    x = np.stack([np.ones_like(s1), s1 ** -alpha, -s2], axis=1)
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0          # an all-zero S2 column (no annealing yet) stays zero
    coef, residual_norm = optimize.nnls(x / scale, loss)
    return coef / scale, float(residual_norm ** 2)


def fit_annealing(curves: Sequence[Curve], lam: float = 0.999, min_step: int | None = None,
                  skip_warmup: bool = True,
                  alpha_range: tuple[float, float] = ALPHA_RANGE) -> AnnealingLaw:
    """Fits (L0, A, alpha, C) jointly on the usable points of `curves` (see `Curve`).

    L0, A, C >= 0 by non-negative least squares for each alpha (variable projection); alpha by
    a grid over `alpha_range`, then a bounded scalar search around the best grid point. Points
    before `min_step` (default: the warmup) are left out: early losses fall steeply and a small
    error in the early LRs' area skews the fit.
    """
    s1, s2, loss = _points(curves, lam, min_step, skip_warmup)
    keep = s1 > 0
    s1, s2, loss = s1[keep], s2[keep], loss[keep]
    if len(loss) < 4:
        raise ValueError(f'fit_annealing needs >= 4 finite points, got {len(loss)}.')
    lo, hi = alpha_range
    if not 0 < lo < hi:
        raise ValueError(f'alpha_range={alpha_range} must satisfy 0 < low < high.')

    def sse(alpha: float) -> float:
        return _nonnegative_fit(alpha, s1, s2, loss)[1]

    grid = np.geomspace(lo, hi, 48)
    j = int(np.argmin([sse(a) for a in grid]))
    alpha = float(optimize.minimize_scalar(
        sse, bounds=(grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)]), method='bounded',
        options={'xatol': 1e-8}).x)
    (l0, a, c), _ = _nonnegative_fit(alpha, s1, s2, loss)
    at_bounds = [f'{name} = 0 (bound: >= 0)' for name, v in (('L0', l0), ('A', a), ('C', c))
                 if v <= 0.0]
    if alpha <= lo * (1 + 1e-3):
        at_bounds.append(f'alpha = {lo:g} (lower bound)')
    elif alpha >= hi * (1 - 1e-3):
        at_bounds.append(f'alpha = {hi:g} (upper bound)')
    return AnnealingLaw(L0=float(l0), A=float(a), alpha=alpha, C=float(c), lam=lam,
                        skip_warmup=skip_warmup, at_bounds=tuple(at_bounds))


def squared_error(law: AnnealingLaw, curves: Sequence[Curve], min_step: int | None = None) -> float:
    """Sum over the usable points of `curves` of (predicted - measured)^2."""
    total = 0.0
    for c in curves:
        keep = _usable(c, min_step)
        steps = np.asarray(c.steps, dtype=int)[keep]
        error = predict_annealing(law, c.lrs)[steps - 1] - np.asarray(c.losses, dtype=float)[keep]
        total += float(error @ error)
    return total


def fit_annealing_choosing_lam(curves: Sequence[Curve], lams: Sequence[float],
                               min_step: int | None = None, **kwargs) -> AnnealingLaw:
    """`fit_annealing` once per momentum decay in `lams`; the law with the lowest squared error
    on the fitted curves wins (the choice sees nothing the fit did not see)."""
    fits = [fit_annealing(curves, lam=lam, min_step=min_step, **kwargs) for lam in lams]
    return min(fits, key=lambda law: squared_error(law, curves, min_step))


def noise_floor(losses: ArrayLike) -> float:
    """See NOISE_FLOOR_DEFINITION (points evenly spaced in step); NaN with fewer than 5 points.

    Second differences cancel any trend that is linear over three points, so a curve that
    falls steadily adds nothing; Var(y[i-1] - 2 y[i] + y[i+1]) = 6 sigma^2 for independent noise.
    """
    y = np.asarray(losses, dtype=float)
    if len(y) < 5:
        return math.nan
    second = y[:-2] - 2.0 * y[1:-1] + y[2:]
    return float(np.sqrt(np.mean(second ** 2) / 6.0))


@dataclasses.dataclass(frozen=True)
class Score:
    """A law's prediction of one curve on its unseen points (errors: predicted - measured)."""
    run: str
    n_points: int
    first_step: int
    last_step: int
    rmse: float
    mean_error: float
    final_measured: float
    final_error: float
    final_error_pct: float          # of the measured final loss
    noise_floor: float


def score(law: AnnealingLaw, curve: Curve, min_step: int | None = None) -> Score:
    """Errors of `law` on the points of `curve` after `curve.seen_until` (and the warmup)."""
    keep = _usable(curve, min_step)
    if not keep.any():
        raise ValueError(f'{curve.name}: no point after step {curve.seen_until} to score.')
    steps = np.asarray(curve.steps, dtype=int)[keep]
    measured = np.asarray(curve.losses, dtype=float)[keep]
    error = predict_annealing(law, curve.lrs)[steps - 1] - measured
    return Score(run=curve.name, n_points=int(keep.sum()), first_step=int(steps[0]),
                 last_step=int(steps[-1]), rmse=float(np.sqrt(np.mean(error ** 2))),
                 mean_error=float(error.mean()), final_measured=float(measured[-1]),
                 final_error=float(error[-1]),
                 final_error_pct=float(100.0 * error[-1] / measured[-1]),
                 noise_floor=noise_floor(measured))
