"""VAR stage 2: a class-conditional next-scale transformer over the tokenizer's multi-scale codes.

Sequence: scale 1's tokens (class embedding + start positions), then for every later scale k
the word-embedded area(f_hat after scale k-1, pn_k) (teacher forcing), each plus level and
position embeddings. Attention is block-causal: token i sees j iff level(j) <= level(i). Blocks
are AdaLN-modulated by the class embedding. Loss: cross-entropy over all scales' codes; class
labels are dropped to the unconditional index with probability cond_dropout (for CFG).

The frozen tokenizer lives in the data pipeline (`pipeline_options`): it turns each batch of images into
{'codes': i32[B, L], 'inputs': f32[B, L - pn_1^2, Cvae], 'labels', 'u'}, so the trained model
holds only its own parameters.

model.var.arch='published' is the block of Tian et al. 2024 (it holds the released weights,
see pretrain/var_official.py): q and v biases (no k bias) and an output-projection bias;
q and k L2-normalised per head, q multiplied by a learned per-head scale exp(min(s, ln 100))
in place of 1/sqrt(d_head); AdaLN gates g rather than 1 + g; a bias on the logits head.
'simple' (the default) keeps the gates at 1 + g and plain scaled dot-product attention.
"""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from model_zoo import attention, var_tokenizer
from model_zoo.family import FAMILIES, Batch, Family
from model_zoo.layers import normal, param, zeros
from model_zoo.transformer import attention_impl
from pretrain import checkpoint as checkpoint_lib
from pretrain import parametrization as parametrization_lib
from pretrain import state as state_lib
from pretrain.errors import ConfigError, check_choice
from pretrain.mesh import AXES, constrain
from pretrain.parametrization import Parametrization

ACT_BLD = ('act_batch', 'act_length', 'act_embed')
# Keys of model.var that must equal the stage-1 tokenizer's.
TOKENIZER_KEYS = ('patch_nums', 'codebook_size', 'latent_channels', 'base_channels',
                  'channel_mult', 'n_phi', 'phi_ratio', 'phi_rule', 'tokenizer_arch')
# What a stage-1 record written before a key existed meant by it.
TOKENIZER_KEY_DEFAULTS = {'phi_rule': 'simple', 'tokenizer_arch': 'simple'}
ARCHS = ('simple', 'published')
# The published attention's cap on the log of its per-head logit scale (a scale of at most 100).
MAX_LOG_LOGIT_SCALE = math.log(100.0)
INITIAL_LOGIT_SCALE = 4.0


def scale_bounds(patch_nums) -> list[tuple[int, int]]:
    """[begin, end) of every scale's tokens in the flattened sequence."""
    out, begin = [], 0
    for pn in patch_nums:
        out.append((begin, begin + pn * pn))
        begin += pn * pn
    return out


