"""Generation: cached decoding equals the training forward; greedy, temperature and top-k sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_zoo import FAMILIES
from model_zoo.sample import choose, sample
from pretrain import parametrization
from tests.helpers import tiny_config


def _model(family):
    c = tiny_config()
    c.model.family = family
    c.model.ssm.update(version=2, headdim=16, chunk_size=8, d_state=8, attn_every=2)
    return FAMILIES.get(family).build(c, nnx.Rngs(0), parametrization.from_config(c))


def _tokens(shape, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, 256, dtype=jnp.int32)


@nnx.jit
def _prefill_then_steps(model, tokens_BL):
    """Logits from a 5-token prefill followed by one `step` per remaining token."""
    cache = model.init_cache(tokens_BL.shape[0], tokens_BL.shape[1])
    last_BV, cache = model.prefill(tokens_BL[:, :5], cache)
    def body(cache, tok_B):
        logits_BV, cache = model.step(tok_B, cache)
        return cache, logits_BV
    _, rest_LBV = jax.lax.scan(body, cache, tokens_BL[:, 5:].T)
    return model(tokens_BL), last_BV, jnp.moveaxis(rest_LBV, 0, 1)


def test_transformer_kv_cache_decoding_equals_the_forward():
    full, last, rest = _prefill_then_steps(_model('transformer'), _tokens((2, 9)))
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, 4]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rest), np.asarray(full[:, 5:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('family', ['transformer', 'mamba'])   # mamba: a Mamba-2/attention hybrid
def test_greedy_sampling_equals_argmax_of_the_full_forward(family):
    model = _model(family)
    prompt = _tokens((2, 4))
    out = sample(model, prompt, 5, temperature=0.0)
    assert out.shape == (2, 5) and out.dtype == jnp.int32
    # The reference recomputes the whole causal forward for every new token (one padded shape,
    # so it compiles once; positions after the current one cannot change its logits).
    seq = jnp.concatenate([prompt, jnp.zeros((2, 5), jnp.int32)], axis=1)
    forward = nnx.jit(lambda m, t: m(t))
    for i in range(4, 9):
        seq = seq.at[:, i].set(jnp.argmax(forward(model, seq)[:, i - 1], -1))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq[:, 4:]))


def test_top_k_and_temperature():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.5, -1.0]] * 64)
    keys = jax.random.split(jax.random.PRNGKey(0), 20)
    top2 = np.concatenate([np.asarray(choose(logits, k, 1.0, 2)) for k in keys])
    assert set(top2) == {1, 3}
    top1 = np.asarray(choose(logits, keys[0], 5.0, 1))
    assert (top1 == 1).all()
    cold = np.asarray(choose(logits, keys[0], 1e-3, 0))
    assert (cold == 1).all()
    hot = np.concatenate([np.asarray(choose(logits, k, 100.0, 0)) for k in keys])
    assert set(hot) == {0, 1, 2, 3, 4}


def test_sampling_is_reproducible_per_key():
    model = _model('transformer')
    prompt = _tokens((1, 3))
    a = sample(model, prompt, 4, jax.random.PRNGKey(1), temperature=1.0, top_k=10)
    b = sample(model, prompt, 4, jax.random.PRNGKey(1), temperature=1.0, top_k=10)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
