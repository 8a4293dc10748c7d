"""Plots of fitted laws against measured points (matplotlib, Agg backend, PNG files)."""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pretrain.study.laws import ArrayLike, LROptimum, PowerLaw, final_loss


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_compute_frontier(compute: ArrayLike, loss: ArrayLike, law: PowerLaw, path: str,
                          frontier: tuple[ArrayLike, ArrayLike] | None = None) -> None:
    """Loss vs compute (log-log), the frontier points used for the fit and the fitted law."""
    plt = pyplot()
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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    finite = [final_loss(r) for r in rows if math.isfinite(final_loss(r))]
    top = max(finite) if finite else 1.0
    for j, (w, opt) in enumerate(optima.items()):
        g = sorted((r for r in rows if r.get('width', 'all') == w), key=lambda r: r['lr'])
        x = np.log2([r['lr'] for r in g])
        y = np.array([final_loss(r) for r in g])
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
    plt = pyplot()
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
