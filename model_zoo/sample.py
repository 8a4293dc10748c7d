"""Autoregressive sampling for any model with the generation API.

A model offers `init_cache(batch, max_len) -> cache`, `prefill(tokens_BL, cache) -> (logits_BV,
cache)` (logits of the last prompt position) and `step(tokens_B, cache) -> (logits_BV, cache)`;
the cache is a plain pytree (a key/value buffer for attention, a fixed-size state for SSMs).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def choose(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy when temperature == 0, else a softmax(logits / temperature) draw over the top k."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=('num_tokens', 'temperature', 'top_k'))
def _generate(model, prompt_BL, key, num_tokens, temperature, top_k):
    batch, length = prompt_BL.shape
    cache = model.init_cache(batch, length + num_tokens)
    logits_BV, cache = model.prefill(prompt_BL, cache)

    def body(carry, key):
        logits_BV, cache = carry
        tokens_B = choose(logits_BV, key, temperature, top_k)
        logits_BV, cache = model.step(tokens_B, cache)
        return (logits_BV, cache), tokens_B

    _, tokens_NB = jax.lax.scan(body, (logits_BV, cache), jax.random.split(key, num_tokens))
    return tokens_NB.T


def sample(model: nnx.Module, prompt_BL: jax.Array, num_tokens: int, key: jax.Array | None = None,
           *, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """`num_tokens` new tokens [B, num_tokens] after `prompt_BL`, one compiled loop."""
    if num_tokens < 1:
        raise ValueError(f'num_tokens={num_tokens} must be >= 1')
    if temperature < 0:
        raise ValueError(f'temperature={temperature} must be >= 0 (0 = greedy)')
    key = jax.random.PRNGKey(0) if key is None else key
    return _generate(model, jnp.asarray(prompt_BL, jnp.int32), key, num_tokens,
                     float(temperature), int(top_k))
