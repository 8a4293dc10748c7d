"""Scaling-law and schedule-law fits on finished runs (numpy/scipy only), plots and a CLI.

    python -m pretrain.fit --sweep_dir=runs/sweep [--bootstrap=200]

reads `DIR/results.jsonl`, one JSON object per run. Fields (all optional but `final_loss`; a fit
whose fields are missing is skipped with a printed reason):

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
    metrics     str    path (relative to DIR) of the run's metrics.jsonl, read for `curve`
    kind        str    'parent' marks a constant-LR run that cooldowns branch from: only its
                       curve is used (its last loss is not the end of a schedule)
    heldout     bool   not used by any fit; its final_loss is compared with the laws' prediction

and writes `DIR/fits.json`, `DIR/fit_summary.md` and PNGs. Fits:

- power law L(C) = E + A C^-alpha through the compute frontier (Huber on log residuals);
- Chinchilla approach 3: L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022), the SUM of
  Huber(delta=1e-3) of log residuals, L-BFGS-B from a grid of starts; compute-optimal N, D;
- Chinchilla approach 2: a parabola of loss in log N and in log D per budget, power laws
  through the minima;
- optimum LR per width: a parabola in log2(LR) through the best point and its neighbours;
- the LR-annealing law (Tissue et al. 2024): L(s) = L0 + A S1^-alpha - C S2;
- bootstrap 95% intervals.
"""

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize

ArrayLike = Sequence[float] | np.ndarray

# L-BFGS-B's ftol compares the decrease with max(|f|, 1): a Huber objective of ~1e-4 would stop
# after the first tiny step with scipy's default, so both tolerances are set near machine level.
_LBFGS_OPTIONS = {'maxiter': 2000, 'ftol': 1e-15, 'gtol': 1e-12}


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS limited to one thread where threadpoolctl is installed.

    L-BFGS-B calls BLAS on 5-vectors thousands of times; OpenBLAS threads then spin and wait on
    each other, 10-20x slower on a busy machine than one thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api='blas')


# --- Huber of log-sum-exp residuals (shared by the power law and Chinchilla approach 3) -------