def levels(patch_nums) -> np.ndarray:
    """The scale index of every token, [L]."""
    return np.concatenate([np.full(pn * pn, k, np.int32) for k, pn in enumerate(patch_nums)])


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without gain or bias (AdaLN supplies both), in float32."""
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean((x32 - mu) ** 2, -1, keepdims=True)
    return ((x32 - mu) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class AdaLN(nnx.Module):
    """silu(cond) -> n modulation vectors [B, n, D] (shifts, scales, gates)."""

    def __init__(self, d: int, n: int, init_std: float, param_dtype: str, rngs: nnx.Rngs):
        self.w = param(rngs, normal(init_std), (d, n, d), ('embed', None, None), 'hidden', param_dtype)
        self.b = param(rngs, zeros, (n, d), (None, 'norm'), 'vector', param_dtype)

    def __call__(self, cond_BD: jax.Array) -> jax.Array:
        return jnp.einsum('bd,dne->bne', jax.nn.silu(cond_BD), self.w[...].astype(cond_BD.dtype)) \
            + self.b[...].astype(cond_BD.dtype)


class SelfAttention(nnx.Module):
    """Multi-head attention under a block-causal order (model_zoo/attention.py) or over a
    key/value cache; `impl` picks the teacher-forcing kernel, the cached path is dense."""

    def __init__(self, d: int, heads: int, logit_scale: float, init_std: float, param_dtype: str,
                 rngs: nnx.Rngs, zero_query: bool = False, impl: str = 'xla',
                 block_size: int = 512, published: bool = False):
        K = d // heads
        self.logit_scale = logit_scale
        self.impl, self.block_size = impl, block_size
        self.published = published
        if published:
            self.q_bias = param(rngs, zeros, (heads, K), ('heads', 'head_dim'), 'vector', param_dtype)
            self.v_bias = param(rngs, zeros, (heads, K), ('heads', 'head_dim'), 'vector', param_dtype)
            self.out_bias = param(rngs, zeros, (d,), ('norm',), 'vector', param_dtype)
            self.log_logit_scale = param(
                rngs, lambda key, shape, dtype: jnp.full(shape, math.log(INITIAL_LOGIT_SCALE), dtype),
                (heads,), ('heads',), 'vector', param_dtype)
        init = normal(init_std)
        self.wq = param(rngs, zeros if zero_query else init, (d, heads, K),
                        ('embed', 'heads', 'head_dim'), 'hidden', param_dtype)
        self.wk = param(rngs, init, (d, heads, K), ('embed', 'heads', 'head_dim'), 'hidden', param_dtype)
        self.wv = param(rngs, init, (d, heads, K), ('embed', 'heads', 'head_dim'), 'hidden', param_dtype)
        self.wo = param(rngs, init, (heads, K, d), ('heads', 'head_dim', 'embed'), 'hidden', param_dtype)

    def __call__(self, x_BLD: jax.Array, order_L: np.ndarray | None,
                 cache: tuple[jax.Array, jax.Array] | None = None):
        """Returns (output, (keys, values)). With `order_L` (the scale index of each token) key j
        is visible to query i iff order[j] <= order[i]; with a cache (order None) the new keys
        follow the cached ones and every key is visible."""
        dt = x_BLD.dtype
        act = ('act_batch', 'act_length', 'act_heads', 'act_head_dim')
        q_BLHK = constrain(jnp.einsum('bld,dhk->blhk', x_BLD, self.wq[...].astype(dt)), act)
        k_BMHK = constrain(jnp.einsum('bld,dhk->blhk', x_BLD, self.wk[...].astype(dt)), act)
        v_BMHK = constrain(jnp.einsum('bld,dhk->blhk', x_BLD, self.wv[...].astype(dt)), act)
        scale = self.logit_scale
        if self.published:
            q_BLHK, k_BMHK, v_BMHK = self.normalise(q_BLHK, k_BMHK, v_BMHK)
            scale = 1.0   # the learned scale is already in q
        if cache is not None:
            k_BMHK = jnp.concatenate([cache[0], k_BMHK], axis=1)
            v_BMHK = jnp.concatenate([cache[1], v_BMHK], axis=1)
        if order_L is None:
            out_BLHK = attention.dense(q_BLHK, k_BMHK, v_BMHK, None, scale)
        else:
            out_BLHK = attention.attend(q_BLHK, k_BMHK, v_BMHK, order_L, impl=self.impl,
                                        scale=scale, block_size=self.block_size)
        out_BLHK = constrain(out_BLHK, act)
        out_BLD = jnp.einsum('blhk,hkd->bld', out_BLHK, self.wo[...].astype(dt))
        if self.published:
            out_BLD = out_BLD + self.out_bias[...].astype(dt)
        return out_BLD, (k_BMHK, v_BMHK)

    def normalise(self, q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array):
        """The published attention's q, k, v: biases on q and v, q and k of unit length per head
        (in float32), q times its head's learned scale. Doing this before the kernel leaves every
        kernel (and the cache, which holds the normalised keys) unchanged, at scale 1."""
        dt = q_BLHK.dtype
        q_BLHK = q_BLHK + self.q_bias[...].astype(dt)
        v_BLHK = v_BLHK + self.v_bias[...].astype(dt)
        scale_H = jnp.exp(jnp.minimum(self.log_logit_scale[...].astype(jnp.float32),
                                      MAX_LOG_LOGIT_SCALE))
        return ((l2_normalise(q_BLHK) * scale_H[:, None]).astype(dt),
                l2_normalise(k_BLHK).astype(dt), v_BLHK)


def l2_normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis, in float32 (eps as in torch's F.normalize)."""
    x32 = x.astype(jnp.float32)
    return x32 / jnp.maximum(jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True)), eps)


