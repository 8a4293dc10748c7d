"""Attention kernels (model.attention_impl): equal to the dense one, alone and in every family
that attends, under sequence sharding; blockwise memory and block skipping; config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_zoo import FAMILIES, attention, var
from model_zoo.layers import rope
from pretrain import config as config_lib
from pretrain import mesh as mesh_lib
from pretrain import parametrization
from pretrain.errors import ConfigError
from tests.helpers import random_tokens, tiny_config, with_mesh

PATCH_NUMS = (1, 2, 3, 4)    # VAR's 30 tokens: a block-causal order that no block size tiles
ORDERS = {'causal': attention.causal_order(30), 'block_causal': var.levels(PATCH_NUMS)}


def _qkv(B=2, L=30, H=4, G=2, K=8, seed=0):
    q, k, v = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(q, (B, L, H, K)), jax.random.normal(k, (B, L, G, K)),
            jax.random.normal(v, (B, L, G, K)))


def _value_and_grads(impl, order, q_BLHK, k_BMGK, v_BMGK, block_size=8):
    def loss(q_BLHK, k_BMGK, v_BMGK):
        q_BLHK = mesh_lib.constrain(q_BLHK, ('act_batch', 'act_length', 'act_heads', None))
        k_BMGK = mesh_lib.constrain(k_BMGK, ('act_batch', 'act_length', 'act_kv_heads', None))
        out_BLHK = attention.attend(q_BLHK, k_BMGK, v_BMGK, order, impl=impl, scale=0.3,
                                    block_size=block_size)
        return jnp.sum(jnp.sin(out_BLHK))   # not linear in the output: cotangents differ per entry
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q_BLHK, k_BMGK, v_BMGK)


def _assert_close(got, want, tol=2e-5):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- kernels

@pytest.mark.parametrize('mask', list(ORDERS))
def test_kernels_equal_dense_attention_and_its_gradients(mask):
    """GQA (4 query heads on 2 kv heads), 30 tokens in blocks of 8 (padded): values and grads."""
    qkv = _qkv()
    want = _value_and_grads('xla', ORDERS[mask], *qkv)
    # The dense kernel is the old materialised softmax, written out here.
    q, k, v = qkv
    k4, v4 = (jnp.repeat(x, 2, axis=2) for x in (k, v))
    logits = jnp.einsum('blhk,bmhk->bhlm', q, k4) * 0.3
    order = ORDERS[mask]
    probs = jax.nn.softmax(jnp.where(order[None, :] <= order[:, None], logits, -jnp.inf), -1)
    np.testing.assert_allclose(want[0], jnp.sum(jnp.sin(jnp.einsum('bhlm,bmhk->blhk', probs, v4))),
                               rtol=1e-5)
    for impl in ('dot_product', 'blockwise'):
        _assert_close(_value_and_grads(impl, ORDERS[mask], *qkv), want)


@pytest.mark.parametrize('mask', list(ORDERS))
def test_splash_runs_in_interpret_mode_off_tpu_and_equals_dense(mask):
    qkv = _qkv(B=1)
    _assert_close(_value_and_grads('splash', ORDERS[mask], *qkv),
                  _value_and_grads('xla', ORDERS[mask], *qkv))


@pytest.mark.parametrize('impl', config_lib.ATTENTION_IMPLS)
def test_kernels_are_exact_under_sequence_and_tensor_sharding(impl):
    c = with_mesh(tiny_config(), data=2, tensor=2, sequence=2)
    qkv = _qkv(L=32)
    order = attention.causal_order(32)
    want = _value_and_grads('xla', order, *qkv)
    with mesh_lib.activate(mesh_lib.make_mesh(c.mesh)):
        _assert_close(_value_and_grads(impl, order, *qkv), want)


def test_blockwise_skips_hidden_blocks_and_never_holds_a_length_squared_array():
    causal = attention.causal_order(64)
    np.testing.assert_array_equal(
        attention._key_blocks_needed(jnp.asarray(causal).reshape(4, 16), jnp.asarray(causal), 16),
        [1, 2, 3, 4])                                   # the diagonal and everything left of it
    lv = jnp.asarray(var.levels(PATCH_NUMS))           # levels 0 1111 222222222 4444...
    np.testing.assert_array_equal(
        attention._key_blocks_needed(jnp.pad(lv, (0, 2), constant_values=9).reshape(4, 8), lv, 8),
        [2, 4, 4, 4])                                  # a scale sees all of itself

    L = 256
    q, k, v = _qkv(B=1, L=L, H=2, G=2)
    grad = jax.grad(lambda q, k, v: jnp.sum(attention.attend(
        q, k, v, attention.causal_order(L), impl='blockwise', scale=0.3, block_size=32)),
        argnums=(0, 1, 2))
    shapes = [out.aval.shape for eqn in _all_eqns(jax.make_jaxpr(grad)(q, k, v).jaxpr)
              for out in eqn.outvars]
    assert shapes and not [s for s in shapes if sum(d == L for d in s) >= 2], 'an L x L array'


def _all_eqns(jaxpr):
    """Every equation, including those inside loops, conds and custom-VJP bodies."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, 'jaxpr', sub)
                if hasattr(sub, 'eqns'):
                    yield from _all_eqns(sub)


