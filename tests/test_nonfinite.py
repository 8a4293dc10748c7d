"""Non-finite state: a step whose new params or optimizer state hold NaN/inf is flagged and not
applied, even with a finite loss and gradients; 'skip' stops after too many skips in a row."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model_zoo import FAMILIES
from pretrain import config as config_lib
from pretrain import step as step_lib
from pretrain.errors import ConfigError, NonFiniteError
from pretrain.nonfinite import NonFiniteGuard
from pretrain.state import TrainState
from tests.helpers import tiny_config

IDENTITY = SimpleNamespace(merge=lambda params: params)   # the "model" is its params dict


def _loss(params, batch):
    loss = jnp.mean((params['w'] * batch['x'] - 1.0) ** 2)
    return loss, {'loss': loss}


def _poke_at(step_to_poke: int, *, updates_by=1.0, state_to=0.0):
    """A transformation that, at one step, scales the updates and sets its own state."""
    def init(params):
        return {'count': jnp.zeros([], jnp.int32), 'acc': jnp.zeros(3)}

    def update(updates, state, params=None):
        hit = state['count'] == step_to_poke
        updates = jax.tree.map(lambda u: u * jnp.where(hit, updates_by, 1.0), updates)
        acc = jnp.where(hit, jnp.full(3, state_to), state['acc'])
        return updates, {'count': state['count'] + 1, 'acc': acc}

    return optax.GradientTransformation(init, update)


def _run(tx, steps=3, keep_previous=True):
    params = {'w': jnp.ones(4)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                       rng=jnp.zeros(2, jnp.uint32))
    train_step = jax.jit(step_lib.make_train_step(_loss, IDENTITY, tx, lambda s: jnp.float32(0.1),
                                                  keep_previous_on_nonfinite=keep_previous))
    batch = {'x': jnp.arange(4.0)}
    out = []
    for _ in range(steps):
        before = state
        state, metrics = train_step(state, batch)
        out.append((before, state, jax.device_get(metrics)))
    return out


def test_inf_parameters_from_finite_gradients_are_flagged_and_not_applied():
    tx = optax.chain(optax.sgd(0.1), _poke_at(1, updates_by=jnp.inf))
    steps = _run(tx, steps=2)
    flags = [int(m['nonfinite']) for _, _, m in steps]
    assert flags == [0, step_lib.NONFINITE_STATE]
    before, after, metrics = steps[1]
    assert np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])
    np.testing.assert_array_equal(after.params['w'], before.params['w'])
    assert metrics['param_norm'] == pytest.approx(float(jnp.linalg.norm(before.params['w'])))
    assert int(after.step) == 2   # the batch was consumed


def test_stop_policy_flags_without_rolling_back():
    # nonfinite_policy='stop' leaves out the select: the flag is the same, the state is not
    # restored (the loop stops before it uses it).
    tx = optax.chain(optax.sgd(0.1), _poke_at(1, updates_by=jnp.inf))
    steps = _run(tx, steps=2, keep_previous=False)
    assert [int(m['nonfinite']) for _, _, m in steps] == [0, step_lib.NONFINITE_STATE]
    assert not np.isfinite(np.asarray(steps[1][1].params['w'])).all()


def test_inf_optimizer_state_with_finite_updates_is_flagged():
    tx = optax.chain(optax.sgd(0.1), _poke_at(0, state_to=jnp.inf))
    before, after, metrics = _run(tx, steps=1)[0]
    assert int(metrics['nonfinite']) == step_lib.NONFINITE_STATE
    np.testing.assert_array_equal(after.opt_state[1]['acc'], before.opt_state[1]['acc'])
    np.testing.assert_array_equal(after.params['w'], before.params['w'])


def test_large_finite_optimizer_state_is_not_flagged():
    # A sum of squares of these would overflow float32; each entry is finite.
    tx = optax.chain(optax.sgd(0.1), _poke_at(0, state_to=3e38))
    _, after, metrics = _run(tx, steps=1)[0]
    assert int(metrics['nonfinite']) == 0
    assert float(after.opt_state[1]['acc'][0]) == pytest.approx(3e38)


def test_nan_gradients_keep_their_own_bit():
    tx = optax.sgd(0.1)
    params = {'w': jnp.ones(4)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                       rng=jnp.zeros(2, jnp.uint32))
    train_step = step_lib.make_train_step(_loss, IDENTITY, tx, lambda s: jnp.float32(0.1))
    _, metrics = train_step(state, {'x': jnp.full(4, jnp.nan)})
    assert int(metrics['nonfinite']) & step_lib.NONFINITE_GRADS
    assert step_lib.describe_nonfinite(3) == ('loss or gradients and updated parameters or '
                                              'optimizer state')


# --- the loop's guard -----------------------------------------------------------------------

def _no_checkpoint():
    return None, None


def test_skip_stops_after_max_consecutive_skips():
    guard = NonFiniteGuard('skip', max_consecutive_skips=3, skipped=5)
    lines = [guard.check(s, flag, 1.0, 1.0, _no_checkpoint)
             for s, flag in [(10, 1), (11, 2), (12, 0), (13, 1), (14, 1)]]
    assert lines[2] is None and 'update skipped (7 so far, 2 in a row)' in lines[1]
    assert guard.skipped == 9 and guard.consecutive == 2
    with pytest.raises(NonFiniteError) as err:
        guard.check(15, 1, float('nan'), float('nan'), lambda: ('/run/checkpoints/12', 12))
    message = str(err.value)
    assert '3 consecutive steps (13-15)' in message and 'train.max_consecutive_skips=3' in message
    assert message.endswith('Last good checkpoint: /run/checkpoints/12 (step 12)')
    assert err.value.step == 15 and err.value.checkpoint == '/run/checkpoints/12'


def test_stop_raises_at_the_first_bad_step_and_names_the_kind():
    guard = NonFiniteGuard('stop', max_consecutive_skips=10)
    assert guard.check(1, 0, 1.0, 1.0, _no_checkpoint) is None
    with pytest.raises(NonFiniteError, match=r'non-finite updated parameters or optimizer state '
                                             r'at step 2 .*Last good checkpoint: none'):
        guard.check(2, step_lib.NONFINITE_STATE, 1.0, 1.0, _no_checkpoint)


def test_max_consecutive_skips_is_validated():
    c = tiny_config()
    assert c.train.max_consecutive_skips == 10
    c.train.max_consecutive_skips = 0
    with pytest.raises(ConfigError, match='train.max_consecutive_skips=0 must be an integer >= 1'):
        config_lib.validate(config_lib.finalize(c), FAMILIES.get('transformer'), num_devices=8)