class MLP(nnx.Module):
    """fc2(gelu(fc1 x)) with biases."""

    def __init__(self, d: int, d_ff: int, init_std: float, param_dtype: str, rngs: nnx.Rngs):
        init = normal(init_std)
        self.w1 = param(rngs, init, (d, d_ff), ('embed', 'mlp'), 'hidden', param_dtype)
        self.b1 = param(rngs, zeros, (d_ff,), ('mlp',), 'vector', param_dtype)
        self.w2 = param(rngs, init, (d_ff, d), ('mlp', 'embed'), 'hidden', param_dtype)
        self.b2 = param(rngs, zeros, (d,), ('norm',), 'vector', param_dtype)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        dt = x_BLD.dtype
        h = jnp.einsum('bld,df->blf', x_BLD, self.w1[...].astype(dt)) + self.b1[...].astype(dt)
        h = constrain(jax.nn.gelu(h), ('act_batch', 'act_length', 'act_mlp'))
        return jnp.einsum('blf,fd->bld', h, self.w2[...].astype(dt)) + self.b2[...].astype(dt)


class Block(nnx.Module):
    """AdaLN block: x + r (1 + g1) attn(ln(x)(1 + s1) + b1), then the same around the MLP."""

    def __init__(self, m, parametrization: Parametrization, rngs: nnx.Rngs):
        d, pd = m.d_model, m.param_dtype
        self.residual_mult = parametrization.residual_mult()
        self.published = m.var.get('arch', 'simple') == 'published'
        self.ada = AdaLN(d, 6, m.init_std, pd, rngs)
        # The published attention learns its logit scale on unit-length q and k, so the
        # parametrization's 1/sqrt(d_head) (or muP's 1/d_head) does not apply to it.
        self.attn = SelfAttention(d, m.n_heads, parametrization.attn_logit_scale(d // m.n_heads),
                                  m.init_std, pd, rngs, zero_query=parametrization.zero_query,
                                  impl=attention_impl(m),
                                  block_size=m.get('attention_block_size', 512),
                                  published=self.published)
        self.mlp = MLP(d, int(round(m.var.mlp_ratio * d)), m.init_std, pd, rngs)

    def __call__(self, x_BLD, cond_BD, order_L, cache=None):
        # 'simple' gates are 1 + g, not VAR's near-zero g: a tiny model must learn in a few
        # hundred steps; 'published' keeps VAR's g so that its weights compute the same function.
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(cond_BD)[:, :, None], 6, 1)
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            t[:, 0] for t in (shift1, scale1, gate1, shift2, scale2, gate2))
        gate1, gate2 = (gate1, gate2) if self.published else (1 + gate1, 1 + gate2)
        r = self.residual_mult
        h, kv = self.attn(layer_norm(x_BLD) * (1 + scale1) + shift1, order_L, cache)
        x_BLD = constrain(x_BLD + r * gate1 * h, ACT_BLD)
        h = self.mlp(layer_norm(x_BLD) * (1 + scale2) + shift2)
        return constrain(x_BLD + r * gate2 * h, ACT_BLD), kv


