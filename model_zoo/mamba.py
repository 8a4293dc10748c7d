"""Mamba-1 (selective scan) and Mamba-2 (SSD) language models, optionally hybrid with attention.

Config: `model.family='mamba'`, the shared LM keys of `model` (d_model, n_layers, vocab_size,
norm_eps, tie_embeddings, init_std, dtypes, remat) and `model.ssm` (version, d_state, d_conv,
expand, dt_rank, scan, chunk_size, headdim, n_groups, attn_every, dt range). With attn_every=k,
every k-th block is the transformer's attention + MLP block (using model.n_heads, d_ff, ...).

muP roles (rules in pretrain/parametrization.py; D = d_model and E = expand D grow with width,
R = dt_rank = ceil(D / 16) grows with it, the state size N, conv width K, Mamba-2 head dim P
and groups G are fixed):

| parameter (Mamba-1 / Mamba-2)   | maps            | role            | muP init, LR, eps     |
|---------------------------------|-----------------|-----------------|-----------------------|
| w_x, w_z                        | D -> E          | hidden          | sigma/sqrt(m), eta/m, eps/m |
| w_dt_low (1)                    | E -> R          | hidden          | sigma/sqrt(m), eta/m, eps/m |
| w_dt (1)                        | R -> E          | hidden_fan_in   | U(+-R^-0.5) as built, eta/m, eps/m |
| w_dt (2)                        | D -> H = E/P    | hidden          | sigma/sqrt(m), eta/m, eps/m |
| w_B, w_C                        | E or D -> G N   | hidden_to_fixed | sigma/m, eta/m, eps   |
| w_out                           | E -> D          | hidden          | sigma/sqrt(depth) /sqrt(m), eta/m, eps/m |
| conv, dt_bias, A_log, D, norm   | per channel     | vector          | as built, eta, eps/m  |

Why: w_dt's U(+-R^-0.5) init already scales as 1/sqrt(fan_in), which is what muP's
sigma/sqrt(m) expresses relative to the base, so it is not shrunk a second time (its std is
R^-0.5/sqrt(3) at every width under SP and muP). w_B and w_C map the wide dimension to the
fixed state size N: output layers in Tensor Programs V's sense (written without a forward
multiplier: init variance 1/fan_in^2, Adam LR 1/fan_in), not hidden matrices. w_out's
sigma/sqrt(depth) is the usual residual-output init; under depth-muP `depth` is the base model's
depth, because the branch multiplier m_L^-alpha already scales the depth (depth counted once).
Under muP dt_rank must grow with width (model.ssm.dt_rank = 0): a fixed R would make w_dt_low
a hidden_to_fixed and w_dt an input-like matrix, which this table does not cover.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model_zoo import scans
from model_zoo import transformer as transformer_lib
from model_zoo.family import FAMILIES, Family
from model_zoo.layers import REMAT_POLICIES, RMSNorm, normal, ones, param, zeros
from pretrain.errors import ConfigError, check_choice
from pretrain.mesh import constrain
from pretrain.parametrization import Parametrization

ACT_BLD = transformer_lib.ACT_BLD
ACT_BLE = ('act_batch', 'act_length', 'act_inner')
ACT_BLHP = ('act_batch', 'act_length', 'act_ssm_heads', 'act_head_dim')
f32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# Initialisers (REFERENCE: S4D-real A, log-uniform dt through an inverse softplus, D = 1)

def uniform(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def s4d_real_log(key, shape, dtype):
    """A_log[e, n] = log(n + 1): A = -(1, 2, ..., N) for every channel."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=f32)), shape).astype(dtype)


def uniform_log_A(key, shape, dtype):
    """Mamba-2: A = -a with a ~ U(1, 16) per head."""
    return jnp.log(jax.random.uniform(key, shape, f32, 1.0, 16.0)).astype(dtype)


def dt_bias_init(dt_min: float, dt_max: float, dt_floor: float):
    """Bias whose softplus is dt ~ exp(U[log dt_min, log dt_max]), clamped at dt_floor."""
    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, f32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)   # inverse of softplus
    return init


# ---------------------------------------------------------------------------------------------
# Causal depthwise convolution over the length axis (any trailing channel shape)