def _lse_huber(x: np.ndarray, log_x: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Sum over points of Huber(delta)(logsumexp(a_k - alpha_k log_x_k, e) - log L), and gradient.

    x = [a_1..a_K, alpha_1..alpha_K, e]; log_x has shape (points, K).
    """
    k = log_x.shape[1]
    a, alpha, e = x[:k], x[k:2 * k], x[2 * k]
    terms = np.concatenate([a - alpha * log_x, np.full((len(log_l), 1), e)], axis=1)
    top = terms.max(axis=1, keepdims=True)
    w = np.exp(terms - top)
    total = w.sum(axis=1, keepdims=True)
    r = (top + np.log(total))[:, 0] - log_l
    w /= total                                       # softmax: d lse / d term
    absr = np.abs(r)
    value = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum()
    dr = np.clip(r, -delta, delta)                   # Huber'(r)
    grad = np.concatenate([dr @ w[:, :k], -(dr[:, None] * w[:, :k] * log_x).sum(axis=0),
                           [dr @ w[:, k]]])
    return float(value), grad


def _best_of_starts(starts: np.ndarray, log_x: np.ndarray, log_l: np.ndarray, delta: float,
                    max_starts: int | None = None) -> tuple[np.ndarray, float]:
    """L-BFGS-B from each start, the lowest objective wins.

    With `max_starts`, only the starts with the lowest initial objective are run (a cheap
    screen: one evaluation per grid point instead of ~150).
    """
    if max_starts is not None and len(starts) > max_starts:
        f0 = np.array([_lse_huber(x0, log_x, log_l, delta)[0] for x0 in starts])
        starts = starts[np.argsort(f0, kind='stable')[:max_starts]]
    best_x, best_f = None, math.inf
    with _one_blas_thread():
        for x0 in starts:
            res = optimize.minimize(_lse_huber, x0, args=(log_x, log_l, delta), jac=True,
                                    method='L-BFGS-B', options=_LBFGS_OPTIONS)
            if np.isfinite(res.fun) and res.fun < best_f:
                best_x, best_f = res.x, float(res.fun)
    if best_x is None:
        raise ValueError('No start gave a finite objective.')
    return best_x, best_f


def _finite_positive(*arrays: ArrayLike) -> list[np.ndarray]:
    """Float arrays with the points where any array is non-finite or <= 0 removed."""
    arrs = [np.asarray(a, dtype=float) for a in arrays]
    keep = np.ones(len(arrs[0]), dtype=bool)
    for a in arrs:
        keep &= np.isfinite(a) & (a > 0)
    return [a[keep] for a in arrs]


# --- Power law in compute ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(C) = E + A * C^-alpha."""
    E: float
    A: float
    alpha: float

    def __call__(self, c: ArrayLike) -> np.ndarray:
        return self.E + self.A * np.asarray(c, dtype=float) ** -self.alpha


def fit_power_law(compute: ArrayLike, loss: ArrayLike, delta: float = 1e-3,
                  starts: np.ndarray | None = None) -> PowerLaw:
    """Fits L(C) = E + A C^-alpha: summed Huber of log residuals, L-BFGS-B from a grid of starts.

    C is divided by its geometric mean inside the fit so the coefficient's log is O(1).
    """
    c, l = _finite_positive(compute, loss)
    if len(c) < 3:
        raise ValueError(f'fit_power_law needs >= 3 finite points, got {len(c)}.')
    c0 = math.exp(np.log(c).mean())
    log_x = np.log(c / c0)[:, None]
    if starts is None:
        # Starts as [a, alpha, e]: E a fraction of the lowest loss, A C0^-alpha a fraction of L.
        e_grid = np.log(l.min() * np.array([0.3, 0.6, 0.9]))
        a_grid = np.log(l.mean() * np.array([0.05, 0.3, 1.0]))
        alpha_grid = np.array([0.03, 0.1, 0.3, 1.0])
        starts = np.array(np.meshgrid(a_grid, alpha_grid, e_grid, indexing='ij')).reshape(3, -1).T
    x, _ = _best_of_starts(np.asarray(starts, dtype=float), log_x, np.log(l), delta)
    a, alpha, e = x
    return PowerLaw(E=math.exp(e), A=math.exp(a) * c0 ** alpha, alpha=float(alpha))


def power_law_start(p: PowerLaw, compute: ArrayLike) -> np.ndarray:
    """The internal [a, alpha, e] of `p` for data `compute` (a warm start for refits)."""
    c = np.asarray(compute, dtype=float)
    c0 = math.exp(np.log(c[np.isfinite(c) & (c > 0)]).mean())
    return np.array([[math.log(p.A) - p.alpha * math.log(c0), p.alpha, math.log(p.E)]])


# --- Chinchilla approach 3 -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chinchilla:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, n: ArrayLike, d: ArrayLike) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta

    @property
    def n_exponent(self) -> float:
        """a in N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def d_exponent(self) -> float:
        """b in D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)


