"""Scaling laws fitted to finished runs (numpy/scipy only): loss vs compute, Chinchilla
approaches 2 and 3, and the optimum learning rate per width.

- power law L(C) = E + A C^-alpha through the compute frontier (Huber on log residuals);
- Chinchilla approach 3: L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022), the SUM of
  Huber(delta=1e-3) of log residuals, L-BFGS-B from a grid of starts; compute-optimal N, D;
- Chinchilla approach 2: a parabola of loss in log N and in log D per budget, power laws
  through the minima;
- optimum LR per width: a parabola in log2(LR) through the best point and its neighbours.

The LR-annealing law is in `pretrain.study.annealing`.
"""

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
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
    return {w: optimal_lr([r['lr'] for r in g], [final_loss(r) for r in g])
            for w, g in sorted(groups.items(), key=lambda kv: str(kv[0]).zfill(12))}


def final_loss(row: Mapping[str, Any]) -> float:
    """final_loss as a float; null or missing (a diverged run) is inf."""
    v = row.get('final_loss')
    return math.inf if v is None else float(v)
