"""The optax chain: clip -> update rule -> weight decay -> per-parameter LR multipliers -> schedule.

Update rules (optim.name):
- 'adamw':     Adam (optax.scale_by_adam) for every parameter.
- 'muon':      orthogonalised Nesterov momentum (optax.contrib.scale_by_muon, 5 Newton-Schulz
               steps) times the parametrization's spectral scale for the matrices (roles hidden,
               hidden_fan_in, hidden_to_fixed); Adam for embeddings, readout and vectors. A
               matrix with more than two axes is the matrix from its fan-in axes to its fan-out
               axes (matrix_dims), e.g. an attention query (embed, heads, head_dim) is
               embed x (heads * head_dim).
- 'adafactor': factored second moments (Shazeer & Stern 2018: decay 1 - t^-0.8, update
               clipping at RMS 1), optional momentum optim.b1, no parameter-relative step size:
               its update is RMS-normalised like Adam's, so the Adam muP rules hold unchanged.

Per-parameter LR, epsilon and decay multipliers come from the parametrization (by role), so
SP, muP and depth-muP share one chain. Weight-decay modes (lambda = optim.weight_decay):
- 'coupled' (optax.adamw):   p -= eta_t * lr_i * (adam + lambda * p)
- 'mup_scaled':              as coupled with lambda * m for hidden matrices (eta/m * lambda*m)
- 'independent':             p -= eta_t * lr_i * adam + lambda * (eta_t / eta_peak) * p
- 'auto':                    'coupled' under SP; under muP 'independent' with lambda replaced by
                             eta_peak * lambda (see pretrain/parametrization.py)
Vector-like parameters (norm gains, biases) get no weight decay.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.contrib
from optax.contrib import MuonDimensionNumbers
from optax.transforms import MaskedNode

from pretrain import parametrization as parametrization_lib
from pretrain.parametrization import Parametrization
from pretrain.state import ModelDef
from pretrain.errors import ConfigError, check_choice

OPTIMIZERS = ('adamw', 'muon', 'adafactor')
# The roles Muon orthogonalises (width on the fan-in side); the others stay with Adam.
MUON_ROLES = ('hidden', 'hidden_fan_in', 'hidden_to_fixed')


def default_config() -> dict:
    """optim.muon and optim.adafactor: settings of those update rules (unused by the others)."""
    return dict(
        muon=dict(
            momentum=0.95,         # Nesterov momentum of the matrices (AdamW's b1 for the rest)
            ns_steps=5,            # Newton-Schulz iterations
            update_rms=0.2,        # the matrices' update RMS at the base shape (Liu et al. 2025)
        ),
        adafactor=dict(
            decay_rate=0.8,        # second-moment decay 1 - t^-decay_rate
            min_dim_size_to_factor=128,  # smaller parameters keep a full second moment
            clipping_threshold=1.0,  # update clipping at this RMS; 0 = off
            eps=1e-30,             # added to the squared gradient
        ),
    )


def validate(optim_cfg) -> None:
    check_choice('optim.name', optim_cfg.name, OPTIMIZERS)
    check_choice('optim.weight_decay_mode', optim_cfg.weight_decay_mode,
                 parametrization_lib.WEIGHT_DECAY_MODES)
    if optim_cfg.name == 'muon':
        muon = optim_cfg.muon
        if not 0.0 <= muon.momentum < 1.0:
            raise ConfigError(f'optim.muon.momentum={muon.momentum} must be in [0, 1)')
        if not isinstance(muon.ns_steps, int) or isinstance(muon.ns_steps, bool) or muon.ns_steps < 1:
            raise ConfigError(f'optim.muon.ns_steps={muon.ns_steps!r} must be an integer >= 1')
        if not muon.update_rms > 0:
            raise ConfigError(f'optim.muon.update_rms={muon.update_rms} must be > 0')
        if optim_cfg.weight_decay_mode == 'mup_scaled':
            raise ConfigError("optim.weight_decay_mode='mup_scaled' cannot be used with "
                              "optim.name='muon': it offsets the 1/m LR of Adam's hidden matrices, "
                              "which Muon's matrices do not have; use 'auto', 'coupled' or "
                              "'independent'")
    if optim_cfg.name == 'adafactor':
        factor = optim_cfg.adafactor
        if not factor.decay_rate > 0:
            raise ConfigError(f'optim.adafactor.decay_rate={factor.decay_rate} must be > 0')
        size = factor.min_dim_size_to_factor
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigError(f'optim.adafactor.min_dim_size_to_factor={size!r} must be an '
                              'integer >= 1')
        if factor.clipping_threshold < 0:
            raise ConfigError(f'optim.adafactor.clipping_threshold={factor.clipping_threshold} '
                              'must be >= 0 (0 = off)')
        if not factor.eps > 0:
            raise ConfigError(f'optim.adafactor.eps={factor.eps} must be > 0')
    for key in ('b1', 'b2'):
        if not 0.0 <= optim_cfg[key] < 1.0:
            raise ConfigError(f'optim.{key}={optim_cfg[key]} must be in [0, 1)')
    if optim_cfg.eps <= 0:
        raise ConfigError(f'optim.eps={optim_cfg.eps} must be > 0')
    if optim_cfg.weight_decay < 0:
        raise ConfigError(f'optim.weight_decay={optim_cfg.weight_decay} must be >= 0')
    if optim_cfg.grad_clip < 0:
        raise ConfigError(f'optim.grad_clip={optim_cfg.grad_clip} must be >= 0 (0 = off)')


class _CountState(NamedTuple):
    count: jax.Array


def scale_by_tree(mults) -> optax.GradientTransformation:
    """Multiplies each update by its own constant (a tree like the params; inside
    optax.partition the other groups' updates are MaskedNodes and pass through)."""
    masked = lambda x: isinstance(x, MaskedNode)  # noqa: E731

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u if masked(u) else u * m, updates, mults,
                            is_leaf=masked), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def add_decay(rates, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """updates + rate_i * s(t) * params, with s = 1 when no schedule is given."""

    def update(updates, state, params):
        s = 1.0 if schedule is None else schedule(state.count)
        new = jax.tree.map(lambda u, r, p: u + (r * s) * p if r != 0.0 else u, updates, rates, params)
        return new, _CountState(optax.safe_increment(state.count))

    return optax.GradientTransformation(lambda params: _CountState(jnp.zeros([], jnp.int32)), update)


def _with_eps_scale(rule: optax.GradientTransformation, info,
                    parametrization: Parametrization) -> optax.GradientTransformation:
    """`rule` (Adam or Adafactor) with a per-parameter epsilon eps * eps_mult_i.

    Both updates depend on the gradient's scale only through eps, so eps * c for one parameter
    is the same as scaling its gradient by 1/c before one shared rule; that keeps a single
    optimizer state (and multiplying by 1.0 is exact). Adafactor adds eps to g^2, so there the
    effective factor is c^2, which keeps eps / g^2 at its base value just the same.
    """
    grad_scale = parametrization_lib.per_param(
        info, lambda role, in_block: 1.0 / parametrization.eps_mult(role, in_block))
    if all(s == 1.0 for s in jax.tree.leaves(grad_scale)):
        return rule
    return optax.chain(scale_by_tree(grad_scale), rule)


def matrix_dims(info) -> MuonDimensionNumbers | None:
    """How Muon sees a parameter as a matrix, or None for one it leaves to Adam.

    A matrix maps its leading 'embed' axis to all the others (attention q/k/v, Mamba-2 input
    projections), or else all its other axes to its last one (attention and SSM output
    projections, MLPs, convolution kernels).
    """
    if info.role not in MUON_ROLES or len(info.axes) < 2:
        return None
    n = len(info.axes)
    if info.axes[0] == 'embed':
        return MuonDimensionNumbers(reduction_axis=(0,), output_axis=tuple(range(1, n)))
    return MuonDimensionNumbers(reduction_axis=tuple(range(n - 1)), output_axis=(n - 1,))


def _is_info(x) -> bool:
    return hasattr(x, 'role') and hasattr(x, 'axes')


def _muon(optim_cfg, info, shapes, parametrization: Parametrization) -> optax.GradientTransformation:
    """Muon for the matrices, Adam (with its eps rule) for the rest, one state per group."""
    dims = jax.tree.map(matrix_dims, info, is_leaf=_is_info)
    labels = jax.tree.map(lambda d: 'adam' if d is None else 'muon', dims,
                          is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))
    muon_cfg = optim_cfg.muon

    def fans(shape, d: MuonDimensionNumbers) -> tuple[int, int]:
        return (math.prod(shape[a] for a in d.reduction_axis),
                math.prod(shape[a] for a in d.output_axis))

    # Masked to the matrices, as optax.partition hands them to the Muon group.
    masked_dims = jax.tree.map(
        lambda d: MaskedNode() if d is None else d, dims,
        is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers))
    scales = jax.tree.map(
        lambda i, d, s: 1.0 if d is None else parametrization.spectral_scale(
            i.role, *fans(s.shape, d), muon_cfg.update_rms),
        info, dims, shapes,
        is_leaf=lambda x: x is None or _is_info(x))
    muon = optax.chain(
        optax.contrib.scale_by_muon(ns_steps=muon_cfg.ns_steps, beta=muon_cfg.momentum,
                                    nesterov=True, weight_dimension_numbers=masked_dims),
        scale_by_tree(scales))
    adam = _with_eps_scale(optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
                           info, parametrization)
    return optax.partition({'muon': muon, 'adam': adam}, labels)