HOFFMANN = Chinchilla(E=1.6934, A=406.4, B=410.7, alpha=0.3392, beta=0.2849)
BESIROGLU = Chinchilla(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def chinchilla_grid() -> np.ndarray:
    """Starting points (a, b, e, alpha, beta): a coarser version of Hoffmann et al.'s grid."""
    ab = np.array([0.0, 5.0, 10.0, 15.0, 20.0])
    e = np.array([-1.0, 0.0, 1.0])
    exps = np.array([0.2, 0.5, 1.0])
    return np.array(np.meshgrid(ab, ab, e, exps, exps, indexing='ij')).reshape(5, -1).T


def _to_internal(abeab: np.ndarray) -> np.ndarray:
    """(a, b, e, alpha, beta) rows -> the objective's [a, b, alpha, beta, e] rows."""
    return np.asarray(abeab, dtype=float)[:, [0, 1, 3, 4, 2]]


def chinchilla_objective(params: ArrayLike, n: ArrayLike, d: ArrayLike, loss: ArrayLike,
                         delta: float = 1e-3) -> float:
    """The SUM over runs of Huber(delta)(logsumexp(a - alpha log N, b - beta log D, e) - log L).

    params = (a, b, e, alpha, beta). A sum, not a mean: with a mean the objective and its gradient
    shrink with the number of runs and L-BFGS stops early.
    """
    log_x = np.log(np.stack([np.asarray(n, float), np.asarray(d, float)], axis=1))
    x = _to_internal(np.asarray(params, dtype=float)[None])[0]
    return _lse_huber(x, log_x, np.log(np.asarray(loss, float)), delta)[0]


def fit_chinchilla(n: ArrayLike, d: ArrayLike, loss: ArrayLike, delta: float = 1e-3,
                   starts: np.ndarray | None = None, max_starts: int | None = 64) -> Chinchilla:
    """Chinchilla approach 3: L-BFGS-B on `chinchilla_objective` from each start, the best kept.

    `starts` rows are (a, b, e, alpha, beta); default `chinchilla_grid()` (675 points), of which
    the `max_starts` with the lowest initial objective are run (None: all, ~10x slower).
    """
    n, d, l = _finite_positive(n, d, loss)
    if len(n) < 5:
        raise ValueError(f'fit_chinchilla needs >= 5 finite runs for 5 parameters, got {len(n)}.')
    log_x = np.log(np.stack([n, d], axis=1))
    starts = chinchilla_grid() if starts is None else np.atleast_2d(starts)
    x, _ = _best_of_starts(_to_internal(starts), log_x, np.log(l), delta, max_starts)
    a, b, alpha, beta, e = x
    return Chinchilla(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                      beta=float(beta))


def chinchilla_start(p: Chinchilla) -> np.ndarray:
    """`p` as one (a, b, e, alpha, beta) start row (a warm start for bootstrap refits)."""
    return np.array([[math.log(p.A), math.log(p.B), math.log(p.E), p.alpha, p.beta]])


def chinchilla_optimal(p: Chinchilla, compute: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) minimising p(N, D) subject to C = 6 N D.

    Setting d/dN of A N^-alpha + B (C/6N)^-beta to zero: N_opt = G (C/6)^(beta/(alpha+beta)),
    D_opt = (C/6) / N_opt, G = (alpha A / (beta B))^(1/(alpha+beta)).
    """
    c6 = np.asarray(compute, dtype=float) / 6.0
    g = (p.alpha * p.A / (p.beta * p.B)) ** (1.0 / (p.alpha + p.beta))
    n_opt = g * c6 ** p.n_exponent
    return n_opt, c6 / n_opt


# --- Chinchilla approach 2 -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IsoFlop:
    """N_opt = n_coef C^a and D_opt = d_coef C^b through the per-budget parabola minima."""
    a: float
    b: float
    n_coef: float
    d_coef: float
    minima: list[dict[str, float]]       # per used budget: C, N_opt, D_opt, loss at the minimum
    skipped: dict[str, str]              # budget -> why it was not used

    def n_opt(self, c: ArrayLike) -> np.ndarray:
        return self.n_coef * np.asarray(c, dtype=float) ** self.a

    def d_opt(self, c: ArrayLike) -> np.ndarray:
        return self.d_coef * np.asarray(c, dtype=float) ** self.b


def _parabola_min(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | str:
    """(x*, y*) of the least-squares parabola, or why there is none inside the data's range."""
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return 'not convex'
    xm = -c1 / (2 * c2)
    if not x.min() <= xm <= x.max():
        return 'minimum outside the sampled range'
    return float(xm), float(c0 + c1 * xm + c2 * xm * xm)


def fit_isoflop(n: ArrayLike, d: ArrayLike, loss: ArrayLike, c_groups: ArrayLike) -> IsoFlop:
    """Chinchilla approach 2. `c_groups[i]` is the compute budget (a number) of run i.

    Per budget with >= 3 runs: parabolas of loss in log N and in log D; their minima give N_opt
    and D_opt. Then log N_opt and log D_opt are fitted linearly in log C over the budgets.
    """
    n, d, l, c = _finite_positive(n, d, loss, c_groups)
    minima, skipped = [], {}
    for budget in np.unique(c):
        sel = c == budget
        key = f'{budget:.3g}'
        if len(np.unique(n[sel])) < 3:
            skipped[key] = f'{len(np.unique(n[sel]))} distinct model sizes (need >= 3)'
            continue
        on_n = _parabola_min(np.log(n[sel]), l[sel])
        on_d = _parabola_min(np.log(d[sel]), l[sel])
        if isinstance(on_n, str) or isinstance(on_d, str):
            skipped[key] = on_n if isinstance(on_n, str) else on_d
            continue
        minima.append({'C': float(budget), 'N_opt': math.exp(on_n[0]), 'D_opt': math.exp(on_d[0]),
                       'loss': on_n[1]})
    if len(minima) < 2:
        raise ValueError(f'fit_isoflop needs >= 2 usable budgets, got {len(minima)} '
                         f'(skipped: {skipped}).')
    log_c = np.log([m['C'] for m in minima])
    a, log_kn = np.polyfit(log_c, np.log([m['N_opt'] for m in minima]), 1)
    b, log_kd = np.polyfit(log_c, np.log([m['D_opt'] for m in minima]), 1)
    return IsoFlop(a=float(a), b=float(b), n_coef=math.exp(log_kn), d_coef=math.exp(log_kd),
                   minima=minima, skipped=skipped)


def budget_of(flops: float) -> float:
    """A run's iso-FLOP group when none is given: its FLOPs rounded to 2 significant digits."""
    return float(f'{flops:.2g}')


# --- Optimum learning rate -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LROptimum:
    """The optimum LR of a sweep; `at_edge`: the best finite point is the lowest or highest LR
    (then `lr` is that grid point, not a fitted value; `diverged_above` tells a diverged neighbour
    from an unexplored side)."""
    lr: float
    loss: float
    at_edge: bool
    diverged_above: bool
    n_points: int


def optimal_lr(lrs: ArrayLike, losses: ArrayLike, window: int = 1) -> LROptimum:
    """Vertex of a parabola in log2(LR) through the best point and `window` neighbours each side.

    Diverged points (NaN/inf loss) are ignored. Several runs at one LR (seeds) are averaged.
    """
    lrs = np.asarray(lrs, dtype=float)
    losses = np.asarray(losses, dtype=float)
    ok = np.isfinite(losses) & np.isfinite(lrs) & (lrs > 0)
    if not ok.any():
        raise ValueError('optimal_lr: every run diverged.')
    grid = np.unique(lrs[ok])
    mean = np.array([losses[ok & (lrs == v)].mean() for v in grid])
    i = int(np.argmin(mean))
    diverged_above = bool(np.any(~ok & (lrs > grid[i])))
    if i == 0 or i == len(grid) - 1:
        return LROptimum(float(grid[i]), float(mean[i]), True, diverged_above, len(grid))
    lo, hi = max(0, i - window), min(len(grid), i + window + 1)
    vertex = _parabola_min(np.log2(grid[lo:hi]), mean[lo:hi])
    if isinstance(vertex, str):
        return LROptimum(float(grid[i]), float(mean[i]), False, diverged_above, len(grid))
    return LROptimum(float(2.0 ** vertex[0]), vertex[1], False, diverged_above, len(grid))


def optima_per_width(rows: Sequence[Mapping[str, Any]]) -> dict[Any, LROptimum]:
    """optimal_lr over rows grouped by 'width' (rows need 'lr', 'final_loss'; width optional)."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get('width', 'all'), []).append(r)
    return {w: optimal_lr([r['lr'] for r in g], [_loss(r) for r in g])
            for w, g in sorted(groups.items(), key=lambda kv: str(kv[0]).zfill(12))}


def _loss(row: Mapping[str, Any]) -> float:
    """final_loss as a float; null or missing (a diverged run) is inf."""
    v = row.get('final_loss')
    return math.inf if v is None else float(v)


# --- LR-annealing law ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AnnealingLaw:
    """L(s) = L0 + A * S1(s)^-alpha - C * S2(s) (Tissue et al. 2024), momentum decay `lam`;
    `skip_warmup` as in `annealing_areas`."""
    L0: float
    A: float
    alpha: float
    C: float
    lam: float = 0.999
    skip_warmup: bool = True


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


def _annealing_points(curves: Sequence[Sequence[Any]], lam: float, min_step: int | None,
                      skip_warmup: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S1, S2, loss) stacked over curves; a curve is (lrs, losses) aligned per update, or
    (lrs, steps, losses) with loss at `steps` (updates done, >= 1). Points at update indices
    below `min_step` are dropped; None: below each curve's first peak LR (its warmup)."""
    s1s, s2s, ls = [], [], []
    for curve in curves:
        if len(curve) == 2:
            lrs, losses = curve
            idx = np.arange(len(losses))
        else:
            lrs, steps, losses = curve
            idx = np.asarray(steps, dtype=int) - 1
        s1, s2 = annealing_areas(lrs, lam, skip_warmup)
        losses = np.asarray(losses, dtype=float)
        first = int(np.argmax(np.asarray(lrs))) if min_step is None else min_step
        keep = (idx >= first) & (idx < len(s1)) & np.isfinite(losses)
        s1s.append(s1[idx[keep]])
        s2s.append(s2[idx[keep]])
        ls.append(losses[keep])
    return np.concatenate(s1s), np.concatenate(s2s), np.concatenate(ls)


def _annealing_linear(alpha: float, s1: np.ndarray, s2: np.ndarray,
                      l: np.ndarray) -> tuple[np.ndarray, float]:
    """For fixed alpha the law is linear in (L0, A, C): least squares, and its sum of squares."""
    x = np.stack([np.ones_like(s1), s1 ** -alpha, -s2], axis=1)
    coef, *_ = np.linalg.lstsq(x, l, rcond=None)
    r = x @ coef - l
    return coef, float(r @ r)


def fit_annealing(curves: Sequence[Sequence[Any]], lam: float = 0.999,
                  min_step: int | None = None, skip_warmup: bool = True) -> AnnealingLaw:
    """Fits (L0, A, alpha, C) jointly on one or more curves (see `_annealing_points`).

    Variable projection: (L0, A, C) by linear least squares for each alpha, alpha by a grid then
    a bounded scalar search. Points before `min_step` (default: the warmup) are left out:
    early losses fall steeply and a small error in the early LRs' area skews the fit.
    """
    s1, s2, l = _annealing_points(curves, lam, min_step, skip_warmup)
    keep = s1 > 0
    s1, s2, l = s1[keep], s2[keep], l[keep]
    if len(l) < 4:
        raise ValueError(f'fit_annealing needs >= 4 finite points, got {len(l)}.')

    def sse(alpha: float) -> float:
        return _annealing_linear(alpha, s1, s2, l)[1]

    grid = np.geomspace(0.01, 3.0, 40)
    j = int(np.argmin([sse(a) for a in grid]))
    lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)]
    alpha = float(optimize.minimize_scalar(sse, bounds=(lo, hi), method='bounded',
                                           options={'xatol': 1e-8}).x)
    (l0, a, c), _ = _annealing_linear(alpha, s1, s2, l)
    return AnnealingLaw(L0=float(l0), A=float(a), alpha=alpha, C=float(c), lam=lam,
                        skip_warmup=skip_warmup)


