"""Shared blocks. Every parameter carries its logical axes and its muP role as metadata.

Roles (see the table in pretrain/parametrization.py): 'embedding' (input-like, width on the
output), 'hidden' (width on both sides), 'hidden_fan_in' (hidden, built with a 1/sqrt(fan_in)
init), 'hidden_to_fixed' (width in, a fixed size out, inside the network), 'readout' (width on
the input, the logits out), 'vector' (gains, biases).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from model_zoo import attention
from pretrain.mesh import constrain
from pretrain.parametrization import ROLES
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

Init = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Init, shape: Sequence[int], axes: Sequence[str | None],
          role: str, dtype: str = 'float32') -> nnx.Param:
    """A parameter tagged with its logical axes and role (read by sharding and muP)."""
    assert len(axes) == len(shape), (shape, axes)
    assert role in ROLES, role
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.dtype(dtype)), axes=tuple(axes), role=role)


def normal(std: float) -> Init:
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def ones(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


class RMSNorm(nnx.Module):
    """RMS normalisation with a learned gain, computed in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: str, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), ('norm',), 'vector', param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_BLHK: jax.Array, positions_L: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding on the last axis (pairs are (i, i + K/2)), in float32."""
    B, L, H, K = x_BLHK.shape
    half = K // 2
    freq_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_LK = positions_L[:, None].astype(jnp.float32) * freq_K[None, :]
    cos_L1K, sin_LK = jnp.cos(angle_LK)[:, None, :], jnp.sin(angle_LK)
    sin_L2K = jnp.stack([-sin_LK, sin_LK], axis=1)
    # Halves as an axis of 2: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) is x cos + flip(x)
    # sin with a signed sin, one elementwise fusion instead of split + concatenate.
    x_BLH2K = x_BLHK.astype(jnp.float32).reshape(B, L, H, 2, half)
    out_BLH2K = x_BLH2K * cos_L1K[None, :, None] + x_BLH2K[..., ::-1, :] * sin_L2K[None, :, None]
    return out_BLH2K.reshape(B, L, H, K).astype(x_BLHK.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE; softmax in float32. `impl` picks the
    training kernel (model_zoo/attention.py); cached decoding always uses the dense one."""

    def __init__(self, *, d_model: int, n_heads: int, n_kv_heads: int, rope_theta: float,
                 logit_scale: float, init_std: float, param_dtype: str, rngs: nnx.Rngs,
                 zero_query: bool = False, impl: str = 'xla', block_size: int = 512):
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.logit_scale = logit_scale   # set by the parametrization (1/sqrt(d) SP, ~1/d muP)
        self.impl, self.block_size = impl, block_size
        init = normal(init_std)
        K = self.head_dim
        self.wq = param(rngs, zeros if zero_query else init, (d_model, n_heads, K),
                        ('embed', 'heads', 'head_dim'), 'hidden', param_dtype)
        self.wk = param(rngs, init, (d_model, n_kv_heads, K), ('embed', 'kv_heads', 'head_dim'), 'hidden', param_dtype)
        self.wv = param(rngs, init, (d_model, n_kv_heads, K), ('embed', 'kv_heads', 'head_dim'), 'hidden', param_dtype)
        self.wo = param(rngs, init, (n_heads, K, d_model), ('heads', 'head_dim', 'embed'), 'hidden', param_dtype)

    def _qkv(self, x_BLD: jax.Array, positions_L: jax.Array):
        dt = x_BLD.dtype
        q_BLHK = jnp.einsum('bld,dhk->blhk', x_BLD, self.wq[...].astype(dt))
        k_BLGK = jnp.einsum('bld,dgk->blgk', x_BLD, self.wk[...].astype(dt))
        v_BLGK = jnp.einsum('bld,dgk->blgk', x_BLD, self.wv[...].astype(dt))
        q_BLHK = constrain(rope(q_BLHK, positions_L, self.rope_theta),
                           ('act_batch', 'act_length', 'act_heads', 'act_head_dim'))
        k_BLGK = constrain(rope(k_BLGK, positions_L, self.rope_theta),
                           ('act_batch', 'act_length', 'act_kv_heads', 'act_head_dim'))
        v_BLGK = constrain(v_BLGK, ('act_batch', 'act_length', 'act_kv_heads', 'act_head_dim'))
        return q_BLHK, k_BLGK, v_BLGK

    def logits(self, x_BLD: jax.Array, positions_L: jax.Array) -> jax.Array:
        """The pre-softmax attention logits [B, H, L, M] (before the causal mask), for
        coordinate checks."""
        q_BLHK, k_BLGK, _ = self._qkv(x_BLD, positions_L)
        return attention.logits(q_BLHK, k_BLGK, self.logit_scale)

    def __call__(self, x_BLD: jax.Array, positions_L: jax.Array) -> jax.Array:
        dt = x_BLD.dtype
        q_BLHK, k_BLGK, v_BLGK = self._qkv(x_BLD, positions_L)
        # Causal among the tokens of this call, whatever their absolute positions.
        out_BLHK = attention.attend(q_BLHK, k_BLGK, v_BLGK, attention.causal_order(x_BLD.shape[1]),
                                    impl=self.impl, scale=self.logit_scale,
                                    block_size=self.block_size)
        out_BLHK = constrain(out_BLHK, ('act_batch', 'act_length', 'act_heads', 'act_head_dim'))
        return jnp.einsum('blhk,hkd->bld', out_BLHK, self.wo[...].astype(dt))

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
        """Empty key/value cache for generation: k and v of shape [B, max_len, G, K]."""
        shape = (batch, max_len, self.n_kv_heads, self.head_dim)
        return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}

    def decode(self, x_BLD: jax.Array, positions_L: jax.Array,
               cache: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Attention of L new tokens at consecutive `positions_L` over the cache plus themselves."""
        dt = x_BLD.dtype
        q_BLHK = rope(jnp.einsum('bld,dhk->blhk', x_BLD, self.wq[...].astype(dt)), positions_L,
                      self.rope_theta)
        k_BLGK = rope(jnp.einsum('bld,dgk->blgk', x_BLD, self.wk[...].astype(dt)), positions_L,
                      self.rope_theta)
        v_BLGK = jnp.einsum('bld,dgk->blgk', x_BLD, self.wv[...].astype(dt))
        start = positions_L[0]
        k_BMGK = jax.lax.dynamic_update_slice_in_dim(cache['k'], k_BLGK.astype(cache['k'].dtype), start, 1)
        v_BMGK = jax.lax.dynamic_update_slice_in_dim(cache['v'], v_BLGK.astype(cache['v'].dtype), start, 1)
        visible_LM = jnp.arange(k_BMGK.shape[1])[None, :] <= positions_L[:, None]
        out_BLHK = attention.dense(q_BLHK, k_BMGK, v_BMGK, visible_LM, self.logit_scale)
        out_BLD = jnp.einsum('blhk,hkd->bld', out_BLHK, self.wo[...].astype(dt))
        return out_BLD, {'k': k_BMGK, 'v': v_BMGK}


class SwiGLU(nnx.Module):
    """Gated MLP: down(silu(x W_gate) * x W_up)."""

    def __init__(self, *, d_model: int, d_ff: int, init_std: float, param_dtype: str, rngs: nnx.Rngs):
        init = normal(init_std)
        self.w_gate = param(rngs, init, (d_model, d_ff), ('embed', 'mlp'), 'hidden', param_dtype)
        self.w_up = param(rngs, init, (d_model, d_ff), ('embed', 'mlp'), 'hidden', param_dtype)
        self.w_down = param(rngs, init, (d_ff, d_model), ('mlp', 'embed'), 'hidden', param_dtype)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        dt = x_BLD.dtype
        gate_BLF = jnp.einsum('bld,df->blf', x_BLD, self.w_gate[...].astype(dt))
        up_BLF = jnp.einsum('bld,df->blf', x_BLD, self.w_up[...].astype(dt))
        h_BLF = constrain(jax.nn.silu(gate_BLF) * up_BLF, ('act_batch', 'act_length', 'act_mlp'))
        return jnp.einsum('blf,fd->bld', h_BLF, self.w_down[...].astype(dt))


class Embedding(nnx.Module):
    """Token embedding table [vocab, embed]; can also act as a tied readout."""

    def __init__(self, *, vocab_size: int, d_model: int, init_std: float, param_dtype: str,
                 rngs: nnx.Rngs):
        self.table = param(rngs, normal(init_std), (vocab_size, d_model), ('vocab', 'embed'),
                           'embedding', param_dtype)

    def __call__(self, tokens_BL: jax.Array, dtype: jnp.dtype) -> jax.Array:
        # Gather the fsdp-sharded embed dimension first, as for every weight of a matmul: a
        # lookup from the sharded table gives rows sharded like the table, which the SPMD
        # partitioner cannot turn into batch-sharded activations without replicating them
        # ('[SPMD] Involuntary full rematerialization' under fsdp x tensor meshes).
        table = constrain(self.table[...], ('vocab', None))
        return jnp.take(table, tokens_BL, axis=0).astype(dtype)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        return jnp.einsum('bld,vd->blv', x_BLD, self.table[...].astype(x_BLD.dtype))
