"""A plain-JAX decoder LM and AdamW step: the speed yardstick for the trainer's train step.

Written from scratch for benchmarks/attention_speed.py, deliberately without any of the trainer's
machinery (no NNX modules, logical axes, shardings, parametrization, clipping, metrics or
non-finite guard): pre-norm RMSNorm, RoPE, causal multi-head attention as 4-D einsums with the
L x L scores materialised, SwiGLU, an untied readout and `optax.adamw`. With the same shapes it
has the same parameters and matmul FLOPs as the transformer family (`reference_params` checks
the count against the trainer's), so step-time ratios measure the trainer's overhead or gain.
"""

import math

import jax
import jax.numpy as jnp
import optax

_LAYER_SHAPES = lambda D, H, F: dict(  # noqa: E731
    wq=(D, H, D // H), wk=(D, H, D // H), wv=(D, H, D // H), wo=(H, D // H, D),
    w_gate=(D, F), w_up=(D, F), w_down=(F, D))


def init(key, *, vocab: int, d_model: int, n_layers: int, n_heads: int, d_ff: int, std=0.02):
    keys = iter(jax.random.split(key, 2 + 7 * n_layers))
    normal = lambda shape: std * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    layers = [{**{k: normal(s) for k, s in _LAYER_SHAPES(d_model, n_heads, d_ff).items()},
               'norm_attn': jnp.ones(d_model), 'norm_mlp': jnp.ones(d_model)}
              for _ in range(n_layers)]
    return {'embed': normal((vocab, d_model)), 'layers': layers,
            'norm_out': jnp.ones(d_model), 'head': normal((d_model, vocab))}


def rms_norm(x_BLD, gain_D, eps=1e-6):
    return x_BLD * jax.lax.rsqrt(jnp.mean(x_BLD * x_BLD, -1, keepdims=True) + eps) * gain_D


def rope(x_BLHK, theta=10_000.0):
    L, K = x_BLHK.shape[1], x_BLHK.shape[3]
    angle_LF = jnp.arange(L)[:, None] * theta ** (-jnp.arange(K // 2) / (K // 2))[None, :]
    cos_1L1F, sin_1L1F = jnp.cos(angle_LF)[None, :, None], jnp.sin(angle_LF)[None, :, None]
    a_BLHF, b_BLHF = jnp.split(x_BLHK, 2, axis=-1)
    return jnp.concatenate([a_BLHF * cos_1L1F - b_BLHF * sin_1L1F,
                            b_BLHF * cos_1L1F + a_BLHF * sin_1L1F], axis=-1)


def attention(x_BLD, p):
    q_BLHK = rope(jnp.einsum('bld,dhk->blhk', x_BLD, p['wq']))
    k_BLHK = rope(jnp.einsum('bld,dhk->blhk', x_BLD, p['wk']))
    v_BLHK = jnp.einsum('bld,dhk->blhk', x_BLD, p['wv'])
    L, K = q_BLHK.shape[1], q_BLHK.shape[3]
    s_BHLM = jnp.einsum('blhk,bmhk->bhlm', q_BLHK, k_BLHK) / math.sqrt(K)
    s_BHLM = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s_BHLM, -1e30)
    o_BLHK = jnp.einsum('bhlm,bmhk->blhk', jax.nn.softmax(s_BHLM, axis=-1), v_BLHK)
    return jnp.einsum('blhk,hkd->bld', o_BLHK, p['wo'])


def swiglu(x_BLD, p):
    h_BLF = jax.nn.silu(x_BLD @ p['w_gate']) * (x_BLD @ p['w_up'])
    return h_BLF @ p['w_down']


def loss_fn(params, inputs_BL, targets_BL):
    x_BLD = params['embed'][inputs_BL]
    for p in params['layers']:
        x_BLD = x_BLD + attention(rms_norm(x_BLD, p['norm_attn']), p)
        x_BLD = x_BLD + swiglu(rms_norm(x_BLD, p['norm_mlp']), p)
    logits_BLV = rms_norm(x_BLD, params['norm_out']) @ params['head']
    return optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL).mean()


def make_step(lr=1e-3, b1=0.9, b2=0.95, weight_decay=0.1):
    """(optimizer, jitted step (params, opt_state, inputs, targets) -> (params, opt_state, loss));
    params and optimizer state are donated, as the trainer donates its state."""
    optimizer = optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay)

    def step(params, opt_state, inputs_BL, targets_BL):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs_BL, targets_BL)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, jax.jit(step, donate_argnums=(0, 1))


def reference_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
