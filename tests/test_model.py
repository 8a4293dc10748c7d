"""Transformer checks: causality, a pinned golden loss, parameter metadata, remat and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_zoo import FAMILIES
from model_zoo.layers import ROLES
from pretrain import mesh as mesh_lib
from pretrain import state as state_lib
from tests.helpers import fixed_batch_losses, random_tokens, tiny_config

FAMILY = FAMILIES.get('transformer')


def _model(**model):
    c = tiny_config()
    c.model.update(**model)
    return c, FAMILY.build(c, nnx.Rngs(0))


_tokens = random_tokens


@pytest.mark.parametrize('tie', [False, True])
def test_causality(tie):
    _, model = _model(tie_embeddings=tie)
    tokens = _tokens((2, 16))
    t = 9
    changed = tokens.at[:, t + 1:].set(_tokens((2, 16 - t - 1), seed=1))
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(np.asarray(a[:, :t + 1]), np.asarray(b[:, :t + 1]))
    assert not np.allclose(np.asarray(a[:, t + 1:]), np.asarray(b[:, t + 1:]))


def test_every_parameter_has_logical_axes_and_a_role():
    c, _ = _model()
    md = state_lib.model_def(FAMILY.build, c)
    infos = jax.tree.leaves(md.info)
    assert infos and all(i.role in ROLES for i in infos)
    shapes = jax.tree.leaves(md.shapes)
    assert all(len(i.axes) == len(s.shape) for i, s in zip(infos, shapes))
    roles = {i.role for i in infos}
    assert roles == {'embedding', 'hidden', 'readout', 'vector'}   # the transformer's roles
    spec = mesh_lib.logical_to_spec(md.info['embed']['table'].axes)
    assert spec == jax.sharding.PartitionSpec('tensor', 'fsdp')


def test_gqa_parameter_count_and_flops():
    c, _ = _model(n_heads=4, n_kv_heads=2)
    md = state_lib.model_def(FAMILY.build, c)
    m = c.model
    head_dim = m.d_model // m.n_heads
    per_layer = m.d_model * head_dim * (4 + 2 + 2 + 4) + 3 * m.d_model * m.d_ff + 2 * m.d_model
    expected = m.n_layers * per_layer + 2 * m.vocab_size * m.d_model + m.d_model
    assert state_lib.param_count(md) == expected


def _one_step_losses(c, steps=2):
    """Losses of `steps` updates of a fixed synthetic batch on one device."""
    return fixed_batch_losses(FAMILY, c, jax.devices()[:1], _tokens((4, 33), seed=3), steps)


def test_golden_loss_after_one_step():
    c = tiny_config()
    c.mesh.ici.update(data=1)
    # Pinned on CPU float32; a change here means the model, init or optimizer changed.
    np.testing.assert_allclose(_one_step_losses(c), GOLDEN, rtol=1e-5)


GOLDEN = [5.578348, 5.403826]


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_does_not_change_the_math(remat):
    c = tiny_config()
    c.mesh.ici.update(data=1)
    base = _one_step_losses(c)
    c.model.remat = remat
    np.testing.assert_allclose(_one_step_losses(c), base, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    _, model = _model(compute_dtype='bfloat16')
    logits = model(_tokens((2, 8)))
    assert logits.dtype == jnp.float32
    assert model.blocks[0].mlp.w_up[...].dtype == jnp.float32
    c = tiny_config()
    c.mesh.ici.update(data=1)
    c.model.compute_dtype = 'bfloat16'
    losses = _one_step_losses(c)
    assert np.isfinite(losses).all() and abs(losses[0] - GOLDEN[0]) < 0.05