def _adafactor(optim_cfg, info, parametrization: Parametrization) -> optax.GradientTransformation:
    factor = optim_cfg.adafactor
    parts = [optax.scale_by_factored_rms(factored=True, decay_rate=factor.decay_rate,
                                         min_dim_size_to_factor=factor.min_dim_size_to_factor,
                                         epsilon=factor.eps)]
    if factor.clipping_threshold > 0:
        parts.append(optax.clip_by_block_rms(factor.clipping_threshold))
    if optim_cfg.b1 > 0:
        parts.append(optax.ema(optim_cfg.b1, debias=True))
    return _with_eps_scale(optax.chain(*parts), info, parametrization)


def update_rule(optim_cfg, info, shapes, parametrization: Parametrization) -> optax.GradientTransformation:
    """The part of the chain that differs between optimizers (before decay, LR and schedule)."""
    if optim_cfg.name == 'muon':
        return _muon(optim_cfg, info, shapes, parametrization)
    if optim_cfg.name == 'adafactor':
        return _adafactor(optim_cfg, info, parametrization)
    adam = optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
    return _with_eps_scale(adam, info, parametrization)


def lr_mults(optim_cfg, info, parametrization: Parametrization):
    """Per-parameter LR multipliers: the parametrization's, with Muon's matrices spectral."""
    spectral = optim_cfg.name == 'muon'
    return jax.tree_util.tree_map_with_path(
        lambda path, i: parametrization.lr_mult(
            i.role, parametrization_lib.in_block(path),
            spectral=spectral and matrix_dims(i) is not None),
        info, is_leaf=_is_info)