def test_rope_equals_the_split_and_concatenate_formula():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 3, 8))
    positions = jnp.arange(12) + 5
    half = 4
    angle = positions[:, None] * 10_000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    sin, cos = jnp.sin(angle)[None, :, None], jnp.cos(angle)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    want = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    np.testing.assert_allclose(rope(x, positions, 10_000.0), want, rtol=1e-6, atol=1e-6)
    bf16 = rope(x.astype(jnp.bfloat16), positions, 10_000.0)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- families

def _model_value_and_grads(c, loss_fn, batch):
    """Loss and parameter gradients of the model `c` builds, under the config's mesh."""
    model = FAMILIES.get(c.model.family).build(c, nnx.Rngs(0), parametrization.from_config(c))
    graphdef, params = nnx.split(model)
    loss = lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0]  # noqa: E731
    with mesh_lib.activate(mesh_lib.make_mesh(c.mesh)):
        return jax.jit(jax.value_and_grad(loss))(params)


def _text_batch():
    tokens = random_tokens((4, 33), seed=3)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}


def _hybrid_config():
    c = with_mesh(tiny_config(), data=4, sequence=2)
    c.model.family = 'mamba'
    c.model.ssm.update(version=2, attn_every=2, headdim=16, chunk_size=8, d_state=8)
    return c


def _var_config():
    c = with_mesh(tiny_config(), data=2, tensor=2, sequence=2)
    c.model.family = 'var'
    c.model.update(n_layers=2, d_model=32, n_heads=2)
    c.model.var.update(patch_nums=PATCH_NUMS, codebook_size=32, latent_channels=8,
                       num_classes=10, mlp_ratio=2.0)
    return c


def _var_batch(B=4):
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    return {'inputs': jax.random.normal(keys[0], (B, 29, 8)),
            'codes': jax.random.randint(keys[1], (B, 30), 0, 32),
            'labels': jnp.arange(B, dtype=jnp.int32), 'u': jnp.ones((B,))}


CASES = {   # family -> (config with a sequence axis, batch)
    'transformer': lambda: (with_mesh(tiny_config(), data=2, sequence=4), _text_batch()),
    'mamba': lambda: (_hybrid_config(), _text_batch()),   # hybrid: block 1 is attention
    'var': lambda: (_var_config(), _var_batch()),
}


@functools.lru_cache(maxsize=None)
def _family_value_and_grads(family: str, impl: str):
    c, batch = CASES[family]()
    c.model.update(attention_impl=impl, attention_block_size=8)
    return jax.device_get(_model_value_and_grads(c, FAMILIES.get(family).loss, batch))


@pytest.mark.parametrize('impl', ['dot_product', 'blockwise'])
@pytest.mark.parametrize('family', list(CASES))
def test_loss_and_gradients_equal_dense_attention_under_sequence_sharding(family, impl):
    got, want = _family_value_and_grads(family, impl), _family_value_and_grads(family, 'xla')
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    _assert_close(got[1], want[1], tol=1e-5)


@pytest.mark.slow   # Pallas interpret mode: tens of seconds per model on CPU
@pytest.mark.parametrize('family', list(CASES))
def test_splash_in_every_family_under_sequence_sharding(family):
    got, want = _family_value_and_grads(family, 'splash'), _family_value_and_grads(family, 'xla')
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    _assert_close(got[1], want[1], tol=1e-5)


# ----------------------------------------------------------------------------- config

def _validate(c):
    config_lib.validate(c, FAMILIES.get(c.model.family), num_devices=8)


def test_attention_impl_is_checked_and_named():
    c = tiny_config()
    c.model.attention_impl = 'flash'
    with pytest.raises(ConfigError, match=r"model.attention_impl='flash' is not allowed; choose "
                                          r"one of \['xla', 'dot_product', 'blockwise', 'splash'\]"):
        _validate(c)
    c.model.attention_impl = 'blockwise'
    c.model.attention_block_size = 0
    with pytest.raises(ConfigError, match='model.attention_block_size=0 must be an integer >= 1'):
        _validate(c)
    c = with_mesh(tiny_config(), data=4, sequence=2)
    c.model.update(attention_impl='blockwise', attention_block_size=12)
    with pytest.raises(ConfigError, match=r'model.attention_block_size=12 must divide the '
                                          r'per-device sequence length data.seq_len / sequence = '
                                          r'32 / 2 = 16'):
        _validate(c)
    for block in (8, 16, 512):   # tiles the shard, or covers it
        c.model.attention_block_size = block
        _validate(c)
    assert config_lib.to_json(c).count('"attention_impl": "blockwise"') == 1
