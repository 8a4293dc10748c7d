"""Train and eval steps: pure functions of (state, batch), jitted with shardings by the caller."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from pretrain.mesh import constrain
from pretrain.state import ModelDef, TrainState

Batch = dict[str, jax.Array]
BATCH_AXES = ('act_batch', 'act_length')
# Bits of metrics['nonfinite'].
NONFINITE_GRADS = 1   # the loss or the gradients
NONFINITE_STATE = 2   # the updated parameters or optimizer state


def _all_finite(tree) -> jax.Array:
    """True iff every floating-point entry of `tree` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def describe_nonfinite(code: int) -> str:
    """What a non-zero metrics['nonfinite'] says, for messages."""
    parts = []
    if code & NONFINITE_GRADS:
        parts.append('loss or gradients')
    if code & NONFINITE_STATE:
        parts.append('updated parameters or optimizer state')
    return ' and '.join(parts) or 'nothing'


def _microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...] taking rows i, i+n, ...: every device's shard feeds each micro-batch."""
    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(loss_fn: Callable, model_def: ModelDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1,
                    rates: Callable[[jax.Array], dict[str, jax.Array]] | None = None,
                    keep_previous_on_nonfinite: bool = True):
    """(state, batch) -> (state, metrics). Gradients are averaged over micro-batches in float32.

    `rates(step)` adds the applied LR and weight decay per parameter group to the metrics.

    metrics['nonfinite'] is non-zero when the step must not be applied: bit 1 (NONFINITE_GRADS)
    when the loss or the gradient norm was NaN/inf, bit 2 (NONFINITE_STATE) when the updated
    parameters or optimizer state hold a NaN/inf (e.g. an overflowing update from finite
    gradients). With `keep_previous_on_nonfinite` (train.nonfinite_policy='skip') the returned
    state then holds the previous params and optimizer state, so a non-finite state is never
    carried forward. Without it ('stop') the new state is returned as it is: the loop reads the
    flag before it logs, evaluates or saves anything after that step and stops there, so the
    state is never used; leaving out the select over every parameter and optimizer-state entry
    saves a read of both states per step.
    """

    def loss_of_params(params, batch):
        return loss_fn(model_def.merge(params), batch)

    grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

    def grads_and_metrics(params, batch):
        if grad_accum_steps == 1:
            (loss, metrics), grads = grad_fn(params, batch)
            return grads, loss, metrics

        def body(acc, micro):
            micro = jax.tree.map(lambda x: constrain(x, BATCH_AXES[:x.ndim]), micro)
            (loss, metrics), grads = grad_fn(params, micro)
            return jax.tree.map(jnp.add, acc, (grads, loss, metrics)), None

        micro = _microbatches(batch, grad_accum_steps)
        (loss, metrics), grads = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (grads, loss, metrics))
        (grads, loss, metrics), _ = jax.lax.scan(body, zeros, micro)
        scale = 1.0 / grad_accum_steps
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
        return grads, loss * scale, jax.tree.map(lambda m: m * scale, metrics)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        grads, loss, metrics = grads_and_metrics(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        # Scalar tests: a NaN or inf anywhere in the gradients (or the new params) makes their
        # norm non-finite. The params norm is the one reported anyway, so it costs nothing new.
        new_param_norm = optax.tree.norm(new_params)
        grads_ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # The optimizer state gets an all-finite reduction instead of a norm: its entries (e.g.
        # Adam's second moments, squares of gradients) may be large enough that a sum of squares
        # overflows while every entry is finite. It fuses with the update that writes them.
        state_ok = jnp.isfinite(new_param_norm) & _all_finite(opt_state)
        finite = grads_ok & state_ok
        if keep_previous_on_nonfinite:
            # A bad step keeps the old params and optimizer state. The step counter still
            # advances (the batch was consumed); the caller decides whether to go on.
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (new_params, opt_state),
                                             (state.params, state.opt_state))
            # The old params' norm is computed only on a rejected step (a real branch on device).
            param_norm = jax.lax.cond(finite, lambda: new_param_norm,
                                      lambda: optax.tree.norm(state.params))
        else:
            params, param_norm = new_params, new_param_norm
        nonfinite = (jnp.where(grads_ok, 0, NONFINITE_GRADS)
                     | jnp.where(state_ok, 0, NONFINITE_STATE)).astype(jnp.int32)
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step),
                       param_norm=param_norm, nonfinite=nonfinite,
                       **(rates(state.step) if rates else {}))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(loss_fn: Callable, model_def: ModelDef, byte_lengths: jax.Array | None = None):
    """(params, batch) -> {'loss', and 'bytes' (UTF-8 bytes of the targets) for text}."""

    def eval_step(params, batch: Batch) -> dict[str, jax.Array]:
        _, metrics = loss_fn(model_def.merge(params), batch)
        if byte_lengths is not None:
            metrics = dict(metrics, bytes=jnp.sum(byte_lengths[batch['targets']]),
                           tokens=jnp.float32(batch['targets'].size))
        return metrics

    return eval_step