def decay_mode_and_factor(optim_cfg, parametrization: Parametrization, peak=None):
    """(the mode applied, the factor turning optim.weight_decay into lambda in that mode's
    units), with 'auto' resolved. `peak` (a traced peak LR, or None for optim.lr) is the LR the
    schedule peaks at; the factor is 1.0 or that peak, so per-parameter rates stay constants
    (a zero rate is skipped at trace time)."""
    mode = parametrization.weight_decay_mode(optim_cfg.weight_decay_mode)
    if optim_cfg.weight_decay_mode == 'auto' and mode == 'independent':
        # Torch-style lambda -> the fraction coupled decay removes per step at the base width.
        return mode, _peak(optim_cfg, peak)
    return mode, 1.0


def _peak(optim_cfg, peak):
    return optim_cfg.lr if peak is None else peak


def make_optimizer(optim_cfg, schedule: optax.Schedule, definition: ModelDef,
                   parametrization: Parametrization, peak=None) -> optax.GradientTransformation:
    """The full chain for the model `definition` (its ParamInfo tree and shapes) under the
    run's `parametrization`. `peak`: the schedule's peak LR when it is a traced input of the
    step (None: optim.lr); the chain's state does not depend on it."""
    info, shapes = definition.info, definition.shapes
    mode, factor = decay_mode_and_factor(optim_cfg, parametrization, peak)
    mults = lr_mults(optim_cfg, info, parametrization)
    decay = parametrization_lib.per_param(
        info, lambda role, _: optim_cfg.weight_decay * parametrization.wd_mult(role, mode))
    parts = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip > 0 else []
    parts.append(update_rule(optim_cfg, info, shapes, parametrization))
    if mode == 'independent':
        # Decay follows the schedule's shape (eta_t / eta_peak) but not its size.
        parts += [scale_by_tree(mults), optax.scale_by_learning_rate(schedule),
                  add_decay(jax.tree.map(lambda r: -r, decay),
                            lambda count: factor * schedule(count) / _peak(optim_cfg, peak))]
    else:
        parts += [add_decay(decay), scale_by_tree(mults), optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)


def _group(role: str, in_block: bool) -> str:
    return f'{role}_in_blocks' if role == 'vector' and in_block else role


def applied_rates(optim_cfg, schedule: optax.Schedule, definition: ModelDef,
                  parametrization: Parametrization, peak=None):
    """step -> {'lr/<group>': applied LR, 'wd/<group>': fraction of p removed per step by decay}."""
    info = definition.info
    mode, factor = decay_mode_and_factor(optim_cfg, parametrization, peak)
    groups = {}
    roles = parametrization_lib.per_param(info, lambda r, b: (r, b))
    for (role, in_block), lr_mult in zip(
            jax.tree.leaves(roles, is_leaf=lambda x: isinstance(x, tuple)),
            jax.tree.leaves(lr_mults(optim_cfg, info, parametrization))):
        groups[_group(role, in_block)] = (
            lr_mult, optim_cfg.weight_decay * parametrization.wd_mult(role, mode))

    def rates(step: jax.Array) -> dict[str, jax.Array]:
        eta = schedule(step)
        out = {}
        for name, (lr_mult, wd) in sorted(groups.items()):
            out[f'lr/{name}'] = eta * lr_mult
            coupled = mode != 'independent'
            out[f'wd/{name}'] = (eta * lr_mult * wd if coupled
                                 else factor * wd * eta / _peak(optim_cfg, peak))
        return out

    return rates
