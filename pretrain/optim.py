"""The optax chain: clip -> Adam scaling -> weight decay (masked by role) -> schedule."""

import jax
import optax

from pretrain.errors import ConfigError, check_choice

OPTIMIZERS = ('adamw',)


def validate(optim_cfg) -> None:
    o = optim_cfg
    check_choice('optim.name', o.name, OPTIMIZERS)
    for key in ('b1', 'b2'):
        if not 0.0 <= o[key] < 1.0:
            raise ConfigError(f'optim.{key}={o[key]} must be in [0, 1)')
    if o.eps <= 0:
        raise ConfigError(f'optim.eps={o.eps} must be > 0')
    if o.weight_decay < 0:
        raise ConfigError(f'optim.weight_decay={o.weight_decay} must be >= 0')
    if o.grad_clip < 0:
        raise ConfigError(f'optim.grad_clip={o.grad_clip} must be >= 0 (0 = off)')


def decay_mask(info):
    """Vector-like parameters (norm gains, biases) get no weight decay."""
    return jax.tree.map(lambda i: i.role != 'vector', info)


def make_optimizer(optim_cfg, schedule: optax.Schedule, info) -> optax.GradientTransformation:
    """AdamW with decoupled-from-gradient, LR-coupled weight decay (as optax.adamw)."""
    o = optim_cfg
    parts = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts += [
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask(info)),
        optax.scale_by_learning_rate(schedule),
    ]
    return optax.chain(*parts)
