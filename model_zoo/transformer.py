"""Decoder-only language model: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model_zoo.family import FAMILIES, Batch, Family
from model_zoo.layers import REMAT_POLICIES, Attention, Embedding, RMSNorm, SwiGLU, normal, param
from pretrain.errors import ConfigError, check_choice
from pretrain.mesh import constrain
from pretrain.parametrization import Parametrization

ACT_BLD = ('act_batch', 'act_length', 'act_embed')


def attention_impl(m) -> str:
    """model.attention_impl; runs saved before the key existed used the dense kernel."""
    return m.get('attention_impl', 'xla')


class Block(nnx.Module):
    """Pre-norm residual block: x + r * attn(norm(x)), then x + r * mlp(norm(x))."""

    def __init__(self, m, parametrization: Parametrization, rngs: nnx.Rngs):
        common = dict(init_std=m.init_std, param_dtype=m.param_dtype, rngs=rngs)
        self.residual_mult = parametrization.residual_mult()
        self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=m.param_dtype, rngs=rngs)
        self.attn = Attention(d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                              rope_theta=m.rope_theta, zero_query=parametrization.zero_query,
                              logit_scale=parametrization.attn_logit_scale(m.d_model // m.n_heads),
                              impl=attention_impl(m), block_size=m.get('attention_block_size', 512),
                              **common)
        self.mlp_norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=m.param_dtype, rngs=rngs)
        self.mlp = SwiGLU(d_model=m.d_model, d_ff=m.d_ff, **common)

    def __call__(self, x_BLD: jax.Array, positions_L: jax.Array) -> jax.Array:
        r = self.residual_mult
        x_BLD = constrain(x_BLD + r * self.attn(self.attn_norm(x_BLD), positions_L), ACT_BLD)
        return constrain(x_BLD + r * self.mlp(self.mlp_norm(x_BLD)), ACT_BLD)

    def attention_logits(self, x_BLD: jax.Array, positions_L: jax.Array) -> jax.Array:
        """This block's pre-softmax attention logits for the block input x (coordinate checks)."""
        return self.attn.logits(self.attn_norm(x_BLD), positions_L)

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
        return self.attn.init_cache(batch, max_len, dtype)

    def decode(self, x_BLD: jax.Array, positions_L: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """The block on L new tokens, attending to the cached keys and values (generation)."""
        r = self.residual_mult
        attn_BLD, cache = self.attn.decode(self.attn_norm(x_BLD), positions_L, cache)
        x_BLD = x_BLD + r * attn_BLD
        return x_BLD + r * self.mlp(self.mlp_norm(x_BLD)), cache


class DecoderLM(nnx.Module):
    """Token ids [B, L] -> next-token logits [B, L, V] (float32): embedding, the residual
    blocks `make_block(i)` builds, final norm, readout; plus cached generation.

    A block is called as block(x_BLD, positions_L) in training and as
    block.decode(x_BLD, positions_L, cache) -> (x_BLD, cache) in generation.
    """

    def __init__(self, m, rngs: nnx.Rngs, parametrization: Parametrization,
                 make_block: Callable[[int], nnx.Module]):
        self.compute_dtype = jnp.dtype(m.compute_dtype)
        self.remat_policy = m.remat
        self.embedding_mult = parametrization.embedding_mult()
        self.readout_mult = parametrization.readout_mult()
        self.embed = Embedding(vocab_size=m.vocab_size, d_model=m.d_model, init_std=m.init_std,
                               param_dtype=m.param_dtype, rngs=rngs)
        self.blocks = nnx.List([make_block(i) for i in range(m.n_layers)])
        self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=m.param_dtype, rngs=rngs)
        self.head = None if m.tie_embeddings else param(
            rngs, normal(m.init_std), (m.d_model, m.vocab_size), ('embed', 'vocab'), 'readout',
            m.param_dtype)

    def __call__(self, tokens_BL: jax.Array, capture: dict | None = None) -> jax.Array:
        """`capture`, if given, receives each layer's output and, for blocks with attention,
        its pre-softmax logits as 'attn_logits_<i>' (for coordinate checks)."""
        positions_L = jnp.arange(tokens_BL.shape[1])
        x_BLD = constrain(self.embed(tokens_BL, self.compute_dtype) * self.embedding_mult, ACT_BLD)
        if capture is not None:
            capture['embedding'] = x_BLD
        for i, block in enumerate(self.blocks):
            if capture is not None and hasattr(block, 'attention_logits'):
                capture[f'attn_logits_{i}'] = block.attention_logits(x_BLD, positions_L)
            block_fn = type(block).__call__
            if self.remat_policy != 'none':
                block_fn = nnx.remat(block_fn, policy=REMAT_POLICIES[self.remat_policy])
            x_BLD = block_fn(block, x_BLD, positions_L)
            if capture is not None:
                capture[f'block_{i}'] = x_BLD
        logits_BLV = self._readout(x_BLD)
        if capture is not None:
            capture['logits'] = logits_BLV
        return constrain(logits_BLV, ('act_batch', 'act_length', 'act_vocab'))

    def _readout(self, x_BLD: jax.Array) -> jax.Array:
        x_BLD = self.final_norm(x_BLD)
        if self.head is None:
            logits_BLV = self.embed.attend(x_BLD)
        else:
            logits_BLV = jnp.einsum('bld,dv->blv', x_BLD, self.head[...].astype(x_BLD.dtype))
        return logits_BLV.astype(jnp.float32) * self.readout_mult

    # Generation (model_zoo/sample.py): the cache is a plain pytree.
    def init_cache(self, batch: int, max_len: int) -> dict:
        """Each block's cache (key/value buffers, SSM states) and the next position to write."""
        return {'pos': jnp.zeros((), jnp.int32),
                'layers': [b.init_cache(batch, max_len, self.compute_dtype) for b in self.blocks]}

    def _decode(self, tokens_BL: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        positions_L = cache['pos'] + jnp.arange(tokens_BL.shape[1])
        x_BLD = self.embed(tokens_BL, self.compute_dtype) * self.embedding_mult
        layers = []
        for block, layer_cache in zip(self.blocks, cache['layers']):
            x_BLD, layer_cache = block.decode(x_BLD, positions_L, layer_cache)
            layers.append(layer_cache)
        return self._readout(x_BLD), {'pos': cache['pos'] + tokens_BL.shape[1], 'layers': layers}

    def prefill(self, tokens_BL: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Processes a prompt in one pass; returns the last position's logits [B, V]."""
        logits_BLV, cache = self._decode(tokens_BL, cache)
        return logits_BLV[:, -1], cache

    def step(self, tokens_B: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """One new token per sequence -> its next-token logits [B, V]."""
        logits_BLV, cache = self._decode(tokens_B[:, None], cache)
        return logits_BLV[:, 0], cache


class Transformer(DecoderLM):
    """The decoder-only transformer LM: attention + SwiGLU blocks."""

    def __init__(self, m, rngs: nnx.Rngs, parametrization: Parametrization):
        super().__init__(m, rngs, parametrization, lambda i: Block(m, parametrization, rngs))


def lm_loss(model: Transformer, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy (nats) over the batch."""
    logits_BLV = model(batch['inputs'])
    nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch['targets'])
    loss = jnp.mean(nll_BL)
    return loss, {'loss': loss}


def matmul_params(m) -> int:
    """Parameters that take part in a matmul per token (excludes the embedding lookup)."""
    head_dim = m.d_model // m.n_heads
    attn = m.d_model * head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
    mlp = 3 * m.d_model * m.d_ff
    return m.n_layers * (attn + mlp) + m.d_model * m.vocab_size


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6 N for the matmuls plus 12 * layers * L * d for attention."""
    m = cfg.model
    attention = 12 * m.n_layers * cfg.data.seq_len * m.d_model
    return 6.0 * matmul_params(m) + attention


def validate(cfg, axes: dict[str, int]) -> None:
    """Shape checks against the mesh; every message names the key and the constraint."""
    m = cfg.model
    check_choice('model.compute_dtype', m.compute_dtype, ('float32', 'bfloat16'))
    check_choice('model.param_dtype', m.param_dtype, ('float32', 'bfloat16'))
    check_choice('model.remat', m.remat, tuple(REMAT_POLICIES))
    for key in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff'):
        if int(m[key]) < 1:
            raise ConfigError(f'model.{key}={m[key]} must be a positive integer')
    if m.d_model % m.n_heads:
        raise ConfigError(f'model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}')
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f'head dim d_model/n_heads={m.d_model // m.n_heads} must be even for RoPE')
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f'model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads}')
    tensor = axes['tensor']
    for key in ('n_heads', 'n_kv_heads', 'd_ff', 'vocab_size'):
        if m[key] % tensor:
            raise ConfigError(f'model.{key}={m[key]} must be divisible by the tensor axis size {tensor}')
    if m.d_model % axes['fsdp']:
        raise ConfigError(f'model.d_model={m.d_model} must be divisible by the fsdp axis size {axes["fsdp"]}')


FAMILIES.register('transformer')(Family(
    build=lambda cfg, rngs, parametrization: Transformer(cfg.model, rngs, parametrization),
    loss=lm_loss,
    flops_per_example=lambda cfg: flops_per_token(cfg) * cfg.data.seq_len,
    tokens_per_example=lambda cfg: cfg.data.seq_len,
    validate=validate,
))