class VAR(nnx.Module):
    """(teacher-forcing inputs [B, L - pn_1^2, Cvae], labels [B]) -> logits [B, L, V] (float32)."""

    def __init__(self, cfg, rngs: nnx.Rngs, parametrization: Parametrization):
        m, v = cfg.model, cfg.model.var
        d, pd, std = m.d_model, m.param_dtype, m.init_std
        self.patch_nums = tuple(int(p) for p in v.patch_nums)
        self.num_classes, self.cond_dropout = v.num_classes, v.cond_dropout
        self.compute_dtype = jnp.dtype(m.compute_dtype)
        self.embedding_mult = parametrization.embedding_mult()
        self.readout_mult = parametrization.readout_mult()
        L, first = sum(p * p for p in self.patch_nums), self.patch_nums[0] ** 2
        emb = lambda shape: param(rngs, normal(std), shape, (None, 'embed'), 'embedding', pd)  # noqa: E731
        self.class_emb = emb((v.num_classes + 1, d))   # the last row is the unconditional class
        self.pos_start = emb((first, d))
        self.pos_emb = emb((L, d))
        self.level_emb = emb((len(self.patch_nums), d))
        self.word_w = emb((v.latent_channels, d))
        self.word_b = param(rngs, zeros, (d,), ('norm',), 'vector', pd)
        self.blocks = nnx.List([Block(m, parametrization, rngs) for _ in range(m.n_layers)])
        self.head_ada = AdaLN(d, 2, std, pd, rngs)
        self.head = param(rngs, normal(std), (d, v.codebook_size), ('embed', 'vocab'), 'readout', pd)
        self.published = v.get('arch', 'simple') == 'published'
        if self.published:
            self.head_bias = param(rngs, zeros, (v.codebook_size,), ('vocab',), 'vector', pd)

    def embed(self, begin: int, end: int, inputs_BlC: jax.Array | None, cond_BD: jax.Array):
        """Token embeddings of positions [begin, end): start tokens at 0, word embedding after."""
        first = self.patch_nums[0] ** 2
        dt = self.compute_dtype
        parts = []
        if begin < first:
            parts.append(jnp.broadcast_to(cond_BD[:, None], (cond_BD.shape[0], first, cond_BD.shape[1]))
                         + self.pos_start[...].astype(dt))
        if end > first:
            parts.append(jnp.einsum('blc,cd->bld', inputs_BlC.astype(dt), self.word_w[...].astype(dt))
                         + self.word_b[...].astype(dt))
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        lv = jnp.asarray(levels(self.patch_nums)[begin:end])
        x = x + self.pos_emb[begin:end].astype(dt) + jnp.take(self.level_emb[...], lv, axis=0).astype(dt)
        return constrain(x * self.embedding_mult, ACT_BLD)

    def condition(self, labels_B: jax.Array) -> jax.Array:
        return jnp.take(self.class_emb[...], labels_B, axis=0).astype(self.compute_dtype)

    def logits(self, x_BLD: jax.Array, cond_BD: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.head_ada(cond_BD)[:, :, None], 2, 1)
        h = layer_norm(x_BLD) * (1 + scale[:, 0]) + shift[:, 0]
        logits_BLV = jnp.einsum('bld,dv->blv', h, self.head[...].astype(h.dtype))
        logits_BLV = logits_BLV.astype(jnp.float32) * self.readout_mult
        if self.published:
            logits_BLV = logits_BLV + self.head_bias[...].astype(jnp.float32)
        return constrain(logits_BLV, ('act_batch', 'act_length', 'act_vocab'))

    def __call__(self, inputs_BlC: jax.Array, labels_B: jax.Array) -> jax.Array:
        """Teacher forcing: every scale at once under the block-causal mask."""
        cond_BD = self.condition(labels_B)
        L = sum(p * p for p in self.patch_nums)
        x_BLD = self.embed(0, L, inputs_BlC, cond_BD)
        order_L = levels(self.patch_nums)   # block-causal: key j visible to i iff level j <= level i
        for block in self.blocks:
            x_BLD, _ = block(x_BLD, cond_BD, order_L)
        return self.logits(x_BLD, cond_BD)

    def scale_step(self, k: int, inputs_BlC: jax.Array | None, cond_BD: jax.Array,
                   cache: list | None):
        """Scale k's logits [B, pn_k^2, V] from its inputs and the cache of scales < k.

        Every cached key has level < k and the new ones level k, so no mask is needed.
        Returns (logits, cache including scale k).
        """
        begin, end = scale_bounds(self.patch_nums)[k]
        x_BlD = self.embed(begin, end, inputs_BlC, cond_BD)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x_BlD, kv = block(x_BlD, cond_BD, None, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.logits(x_BlD, cond_BD), new_cache


def var_loss(model: VAR, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over all scales' tokens; per-scale losses as metrics."""
    labels = jnp.where(batch['u'] < model.cond_dropout, model.num_classes, batch['labels'])
    logits_BLV = model(batch['inputs'], labels)
    nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch['codes'])
    loss = jnp.mean(nll_BL)
    metrics = {'loss': loss}
    for pn, (b, e) in zip(model.patch_nums, scale_bounds(model.patch_nums)):
        metrics[f'loss_{pn}x{pn}'] = jnp.mean(nll_BL[:, b:e])
    return loss, metrics


# ----------------------------------------------------------------------------- frozen stage 1

def _tokenizer_error(cfg, problem: str) -> ConfigError:
    return ConfigError(f'data.image.tokenizer_dir={cfg.data.image.tokenizer_dir!r}: {problem}. '
                       'Set it to the --workdir of a finished var_tokenizer run.')


def tokenizer_record(cfg) -> tuple[str, int, dict]:
    """(checkpoint folder, latest step, its JSON record) of the stage-1 run; ConfigError if absent."""
    workdir = cfg.data.image.tokenizer_dir
    if not workdir:
        raise _tokenizer_error(cfg, 'empty')
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    if not os.path.isdir(ckpt_dir):
        raise _tokenizer_error(cfg, f'no tokenizer checkpoint ({ckpt_dir} does not exist)')
    ckpt = checkpoint_lib.Checkpointer(ckpt_dir, read_only=True)
    step = ckpt.latest_step()
    if step is None:
        raise _tokenizer_error(cfg, f'no tokenizer checkpoint ({ckpt_dir} holds no saved step)')
    record = ckpt.read_record(step)
    ckpt.close()
    return ckpt_dir, step, record


def check_tokenizer(cfg) -> None:
    """The stage-1 checkpoint exists, is a var_tokenizer and matches model.var and the image size."""
    _, step, record = tokenizer_record(cfg)
    saved = record['config']
    if saved['model']['family'] != 'var_tokenizer':
        raise _tokenizer_error(cfg, f"step {step} is a {saved['model']['family']!r} run, not "
                                    'var_tokenizer')
    norm = lambda x: list(x) if isinstance(x, (list, tuple)) else x  # noqa: E731  (JSON lists)
    saved_var = {**TOKENIZER_KEY_DEFAULTS, **saved['model']['var']}
    diffs = [f'model.var.{k}: tokenizer {norm(saved_var[k])!r} vs config '
             f'{norm(cfg.model.var[k])!r}' for k in TOKENIZER_KEYS
             if norm(saved_var[k]) != norm(cfg.model.var[k])]
    if saved['data']['image']['image_size'] != cfg.data.image.image_size:
        diffs.append(f"data.image.image_size: tokenizer {saved['data']['image']['image_size']} vs "
                     f'config {cfg.data.image.image_size}')
    if diffs:
        raise _tokenizer_error(cfg, 'the tokenizer was trained with other settings: ' + '; '.join(diffs))


def restore_model(workdir: str, device: jax.Device | None = None):
    """(model, its config, step) from the latest checkpoint of a finished run, read-only.

    Only the parameters are read (onto one device); the model is rebuilt from the run's own
    saved config.
    """
    params, record, step = checkpoint_lib.restore_params(workdir, device=device)
    cfg = ml_collections.ConfigDict(record['config'])
    family = FAMILIES.get(cfg.model.family)
    definition = state_lib.model_def(family.build, cfg, parametrization_lib.from_config(cfg))
    return definition.merge(params), cfg, step


def load_tokenizer(cfg, device: jax.Device | None = None) -> tuple[var_tokenizer.VQVAE, int]:
    """The frozen stage-1 model of data.image.tokenizer_dir (checked first) and its step."""
    check_tokenizer(cfg)
    model, _, step = restore_model(cfg.data.image.tokenizer_dir, device)
    return model, step


def pipeline_options(cfg) -> dict:
    """The image pipeline's class count (the class table must cover every label of the data)
    and the frozen stage-1 encoding it runs on every batch."""
    return {'num_classes': cfg.model.var.num_classes, 'transform': make_prepare(cfg)}


def make_prepare(cfg):
    """The pipeline's frozen stage-1 encoding: images -> codes and teacher-forcing inputs."""
    tokenizer, _ = load_tokenizer(cfg)
    graphdef, params = nnx.split(tokenizer)
    # The trainer prepares eval batches inside its own mesh context, whose devices jit would
    # demand of the arguments; the frozen tokenizer lives on one device, so it runs under a
    # one-device mesh of its own.
    device, = jax.tree.leaves(params)[0].devices()
    own_mesh = jax.sharding.Mesh(np.array([device]).reshape((1,) * len(AXES)), AXES)

    @jax.jit
    def encode(params, images_BHWC):
        model = nnx.merge(graphdef, params)
        codes = model.encode(images_BHWC)
        return jnp.concatenate(codes, axis=1), model.teacher_inputs(codes)

    def prepare(batch: dict) -> dict:
        with jax.set_mesh(own_mesh):
            codes, inputs = jax.device_get(encode(params, batch['images']))
        return {'codes': np.asarray(codes, np.int32), 'inputs': np.asarray(inputs, np.float32),
                'labels': batch['labels'], 'u': batch['u']}

    return prepare


# ----------------------------------------------------------------------------- family

def example_spec(cfg) -> dict[str, jax.ShapeDtypeStruct]:
    v = cfg.model.var
    L = sum(p * p for p in v.patch_nums)
    first = v.patch_nums[0] ** 2
    return {'codes': jax.ShapeDtypeStruct((L,), jnp.int32),
            'inputs': jax.ShapeDtypeStruct((L - first, v.latent_channels), jnp.float32),
            'labels': jax.ShapeDtypeStruct((), jnp.int32),
            'u': jax.ShapeDtypeStruct((), jnp.float32)}


def matmul_params(cfg) -> int:
    """Per-token matmul parameters: attention, MLP, AdaLN, word embedding and head."""
    m, v = cfg.model, cfg.model.var
    d, f = m.d_model, int(round(m.var.mlp_ratio * m.d_model))
    per_block = 4 * d * d + 2 * d * f
    return m.n_layers * per_block + v.latent_channels * d + d * v.codebook_size


def flops_per_example(cfg) -> float:
    """6 N L for the per-token matmuls, 12 layers L^2 d for attention, plus the AdaLN matmuls."""
    m, v = cfg.model, cfg.model.var
    L = sum(p * p for p in v.patch_nums)
    ada = 6.0 * (m.n_layers * 6 + 2) * m.d_model ** 2   # once per example, not per token
    return 6.0 * matmul_params(cfg) * L + 12.0 * m.n_layers * L * L * m.d_model + ada


def validate(cfg, axes: dict[str, int]) -> None:
    """Shape and mesh checks (the stage-1 checkpoint is the family's check_data)."""
    m, v = cfg.model, cfg.model.var
    var_tokenizer.check_config(cfg, axes)
    check_choice('model.var.arch', v.arch, ARCHS)
    check_choice('model.compute_dtype', m.compute_dtype, ('float32', 'bfloat16'))
    check_choice('model.param_dtype', m.param_dtype, ('float32', 'bfloat16'))
    for key in ('d_model', 'n_layers', 'n_heads'):
        if int(m[key]) < 1:
            raise ConfigError(f'model.{key}={m[key]} must be a positive integer')
    if m.d_model % m.n_heads:
        raise ConfigError(f'model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}')
    for key, value in (('model.n_heads', m.n_heads), ('model.var.codebook_size', v.codebook_size),
                       ('model.var.mlp_ratio x d_model', int(round(v.mlp_ratio * m.d_model)))):
        if value % axes['tensor']:
            raise ConfigError(f'{key}={value} must be divisible by the tensor axis size {axes["tensor"]}')
    if m.d_model % axes['fsdp']:
        raise ConfigError(f'model.d_model={m.d_model} must be divisible by the fsdp axis size {axes["fsdp"]}')


def depth_rule(depth: int) -> dict[str, int]:
    """VAR's shape rule: width 64 x depth, heads = depth."""
    return dict(n_layers=depth, d_model=64 * depth, n_heads=depth)


FAMILIES.register('var')(Family(
    build=lambda cfg, rngs, parametrization: VAR(cfg, rngs, parametrization),
    loss=var_loss,
    flops_per_example=flops_per_example,
    tokens_per_example=lambda cfg: sum(p * p for p in cfg.model.var.patch_nums),
    validate=validate,
    data='image',
    default_config=var_tokenizer.default_config,
    pipeline_options=pipeline_options,
    example_spec=example_spec,
    check_data=check_tokenizer,
))