def predict_annealing(params: AnnealingLaw, lrs: ArrayLike) -> np.ndarray:
    """Predicted loss after each update of the schedule `lrs`."""
    s1, s2 = annealing_areas(lrs, params.lam, params.skip_warmup)
    with np.errstate(divide='ignore'):
        return params.L0 + params.A * s1 ** -params.alpha - params.C * s2


def curve_to_schedule(curve: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """[[step, loss, lr], ...] logged every few steps -> (per-update lrs, steps, losses).

    The LR of update s-1 is logged at step s; between logged steps it is interpolated linearly
    (exact for piecewise-linear schedules logged at their corners, close for smooth ones).
    """
    arr = np.asarray(curve, dtype=float)
    arr = arr[np.argsort(arr[:, 0], kind='stable')]
    steps = arr[:, 0].astype(int)
    lrs = np.interp(np.arange(steps.max()), steps - 1, arr[:, 2])
    return lrs, steps, arr[:, 1]


# --- Bootstrap -----------------------------------------------------------------------------

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


# --- Plots ---------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_compute_frontier(compute: ArrayLike, loss: ArrayLike, law: PowerLaw, path: str,
                          frontier: tuple[ArrayLike, ArrayLike] | None = None) -> None:
    """Loss vs compute (log-log), the frontier points used for the fit and the fitted law."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(compute, loss, s=14, color='0.6', label='runs')
    if frontier is not None:
        ax.scatter(*frontier, s=22, color='C1', label='frontier')
    c = np.asarray(compute, dtype=float)
    cs = np.geomspace(c[c > 0].min(), c[c > 0].max() * 10, 200)
    ax.plot(cs, law(cs), color='C0',
            label=f'{law.E:.3f} + {law.A:.3g} C^-{law.alpha:.3f}')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('compute C (FLOPs)')
    ax.set_ylabel('loss')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_sweep(rows: Sequence[Mapping[str, Any]], optima: Mapping[Any, LROptimum],
                  path: str) -> None:
    """Final loss vs log2 LR per width (diverged runs as x at the top), optima marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    finite = [_loss(r) for r in rows if math.isfinite(_loss(r))]
    top = max(finite) if finite else 1.0
    for j, (w, opt) in enumerate(optima.items()):
        g = sorted((r for r in rows if r.get('width', 'all') == w), key=lambda r: r['lr'])
        x = np.log2([r['lr'] for r in g])
        y = np.array([_loss(r) for r in g])
        ok = np.isfinite(y)
        color = f'C{j % 10}'
        ax.plot(x[ok], y[ok], marker='o', ms=3, color=color, label=f'width {w}')
        ax.scatter(x[~ok], np.full((~ok).sum(), top), marker='x', color=color)
        ax.scatter([math.log2(opt.lr)], [opt.loss], marker='*', s=90, color=color,
                   edgecolors='k', zorder=3)
    ax.set_xlabel('log2 LR')
    ax.set_ylabel('final loss')
    ax.set_title('LR sweep (star: optimum, x: diverged)', fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_law_vs_points(series: Sequence[dict[str, Any]], path: str, xlabel: str = 'step',
                       ylabel: str = 'loss', title: str = '', logx: bool = False) -> None:
    """Measured points against a fitted law; each series: {'label', 'x', 'y', 'x_fit', 'y_fit'}.

    The y range follows the measured points, so a law that blows up off the data (e.g. the
    annealing law at step 0) does not flatten the plot.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ys = np.concatenate([np.asarray(s['y'], float) for s in series])
    ys = ys[np.isfinite(ys)]
    for j, s in enumerate(series):
        color = f'C{j % 10}'
        ax.scatter(s['x'], s['y'], s=8, color=color, alpha=0.6, label=f'{s["label"]}')
        ax.plot(s['x_fit'], s['y_fit'], color=color, lw=1.2)
    if len(ys):
        pad = 0.05 * (ys.max() - ys.min() + 1e-9)
        ax.set_ylim(ys.min() - pad, ys.max() + pad)
    if logx:
        ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f'{title}\n(points: measured, lines: fitted law)', fontsize=9)
    if len(series) <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- The sweep-directory driver ------------------------------------------------------------

def load_results(sweep_dir: str) -> list[dict[str, Any]]:
    """Rows of DIR/results.jsonl; `flops` filled as 6 N D when missing, `curve` from `metrics`."""
    rows = []
    with open(os.path.join(sweep_dir, 'results.jsonl'), encoding='utf-8') as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    for r in rows:
        if 'flops' not in r and 'params' in r and 'tokens' in r:
            r['flops'] = 6.0 * r['params'] * r['tokens']
        if 'curve' not in r and 'metrics' in r:
            r['curve'] = _curve_from_metrics(os.path.join(sweep_dir, r['metrics']))
    return rows


def _curve_from_metrics(path: str) -> list[list[float]]:
    # Imported here: pretrain.metrics imports jax, which nothing else in this module needs.
    from pretrain.metrics import read_metrics
    last: dict[int, list[float]] = {}
    for rec in read_metrics(path):
        if rec.get('split') == 'train' and 'loss' in rec and 'lr' in rec:
            # A resumed run re-logs steps after its checkpoint: the later line wins.
            last[rec['step']] = [rec['step'], rec['loss'], rec['lr']]
    return [last[s] for s in sorted(last)]


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
        if math.isfinite(_loss(r)):
            configs.setdefault(tuple(r.get(k) for k in _CONFIG_KEYS) + (r.get('budget'),),
                               []).append(_loss(r))
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
    plot_compute_frontier([r['flops'] for r in rows], [_loss(r) for r in rows], law, path, (c, l))
    files.append(path)
    return result


def _fit_chinchilla(rows, out, n_boot, files):
    rows = [r for r in _has(rows, 'params', 'tokens', 'final_loss') if math.isfinite(_loss(r))]
    if len(rows) < 8:
        return f'needs >= 8 finite runs with params, tokens and final_loss, have {len(rows)}'
    if len({r['params'] for r in rows}) < 2 or len({r['tokens'] for r in rows}) < 2:
        return 'needs >= 2 distinct params and >= 2 distinct tokens'

    def fit(rs, starts=None):
        return fit_chinchilla([r['params'] for r in rs], [r['tokens'] for r in rs],
                              [_loss(r) for r in rs], starts=starts)

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
    plot_law_vs_points(series, path, xlabel='params N' if iso else 'predicted loss', logx=iso,
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
            series.append({'label': f'C={b:.2g}', 'x': n, 'y': [_loss(r) for r in g],
                           'x_fit': ns, 'y_fit': law(ns, b / (6.0 * ns))})
        return series
    pred = law([r['params'] for r in rows], [r['tokens'] for r in rows])
    line = np.array([pred.min(), pred.max()])
    return [{'label': 'runs (x: predicted)', 'x': pred, 'y': [_loss(r) for r in rows],
             'x_fit': line, 'y_fit': line}]


def _fit_isoflop(rows, out, n_boot, files):
    del n_boot, out, files
    rows = _has(rows, 'params', 'tokens', 'flops', 'final_loss')
    if not rows:
        return 'needs runs with params, tokens, flops and final_loss'
    budgets = [r.get('budget', budget_of(r['flops'])) for r in rows]
    try:
        iso = fit_isoflop([r['params'] for r in rows], [r['tokens'] for r in rows],
                          [_loss(r) for r in rows], budgets)
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
    plot_lr_sweep(rows, optima, path)
    files.append(path)
    return result


def _fit_annealing(rows, out, n_boot, files):
    del n_boot
    rows = [r for r in rows if r.get('curve')]
    if not rows:
        return 'needs runs with a curve ([[step, loss, lr], ...]) or a metrics file'
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:      # the law's constants belong to one model: fit each size on its own
        groups.setdefault(r.get('params', r.get('width', 'all')), []).append(r)
    result: dict[str, Any] = {}
    series = []
    for key, g in groups.items():
        curves = [curve_to_schedule(r['curve']) for r in g]
        law = fit_annealing(curves)
        entry: dict[str, Any] = {'law': dataclasses.asdict(law), 'runs': [r.get('name') for r in g]}
        if len(g) >= 2:
            # Held-out check: fit on all but the last curve, predict the last one.
            held = fit_annealing(curves[:-1])
            lrs, steps, losses = curves[-1]
            pred = predict_annealing(held, lrs)[steps - 1]
            ok = np.isfinite(losses) & (steps - 1 >= np.argmax(lrs))   # after warmup, as fitted
            entry['heldout'] = {'run': g[-1].get('name'), 'law': dataclasses.asdict(held),
                                'rmse': float(np.sqrt(np.mean((pred[ok] - losses[ok]) ** 2))),
                                # The same law on the curves it was fitted to: the noise floor
                                # that the held-out RMSE should be read against.
                                'fit_rmse': _annealing_rmse(held, curves[:-1])}
        result[str(key)] = entry
        for r, (lrs, steps, losses) in zip(g, curves):
            start = int(np.argmax(lrs))          # the law is fitted after warmup only
            after = steps - 1 >= start
            series.append({'label': str(r.get('name', key)), 'x': steps[after], 'y': losses[after],
                           'x_fit': np.arange(start + 1, len(lrs) + 1),
                           'y_fit': predict_annealing(law, lrs)[start:]})
    path = os.path.join(out, 'annealing.png')
    plot_law_vs_points(series, path, title='LR-annealing law fitted on all curves (after warmup)')
    files.append(path)
    return result


def _annealing_rmse(law: AnnealingLaw, curves) -> float:
    """RMSE of `law` over the points (after warmup) of several (lrs, steps, losses) curves."""
    errors = []
    for lrs, steps, losses in curves:
        pred = predict_annealing(law, lrs)[steps - 1]
        ok = np.isfinite(losses) & (steps - 1 >= np.argmax(lrs))
        errors.append(pred[ok] - losses[ok])
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


FITS: dict[str, Callable[..., Any]] = {
    'power_law': _fit_power_law, 'chinchilla': _fit_chinchilla, 'isoflop': _fit_isoflop,
    'lr_optima': _fit_lr, 'annealing': _fit_annealing,
}


def predict_heldout(fits: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Each held-out run's measured final loss next to what the fitted laws predict for it."""
    out = []
    for r in rows:
        entry: dict[str, Any] = {'name': r.get('name'), 'measured': _loss(r)}
        if 'power_law' in fits and r.get('flops'):
            p = fits['power_law']
            entry['power_law'] = float(PowerLaw(p['E'], p['A'], p['alpha'])(r['flops']))
        if 'chinchilla' in fits and r.get('params') and r.get('tokens'):
            p = fits['chinchilla']
            law = Chinchilla(*(p[k] for k in ('E', 'A', 'B', 'alpha', 'beta')))
            entry['chinchilla'] = float(law(r['params'], r['tokens']))
        out.append(entry)
    return out


def _jsonable(x: Any) -> Any:
    """numpy and non-finite floats -> JSON (NaN/inf as strings, as pretrain.metrics writes them)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else ('nan' if math.isnan(x) else ('inf' if x > 0 else '-inf'))
    return x


def run(sweep_dir: str, n_boot: int = 200) -> dict[str, Any]:
    """Every fit the rows allow; writes fits.json, fit_summary.md and PNGs into `sweep_dir`."""
    rows = load_results(sweep_dir)
    heldout = [r for r in rows if r.get('heldout')]
    rows = [r for r in rows if not r.get('heldout')]
    # A constant-LR parent's last loss is not the end of a schedule: only its curve is used.
    ends = [r for r in rows if r.get('kind') != 'parent']
    fits: dict[str, Any] = {'n_runs': len(rows), 'skipped': {}, 'files': []}
    for name, fn in FITS.items():
        try:
            result = fn(rows if name == 'annealing' else ends, sweep_dir, n_boot, fits['files'])
        except (ValueError, np.linalg.LinAlgError) as e:     # one failed fit must not stop the rest
            result = f'fit failed: {e}'
        if isinstance(result, str):
            fits['skipped'][name] = result
            print(f'skipping {name}: {result}')
        else:
            fits[name] = result
    if heldout:
        fits['heldout'] = predict_heldout(fits, [r for r in heldout if r.get('kind') != 'parent'])
    fits = _jsonable(fits)
    with open(os.path.join(sweep_dir, 'fits.json'), 'w', encoding='utf-8') as f:
        json.dump(fits, f, indent=1)
    with open(os.path.join(sweep_dir, 'fit_summary.md'), 'w', encoding='utf-8') as f:
        f.write(summary_markdown(fits))
    return fits


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
        lines += ['## LR-annealing law: L = L0 + A S1^-alpha - C S2', '']
        for key, e in fits['annealing'].items():
            law = e['law']
            lines.append(f'- {key}: L0={law["L0"]:.4g} A={law["A"]:.4g} alpha={law["alpha"]:.4g} '
                         f'C={law["C"]:.4g} (lam={law["lam"]})')
            if 'heldout' in e:
                h = e['heldout']
                lines.append(f'  - held-out {h["run"]}: RMSE {h["rmse"]:.4g} (on the fitted curves: '
                             f'{h["fit_rmse"]:.4g})')
        lines.append('')
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


def _define_flags() -> None:
    # Defined only when run as a script: tests import this module next to pretrain.train.
    from absl import flags
    flags.DEFINE_string('sweep_dir', None, 'Folder holding results.jsonl.', required=True)
    flags.DEFINE_integer('bootstrap', 200, 'Bootstrap resamples per fit (0: none).')


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    fits = run(f.sweep_dir, f.bootstrap)
    print(f'wrote {os.path.join(f.sweep_dir, "fits.json")}, fit_summary.md and '
          f'{len(fits["files"])} plots')


if __name__ == '__main__':
    from absl import app
    _define_flags()
    app.run(main)
