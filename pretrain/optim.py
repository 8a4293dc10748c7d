"""The optax chain: clip -> Adam -> weight decay -> per-parameter LR multipliers -> schedule.

Per-parameter LR, epsilon and decay multipliers come from the parametrization (by role), so
SP, muP and depth-muP share one chain. Weight-decay modes (lambda = optim.weight_decay):
- 'coupled' (optax.adamw):   p -= eta_t * lr_i * (adam + lambda * p)
- 'mup_scaled':              as coupled with lambda * m for hidden matrices (eta/m * lambda*m)
- 'independent':             p -= eta_t * lr_i * adam + lambda * (eta_t / eta_peak) * p
- 'auto':                    'coupled' under SP; under muP 'independent' with lambda replaced by
                             eta_peak * lambda (see pretrain/parametrization.py)
Vector-like parameters (norm gains, biases) get no weight decay.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from pretrain import parametrization as parametrization_lib
from pretrain.parametrization import Parametrization
from pretrain.errors import ConfigError, check_choice

OPTIMIZERS = ('adamw',)


def validate(optim_cfg) -> None:
    check_choice('optim.name', optim_cfg.name, OPTIMIZERS)
    check_choice('optim.weight_decay_mode', optim_cfg.weight_decay_mode,
                 parametrization_lib.WEIGHT_DECAY_MODES)
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
    """Multiplies each update by its own constant."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(lambda u, m: u * m, updates, mults), state))


def add_decay(rates, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """updates + rate_i * s(t) * params, with s = 1 when no schedule is given."""

    def update(updates, state, params):
        s = 1.0 if schedule is None else schedule(state.count)
        new = jax.tree.map(lambda u, r, p: u + (r * s) * p if r != 0.0 else u, updates, rates, params)
        return new, _CountState(optax.safe_increment(state.count))

    return optax.GradientTransformation(lambda params: _CountState(jnp.zeros([], jnp.int32)), update)


def _adam(optim_cfg, info, parametrization) -> optax.GradientTransformation:
    """Adam with a per-parameter epsilon eps * eps_mult_i.

    Adam's update g / (|g| + eps) depends on the gradient's scale only through eps, so
    eps * c for one parameter is the same as scaling its gradient by 1/c before one shared
    Adam; that keeps a single optimizer state (and multiplying by 1.0 is exact).
    """
    grad_scale = parametrization_lib.per_param(
        info, lambda role, in_block: 1.0 / parametrization.eps_mult(role, in_block))
    adam = optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
    if all(s == 1.0 for s in jax.tree.leaves(grad_scale)):
        return adam
    return optax.chain(scale_by_tree(grad_scale), adam)


def decay_mode_and_rate(optim_cfg, parametrization: Parametrization) -> tuple[str, float]:
    """(the mode applied, lambda in that mode's units), with 'auto' resolved."""
    mode = parametrization.weight_decay_mode(optim_cfg.weight_decay_mode)
    if optim_cfg.weight_decay_mode == 'auto' and mode == 'independent':
        # Torch-style lambda -> the fraction coupled decay removes per step at the base width.
        return mode, optim_cfg.lr * optim_cfg.weight_decay
    return mode, optim_cfg.weight_decay


def make_optimizer(optim_cfg, schedule: optax.Schedule, info,
                   parametrization: Parametrization) -> optax.GradientTransformation:
    """The full chain; `info` is the ParamInfo tree, `parametrization` the run's parametrization."""
    mode, weight_decay = decay_mode_and_rate(optim_cfg, parametrization)
    lr_mults = parametrization_lib.per_param(info, parametrization.lr_mult)
    decay = parametrization_lib.per_param(
        info, lambda role, _: weight_decay * parametrization.wd_mult(role, mode))
    parts = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip > 0 else []
    parts.append(_adam(optim_cfg, info, parametrization))
    if mode == 'independent':
        # Decay follows the schedule's shape (eta_t / eta_peak) but not its size.
        parts += [scale_by_tree(lr_mults), optax.scale_by_learning_rate(schedule),
                  add_decay(jax.tree.map(lambda r: -r, decay),
                            lambda count: schedule(count) / optim_cfg.lr)]
    else:
        parts += [add_decay(decay), scale_by_tree(lr_mults), optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)


def _group(role: str, in_block: bool) -> str:
    return f'{role}_in_blocks' if role == 'vector' and in_block else role


def applied_rates(optim_cfg, schedule: optax.Schedule, info, parametrization: Parametrization):
    """step -> {'lr/<group>': applied LR, 'wd/<group>': fraction of p removed per step by decay}."""
    mode, weight_decay = decay_mode_and_rate(optim_cfg, parametrization)
    groups = {}
    roles = parametrization_lib.per_param(info, lambda r, b: (r, b))
    for (role, in_block) in set(jax.tree.leaves(roles,
                                                is_leaf=lambda x: isinstance(x, tuple))):
        groups[_group(role, in_block)] = (parametrization.lr_mult(role, in_block),
                                          weight_decay * parametrization.wd_mult(role, mode))

    def rates(step: jax.Array) -> dict[str, jax.Array]:
        eta = schedule(step)
        out = {}
        for name, (lr_mult, wd) in sorted(groups.items()):
            out[f'lr/{name}'] = eta * lr_mult
            coupled = mode != 'independent'
            out[f'wd/{name}'] = eta * lr_mult * wd if coupled else wd * eta / optim_cfg.lr
        return out

    return rates