def causal_conv(x_BL_: jax.Array, w_K_: jax.Array, b_: jax.Array) -> jax.Array:
    """out[t] = b + sum_k w[k] x[t - K + 1 + k]; K is small, so K shifted adds beat a conv op."""
    K, L = w_K_.shape[0], x_BL_.shape[1]
    x_pad = jnp.pad(x_BL_, [(0, 0), (K - 1, 0)] + [(0, 0)] * (x_BL_.ndim - 2))
    w = w_K_.astype(x_BL_.dtype)
    out = sum(x_pad[:, k:k + L] * w[k] for k in range(K))
    return out + b_.astype(x_BL_.dtype)


def conv_step(x_B_: jax.Array, window_BK_: jax.Array, w_K_: jax.Array, b_: jax.Array):
    """One token of causal_conv; the window holds the previous K - 1 inputs (oldest first)."""
    full = jnp.concatenate([window_BK_, x_B_[:, None].astype(window_BK_.dtype)], axis=1)
    out = jnp.einsum('bk...,k...->b...', full, w_K_.astype(full.dtype)) + b_.astype(full.dtype)
    return out.astype(x_B_.dtype), full[:, 1:]


# ---------------------------------------------------------------------------------------------
# Mixers

class Mamba1Mixer(nnx.Module):
    """in_proj -> causal conv -> SiLU -> selective scan (input-dependent dt, B, C) -> gate -> out_proj."""

    def __init__(self, m, rngs: nnx.Rngs, out_init_depth: float | None = None):
        s = m.ssm
        D, E, N, K, R = m.d_model, d_inner(m), s.d_state, s.d_conv, dt_rank(m)
        self.scan_name, self.chunk_size = s.scan, s.chunk_size
        w = normal(m.init_std)
        pd = m.param_dtype
        self.w_x = param(rngs, w, (D, E), ('embed', 'inner'), 'hidden', pd)
        self.w_z = param(rngs, w, (D, E), ('embed', 'inner'), 'hidden', pd)
        # Depthwise filters: fan-in K does not grow with width, so they are vector-like.
        self.conv_w = param(rngs, uniform(K ** -0.5), (K, E), ('conv', 'inner'), 'vector', pd)
        self.conv_b = param(rngs, zeros, (E,), ('inner',), 'vector', pd)
        self.w_dt_low = param(rngs, w, (E, R), ('inner', 'dt_rank'), 'hidden', pd)
        self.w_B = param(rngs, w, (E, N), ('inner', 'state'), 'hidden_to_fixed', pd)
        self.w_C = param(rngs, w, (E, N), ('inner', 'state'), 'hidden_to_fixed', pd)
        self.w_dt = param(rngs, uniform(R ** -0.5), (R, E), ('dt_rank', 'inner'), 'hidden_fan_in', pd)
        self.dt_bias = param(rngs, dt_bias_init(s.dt_min, s.dt_max, s.dt_floor), (E,), ('inner',),
                             'vector', pd)
        self.A_log = param(rngs, s4d_real_log, (E, N), ('inner', 'state'), 'vector', pd)
        self.D = param(rngs, ones, (E,), ('inner',), 'vector', pd)
        self.w_out = param(rngs, normal(m.init_std / math.sqrt(out_init_depth or m.n_layers)), (E, D),
                           ('inner', 'embed'), 'hidden', pd)

    def _project(self, x_BLD):
        dt = x_BLD.dtype
        return (jnp.einsum('bld,de->ble', x_BLD, self.w_x[...].astype(dt)),
                jnp.einsum('bld,de->ble', x_BLD, self.w_z[...].astype(dt)))

    def _ssm_inputs(self, xc_BLE):
        dt = xc_BLE.dtype
        dt_low_BLR = jnp.einsum('ble,er->blr', xc_BLE, self.w_dt_low[...].astype(dt))
        B_BLN = jnp.einsum('ble,en->bln', xc_BLE, self.w_B[...].astype(dt))
        C_BLN = jnp.einsum('ble,en->bln', xc_BLE, self.w_C[...].astype(dt))
        dt_BLE = jax.nn.softplus(jnp.einsum('blr,re->ble', dt_low_BLR, self.w_dt[...].astype(dt)).astype(f32)
                                 + self.dt_bias[...].astype(f32))
        return dt_BLE, -jnp.exp(self.A_log[...].astype(f32)), B_BLN, C_BLN

    def _output(self, y_BLE, z_BLE):
        gated_BLE = (y_BLE * jax.nn.silu(z_BLE.astype(f32))).astype(z_BLE.dtype)
        return jnp.einsum('ble,ed->bld', gated_BLE, self.w_out[...].astype(z_BLE.dtype))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        xi_BLE, z_BLE = self._project(x_BLD)
        xc_BLE = constrain(jax.nn.silu(causal_conv(constrain(xi_BLE, ACT_BLE), self.conv_w[...],
                                                   self.conv_b[...])), ACT_BLE)
        dt_BLE, A_EN, B_BLN, C_BLN = self._ssm_inputs(xc_BLE)
        scan = scans.SELECTIVE_SCANS[self.scan_name]
        kwargs = {'chunk_size': self.chunk_size} if self.scan_name == 'chunked' else {}
        y_BLE, _ = scan(xc_BLE, constrain(dt_BLE, ACT_BLE), A_EN, B_BLN, C_BLN, self.D[...], **kwargs)
        return self._output(constrain(y_BLE, ACT_BLE), z_BLE)

    def init_cache(self, batch: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
        K, (E, N) = self.conv_w.shape[0], self.A_log.shape
        return {'conv': jnp.zeros((batch, K - 1, E), f32), 'h': jnp.zeros((batch, E, N), f32)}

    def step(self, x_B1D: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """One token with the state carried in `cache` (conv window and SSM state)."""
        xi_B1E, z_B1E = self._project(x_B1D)
        xc_BE, window = conv_step(xi_B1E[:, 0], cache['conv'], self.conv_w[...], self.conv_b[...])
        xc_B1E = jax.nn.silu(xc_BE)[:, None]
        dt_B1E, A_EN, B_B1N, C_B1N = self._ssm_inputs(xc_B1E)
        y_BE, h = scans.selective_step(xc_B1E[:, 0], dt_B1E[:, 0], A_EN, B_B1N[:, 0], C_B1N[:, 0],
                                       self.D[...], cache['h'])
        return self._output(y_BE[:, None], z_B1E), {'conv': window, 'h': h}


class Mamba2Mixer(nnx.Module):
    """Heads of size P with scalar A and dt per head, grouped B/C, chunked SSD, gated RMSNorm."""

    def __init__(self, m, rngs: nnx.Rngs, out_init_depth: float | None = None):
        s = m.ssm
        D, N, K, P, G = m.d_model, s.d_state, s.d_conv, s.headdim, s.n_groups
        H = d_inner(m) // P
        self.chunk_size, self.eps = s.chunk_size, m.norm_eps
        w, vec = normal(m.init_std), uniform(K ** -0.5)
        pd = m.param_dtype
        heads, groups = ('ssm_heads', 'head_dim'), ('ssm_groups', 'state')
        self.w_x = param(rngs, w, (D, H, P), ('embed', *heads), 'hidden', pd)
        self.w_z = param(rngs, w, (D, H, P), ('embed', *heads), 'hidden', pd)
        self.w_B = param(rngs, w, (D, G, N), ('embed', *groups), 'hidden_to_fixed', pd)
        self.w_C = param(rngs, w, (D, G, N), ('embed', *groups), 'hidden_to_fixed', pd)
        self.w_dt = param(rngs, w, (D, H), ('embed', 'ssm_heads'), 'hidden', pd)
        # The conv runs over the concatenation (x, B, C); kept as three parameters so that x's
        # part shards with the heads and B/C's part stays replicated.
        self.conv_x_w = param(rngs, vec, (K, H, P), ('conv', *heads), 'vector', pd)
        self.conv_x_b = param(rngs, zeros, (H, P), heads, 'vector', pd)
        self.conv_B_w = param(rngs, vec, (K, G, N), ('conv', *groups), 'vector', pd)
        self.conv_B_b = param(rngs, zeros, (G, N), groups, 'vector', pd)
        self.conv_C_w = param(rngs, vec, (K, G, N), ('conv', *groups), 'vector', pd)
        self.conv_C_b = param(rngs, zeros, (G, N), groups, 'vector', pd)
        self.dt_bias = param(rngs, dt_bias_init(s.dt_min, s.dt_max, s.dt_floor), (H,), ('ssm_heads',),
                             'vector', pd)
        self.A_log = param(rngs, uniform_log_A, (H,), ('ssm_heads',), 'vector', pd)
        self.D = param(rngs, ones, (H,), ('ssm_heads',), 'vector', pd)
        self.norm_scale = param(rngs, ones, (H, P), heads, 'vector', pd)
        self.w_out = param(rngs, normal(m.init_std / math.sqrt(out_init_depth or m.n_layers)), (H, P, D),
                           (*heads, 'embed'), 'hidden', pd)

    def _project(self, x_BLD):
        dt = x_BLD.dtype
        proj = lambda w, eq: jnp.einsum(eq, x_BLD, w[...].astype(dt))  # noqa: E731
        return (proj(self.w_x, 'bld,dhp->blhp'), proj(self.w_z, 'bld,dhp->blhp'),
                proj(self.w_B, 'bld,dgn->blgn'), proj(self.w_C, 'bld,dgn->blgn'),
                proj(self.w_dt, 'bld,dh->blh'))

    def _output(self, y_BLHP, z_BLHP):
        """Gated RMSNorm over the whole inner dimension, then out_proj."""
        g = y_BLHP * jax.nn.silu(z_BLHP.astype(f32))
        g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=(-2, -1), keepdims=True) + self.eps)
        g = (g * self.norm_scale[...].astype(f32)).astype(z_BLHP.dtype)
        return jnp.einsum('blhp,hpd->bld', g, self.w_out[...].astype(z_BLHP.dtype))

    def _dt_A(self, dt_raw):
        return (jax.nn.softplus(dt_raw.astype(f32) + self.dt_bias[...].astype(f32)),
                -jnp.exp(self.A_log[...].astype(f32)))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x_BLHP, z_BLHP, B_BLGN, C_BLGN, dt_BLH = self._project(x_BLD)
        x_BLHP = constrain(jax.nn.silu(causal_conv(constrain(x_BLHP, ACT_BLHP), self.conv_x_w[...],
                                                   self.conv_x_b[...])), ACT_BLHP)
        B_BLGN = jax.nn.silu(causal_conv(B_BLGN, self.conv_B_w[...], self.conv_B_b[...]))
        C_BLGN = jax.nn.silu(causal_conv(C_BLGN, self.conv_C_w[...], self.conv_C_b[...]))
        dt_BLH, A_H = self._dt_A(dt_BLH)
        y_BLHP, _ = scans.ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, self.D[...],
                                      chunk_size=self.chunk_size)
        return self._output(constrain(y_BLHP, ACT_BLHP), z_BLHP)

    def init_cache(self, batch: int, dtype: jnp.dtype) -> dict[str, jax.Array]:
        K, H, P = self.conv_x_w.shape
        G, N = self.w_B.shape[1:]
        return {'conv_x': jnp.zeros((batch, K - 1, H, P), f32),
                'conv_B': jnp.zeros((batch, K - 1, G, N), f32),
                'conv_C': jnp.zeros((batch, K - 1, G, N), f32),
                'h': jnp.zeros((batch, H, P, N), f32)}

    def step(self, x_B1D: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """One token with the state carried in `cache` (three conv windows and the SSM state)."""
        x, z, Bm, Cm, dt = (t[:, 0] for t in self._project(x_B1D))
        x, w_x = conv_step(x, cache['conv_x'], self.conv_x_w[...], self.conv_x_b[...])
        Bm, w_B = conv_step(Bm, cache['conv_B'], self.conv_B_w[...], self.conv_B_b[...])
        Cm, w_C = conv_step(Cm, cache['conv_C'], self.conv_C_w[...], self.conv_C_b[...])
        dt_BH, A_H = self._dt_A(dt)
        y_BHP, h = scans.ssd_step(jax.nn.silu(x), dt_BH, A_H, jax.nn.silu(Bm), jax.nn.silu(Cm),
                                  self.D[...], cache['h'])
        out = self._output(y_BHP[:, None], z[:, None])
        return out, {'conv_x': w_x, 'conv_B': w_B, 'conv_C': w_C, 'h': h}


# ---------------------------------------------------------------------------------------------
# Blocks and the language model

class MambaBlock(nnx.Module):
    """Pre-norm residual block: x + r * mixer(norm(x))."""

    def __init__(self, m, parametrization: Parametrization, rngs: nnx.Rngs):
        self.residual_mult = parametrization.residual_mult()
        self.norm = RMSNorm(m.d_model, eps=m.norm_eps, param_dtype=m.param_dtype, rngs=rngs)
        self.mixer = (Mamba1Mixer if m.ssm.version == 1 else Mamba2Mixer)(
            m, rngs, out_init_depth=parametrization.residual_init_depth(m.n_layers))

    def __call__(self, x_BLD: jax.Array, positions_L: jax.Array) -> jax.Array:
        del positions_L   # order is carried by the recurrence
        return constrain(x_BLD + self.residual_mult * self.mixer(self.norm(x_BLD)), ACT_BLD)

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> dict:
        del max_len   # the state does not grow with the sequence
        return self.mixer.init_cache(batch, dtype)

    def decode(self, x_B1D: jax.Array, positions_L: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        del positions_L
        out_B1D, cache = self.mixer.step(self.norm(x_B1D), cache)
        return x_B1D + self.residual_mult * out_B1D, cache


def is_attention_layer(i: int, attn_every: int) -> bool:
    """Hybrid layout: blocks k-1, 2k-1, ... are attention blocks (none when attn_every = 0)."""
    return attn_every > 0 and (i + 1) % attn_every == 0


class MambaLM(transformer_lib.DecoderLM):
    """Mamba blocks (every `attn_every`-th one a transformer block); recurrent step mode."""

    def __init__(self, m, rngs: nnx.Rngs, parametrization: Parametrization):
        super().__init__(m, rngs, parametrization, lambda i: (
            transformer_lib.Block(m, parametrization, rngs)
            if is_attention_layer(i, m.ssm.attn_every)
            else MambaBlock(m, parametrization, rngs)))

    def prefill(self, tokens_BL: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """Feeds a prompt token by token (the SSM state is a recurrence); last logits [B, V]."""
        def body(c, tok_B):
            logits_BV, c = self.step(tok_B, c)
            return c, logits_BV
        cache, logits_LBV = jax.lax.scan(body, cache, tokens_BL.T)
        return logits_LBV[-1], cache


# ---------------------------------------------------------------------------------------------
# Shapes, FLOPs, validation, registration

def d_inner(m) -> int:
    return m.ssm.expand * m.d_model


def dt_rank(m) -> int:
    return m.ssm.dt_rank or math.ceil(m.d_model / 16)


def _mixer_costs(m, seq_len: int) -> tuple[int, float]:
    """(matmul parameters, other forward FLOPs per token) of one SSM mixer."""
    s, D, E, N, K = m.ssm, m.d_model, d_inner(m), m.ssm.d_state, m.ssm.d_conv
    if s.version == 1:
        R = dt_rank(m)
        matmul = 2 * D * E + E * (R + 2 * N) + R * E + E * D
        # conv (2KE) + per (e, n): exp(dt A), dt B x, a h + b, C h  (about 7 E N)
        return matmul, 2 * K * E + 7 * E * N
    P, G = s.headdim, s.n_groups
    H = E // P
    Q = min(s.chunk_size, seq_len)
    matmul = D * (2 * E + 2 * G * N + H) + E * D
    # intra-chunk C B^T and its product with x (2QHN + 2QE per token), chunk states and
    # state-to-output (2EN each), conv over x, B and C
    ssd = 2 * Q * H * N + 2 * Q * E + 4 * E * N + 2 * K * (E + 2 * G * N)
    return matmul, ssd


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 3 x forward (2 per matmul parameter, plus scan/SSD and attention)."""
    m, L = cfg.model, cfg.data.seq_len
    matmul, other = _mixer_costs(m, L)
    forward = 0.0
    for i in range(m.n_layers):
        if is_attention_layer(i, m.ssm.attn_every):
            head_dim = m.d_model // m.n_heads
            attn = m.d_model * head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.d_ff
            forward += 2 * attn + 4 * L * m.d_model
        else:
            forward += 2 * matmul + other
    return 3.0 * (forward + 2 * m.d_model * m.vocab_size)


def lm_loss(model: MambaLM, batch):
    return transformer_lib.lm_loss(model, batch)


SCANS = tuple(scans.SELECTIVE_SCANS)


def validate(cfg, axes: dict[str, int]) -> None:
    """Shape and choice checks; every message names the key, its value and what is allowed."""
    m, s = cfg.model, cfg.model.ssm
    check_choice('model.ssm.version', s.version, (1, 2))
    check_choice('model.ssm.scan', s.scan, SCANS)
    check_choice('model.compute_dtype', m.compute_dtype, ('float32', 'bfloat16'))
    check_choice('model.param_dtype', m.param_dtype, ('float32', 'bfloat16'))
    check_choice('model.remat', m.remat, tuple(REMAT_POLICIES))
    for key, value in [('model.vocab_size', m.vocab_size), ('model.d_model', m.d_model),
                       ('model.n_layers', m.n_layers)] + [
            (f'model.ssm.{k}', s[k]) for k in ('d_state', 'd_conv', 'expand', 'chunk_size',
                                               'headdim', 'n_groups')]:
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f'{key}={value!r} must be a positive integer')
    for key in ('dt_rank', 'attn_every'):
        if not isinstance(s[key], int) or s[key] < 0:
            raise ConfigError(f'model.ssm.{key}={s[key]!r} must be an integer >= 0 (0 = '
                              f'{"ceil(d_model/16)" if key == "dt_rank" else "no attention layers"})')
    if not 0 < s.dt_floor <= s.dt_min <= s.dt_max:
        raise ConfigError(f'model.ssm dt range dt_floor={s.dt_floor}, dt_min={s.dt_min}, '
                          f'dt_max={s.dt_max} must satisfy 0 < dt_floor <= dt_min <= dt_max')
    E, tensor = d_inner(m), axes['tensor']
    if E % tensor:
        raise ConfigError(f'd_inner = model.ssm.expand * model.d_model = {s.expand}*{m.d_model} = {E} '
                          f'must be divisible by the tensor axis size {tensor}')
    if s.version == 2:
        if E % s.headdim:
            raise ConfigError(f'model.ssm.headdim={s.headdim} must divide d_inner = expand*d_model = {E}')
        H = E // s.headdim
        if H % tensor:
            raise ConfigError(f'SSM heads d_inner/headdim = {E}/{s.headdim} = {H} must be divisible by '
                              f'the tensor axis size {tensor}; change model.ssm.headdim or the mesh')
        if H % s.n_groups:
            raise ConfigError(f'model.ssm.n_groups={s.n_groups} must divide the SSM heads '
                              f'd_inner/headdim = {H}')
    if m.vocab_size % tensor:
        raise ConfigError(f'model.vocab_size={m.vocab_size} must be divisible by the tensor axis '
                          f'size {tensor}')
    if m.d_model % axes['fsdp']:
        raise ConfigError(f'model.d_model={m.d_model} must be divisible by the fsdp axis size {axes["fsdp"]}')
    p = cfg.parametrization
    if p.name != 'sp' and s.version == 1 and s.dt_rank and p.base_width not in (0, m.d_model):
        raise ConfigError(f'model.ssm.dt_rank={s.dt_rank} is fixed, but parametrization.name='
                          f'{p.name!r} widens from base_width={p.base_width}: the muP roles need '
                          'a dt rank that grows with width (set model.ssm.dt_rank=0)')
    if s.attn_every:
        transformer_lib.validate(cfg, axes)   # the attention blocks' own shape rules


def default_config() -> dict[str, dict]:
    """model.ssm: the state-space keys (ignored by other families)."""
    return {'ssm': dict(
        version=1,                 # 1 = Mamba-1 selective scan, 2 = Mamba-2 (SSD)
        d_state=16,                # N (16 for Mamba-1, 128 for Mamba-2 at full size)
        d_conv=4,                  # causal depthwise conv width
        expand=2,                  # d_inner = expand * d_model
        dt_rank=0,                 # Mamba-1 low-rank dt projection; 0 = ceil(d_model / 16)
        dt_min=1e-3,               # initial dt ~ exp(U[log dt_min, log dt_max]), >= dt_floor
        dt_max=1e-1,
        dt_floor=1e-4,
        scan='chunked',            # Mamba-1 scan: 'sequential' | 'associative' | 'chunked'
        chunk_size=64,             # chunked scan and SSD chunk length
        headdim=64,                # Mamba-2 head dim P (heads = d_inner / P)
        n_groups=1,                # Mamba-2 groups sharing B and C
        attn_every=0,              # hybrid: every k-th block is attention + MLP; 0 = none
    )}


FAMILIES.register('mamba')(Family(
    build=lambda cfg, rngs, parametrization: MambaLM(cfg.model, rngs, parametrization),
    loss=lm_loss,
    flops_per_example=lambda cfg: flops_per_token(cfg) * cfg.data.seq_len,
    tokens_per_example=lambda cfg: cfg.data.seq_len,
    validate=validate,
    default_config=default_config,
))
