"""VAR as published: the 'published' block and tokenizer options, the phi rule, and 'simple'
left bit-for-bit as it was. Torch-free (the converter's tests are test_var_official_interop.py)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from model_zoo import var, var_sample, var_tokenizer
from pretrain import parametrization as parametrization_lib
from pretrain import train
from pretrain.errors import ConfigError
from tests.helpers import losses
from tests.test_var import tok_config, var_config


def published_tok_config(steps: int = 6):
    c = tok_config(steps)
    # GroupNorm's 32 groups need widths that are multiples of 32.
    c.model.var.update(tokenizer_arch='published', phi_rule='published', base_channels=32)
    return c


def published_var_config(tokenizer_dir: str, steps: int = 6):
    c = var_config(tokenizer_dir, steps)
    c.model.var.update(tokenizer_arch='published', phi_rule='published', base_channels=32,
                       arch='published')
    return c


def build_var(c) -> var.VAR:
    return var.VAR(c, nnx.Rngs(0), parametrization_lib.from_config(c))


def random_inputs(c, batch: int = 2, seed: int = 0) -> jax.Array:
    v = c.model.var
    n = sum(p * p for p in v.patch_nums) - v.patch_nums[0] ** 2
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, n, v.latent_channels)),
                       jnp.float32)


def randomise(model: nnx.Module, seed: int = 1, std: float = 0.3) -> None:
    """Every parameter to a random value, so zero-initialised biases and gates count too."""
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        tree, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


# ----------------------------------------------------------------------------- phi rule

def test_scale_7_of_10_gets_phi_3_under_the_published_rule_and_phi_2_under_the_old_one():
    assert var_tokenizer.phi_index(7, 10, 4, 'published') == 3
    assert var_tokenizer.phi_index(7, 10, 4, 'simple') == 2
    assert [var_tokenizer.phi_index(k, 10, 4, 'published') for k in range(10)] == \
        [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [var_tokenizer.phi_index(k, 10, 4, 'simple') for k in range(10)] == \
        [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    # Where the rules agree: one conv per scale, and a single scale.
    assert [var_tokenizer.phi_index(k, 4, 4, 'published') for k in range(4)] == [0, 1, 2, 3]
    assert var_tokenizer.phi_index(0, 1, 4, 'published') == 0


def test_published_rule_with_other_than_four_convs_uses_the_half_step_margin():
    # The reference spaces the ticks from 1/(3K) only for K = 4; otherwise from 1/(2K). With
    # K = 3 scale 3 of 10 lies half-way between the first two ticks and goes to phi 0 (the
    # 1/(3K) ticks would send it to phi 1).
    assert [var_tokenizer.phi_index(k, 10, 3, 'published') for k in range(10)] == \
        [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [var_tokenizer.phi_index(k, 10, 8, 'published') for k in range(10)] == \
        [0, 0, 1, 2, 3, 4, 5, 6, 7, 7]


def test_the_quantizer_refines_scale_7_with_the_conv_its_rule_names():
    v = ml_collections.ConfigDict(var_tokenizer.default_config()['var'])
    v.update(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), codebook_size=16, latent_channels=4,
             n_phi=4)
    idx_BN = jnp.asarray(np.random.default_rng(0).integers(0, 16, (1, 100)), jnp.int32)
    for rule, expected in (('published', 3), ('simple', 2)):
        v.phi_rule = rule
        quantizer = var_tokenizer.Quantizer(v, 16, nnx.Rngs(0), 'float32')
        randomise(quantizer)
        got = quantizer.scale_feature(idx_BN, 7)
        e = jnp.take(quantizer.codebook[...], idx_BN, axis=0).reshape(1, 10, 10, 4)
        up = var_tokenizer.resize.resize(e, 16, 'bicubic')
        want = 0.5 * up + 0.5 * quantizer.phi[expected](up)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=rule)


# ----------------------------------------------------------------------------- the block

def test_published_parameters_shapes_and_roles():
    c = published_var_config('x')
    d, heads = c.model.d_model, c.model.n_heads
    model = build_var(c)
    attn = model.blocks[0].attn
    assert attn.q_bias.shape == attn.v_bias.shape == (heads, d // heads)
    assert attn.out_bias.shape == (d,)
    assert not hasattr(attn, 'k_bias')   # VAR has no key bias
    np.testing.assert_allclose(attn.log_logit_scale[...], np.full(heads, math.log(4.0)), rtol=1e-6)
    assert model.head_bias.shape == (c.model.var.codebook_size,)
    for p in (attn.q_bias, attn.v_bias, attn.out_bias, attn.log_logit_scale, model.head_bias):
        assert p.get_metadata()['role'] == 'vector'   # no weight decay, no width scaling
    simple = build_var(var_config('x'))
    assert not hasattr(simple.blocks[0].attn, 'q_bias') and not hasattr(simple, 'head_bias')


@pytest.mark.parametrize('log_scale, expected', [(math.log(2.0), 2.0), (math.log(100.0), 100.0),
                                                 (math.log(1e4), 100.0), (20.0, 100.0)])
def test_logit_scale_is_capped_at_100_and_q_k_are_unit_length(log_scale, expected):
    model = build_var(published_var_config('x'))
    attn = model.blocks[0].attn
    randomise(attn)
    attn.log_logit_scale[...] = jnp.full(attn.log_logit_scale.shape, log_scale)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, attn.wq.shape[1], attn.wq.shape[2]))
    q, k, v = attn.normalise(x, 2 * x, 3 * x)
    np.testing.assert_allclose(jnp.linalg.norm(q, axis=-1), expected, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(k, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(v, 3 * x + attn.v_bias[...], rtol=1e-6)
    # q's direction is that of x + q_bias; k has no bias.
    np.testing.assert_allclose(q / expected, (x + attn.q_bias[...]) / jnp.linalg.norm(
        x + attn.q_bias[...], axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k, x / jnp.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-5,
                               atol=1e-6)


def _reference_block(block, x_BLD, cond_BD, order_L):
    """The published block written out in numpy from its parameters (float64)."""
    p = lambda t: np.asarray(t[...], np.float64)  # noqa: E731
    x, cond = np.asarray(x_BLD, np.float64), np.asarray(cond_BD, np.float64)
    silu = cond / (1 + np.exp(-cond))
    ada = np.einsum('bd,dne->bne', silu, p(block.ada.w)) + p(block.ada.b)
    shift1, scale1, gate1, shift2, scale2, gate2 = (ada[:, i][:, None] for i in range(6))

    def ln(h):
        mu = h.mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

    a = block.attn
    h = ln(x) * (1 + scale1) + shift1
    q = np.einsum('bld,dhk->blhk', h, p(a.wq)) + p(a.q_bias)
    k = np.einsum('bld,dhk->blhk', h, p(a.wk))
    v = np.einsum('bld,dhk->blhk', h, p(a.wv)) + p(a.v_bias)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) * np.exp(
        np.minimum(p(a.log_logit_scale), math.log(100)))[:, None]
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    logits = np.einsum('blhk,bmhk->bhlm', q, k)
    logits = np.where(order_L[None, :] <= order_L[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum('bhlm,bmhk->blhk', probs, v)
    x = x + gate1 * (np.einsum('blhk,hkd->bld', out, p(a.wo)) + p(a.out_bias))
    h = ln(x) * (1 + scale2) + shift2
    f = np.einsum('bld,df->blf', h, p(block.mlp.w1)) + p(block.mlp.b1)
    f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))   # tanh GELU
    return x + gate2 * (np.einsum('blf,fd->bld', f, p(block.mlp.w2)) + p(block.mlp.b2))


def test_published_block_matches_a_direct_computation():
    """Plain gates g (not 1 + g), q/v and output biases, normalised q/k with the learned scale."""
    model = build_var(published_var_config('x'))
    randomise(model)
    block, d = model.blocks[0], model.blocks[0].ada.w.shape[0]
    x_BLD = jax.random.normal(jax.random.PRNGKey(2), (2, 30, d))
    cond_BD = jax.random.normal(jax.random.PRNGKey(3), (2, d))
    order_L = var.levels(model.patch_nums)
    got, _ = block(x_BLD, cond_BD, order_L)
    np.testing.assert_allclose(got, _reference_block(block, x_BLD, cond_BD, order_L),
                               rtol=2e-4, atol=2e-4)


def test_published_head_has_a_bias():
    model = build_var(published_var_config('x'))
    randomise(model, seed=5)
    x_BLD = jax.random.normal(jax.random.PRNGKey(2), (2, 3, model.head.shape[0]))
    cond_BD = model.condition(jnp.array([0, 10]))
    bias = np.asarray(model.head_bias[...])
    h = model.logits(x_BLD, cond_BD)
    model.head_bias[...] = jnp.zeros_like(model.head_bias[...])
    np.testing.assert_allclose(h - model.logits(x_BLD, cond_BD), np.broadcast_to(bias, h.shape),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', ['blockwise', 'dot_product'])
def test_published_attention_runs_under_the_other_kernels(impl):
    c = published_var_config('x')
    model = build_var(c)
    randomise(model)
    inputs, labels = random_inputs(c), jnp.array([2, 10])
    dense = model(inputs, labels)
    c.model.attention_impl = impl
    c.model.attention_block_size = 8
    other = build_var(c)
    nnx.update(other, nnx.state(model, nnx.Param))
    np.testing.assert_allclose(other(inputs, labels), dense, rtol=1e-4, atol=1e-4)


def test_published_teacher_forcing_equals_the_cached_scale_by_scale_path():
    c = published_var_config('x')
    model = build_var(c)
    randomise(model, std=0.1)
    tokenizer = var_tokenizer.VQVAE(published_tok_config(), nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    codes = tokenizer.encode(images)
    labels = jnp.array([3, 10], jnp.int32)
    forced = model(tokenizer.teacher_inputs(codes), labels)
    _, _, cached = var_sample.decode_scales(model, tokenizer, labels, lambda k, _: codes[k])
    np.testing.assert_allclose(jnp.concatenate(cached, axis=1), forced, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the tokenizer

def test_published_tokenizer_layout():
    c = published_tok_config()
    model = var_tokenizer.VQVAE(c, nnx.Rngs(0))
    enc, dec = model.encoder, model.decoder
    assert [len(level.blocks) for level in enc.levels] == [2, 2]
    assert [len(level.attns) for level in enc.levels] == [0, 2]   # attention at the lowest level
    assert [len(level.blocks) for level in dec.levels] == [3, 3]
    assert [len(level.attns) for level in dec.levels] == [0, 3]
    assert enc.levels[0].resample is not None and enc.levels[1].resample is None
    assert dec.levels[0].resample is None and dec.levels[1].resample is not None
    assert enc.quant_conv.kernel.shape == dec.post_quant_conv.kernel.shape == (3, 3, 8, 8)
    images = jnp.zeros((2, 8, 8, 3))
    assert enc(images).shape == (2, 4, 4, 8) and dec(enc(images)).shape == (2, 8, 8, 3)


def test_group_norm_matches_a_direct_computation():
    norm = var_tokenizer.GroupNorm(64, 'float32', nnx.Rngs(0))
    randomise(norm)
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 64))
    g = x.reshape(2, 3, 3, 32, 2)
    mu, var_ = g.mean((1, 2, 4), keepdims=True), g.var((1, 2, 4), keepdims=True)
    want = ((g - mu) / np.sqrt(var_ + 1e-6)).reshape(x.shape) * np.asarray(norm.scale[...]) \
        + np.asarray(norm.bias[...])
    np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32)), want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize('key, value, allowed', [
    ('arch', 'publishd', "Did you mean 'published'"),
    ('phi_rule', 'vat', r"\['simple', 'published'\]"),
    ('tokenizer_arch', 'taming', r"\['simple', 'published'\]"),
])
def test_bad_choices_name_the_key_the_value_and_the_allowed_values(key, value, allowed, tmp_path):
    c = var_config(str(tmp_path / 'nowhere'), steps=3)
    c.model.var[key] = value
    with pytest.raises(ConfigError, match=rf"model\.var\.{key}='{value}' is not allowed.*{allowed}"):
        train.run(c, '', dry_run=True)


def test_published_tokenizer_needs_widths_divisible_by_the_group_count(tmp_path):
    c = tok_config(steps=3)
    c.model.var.update(tokenizer_arch='published', base_channels=8)
    with pytest.raises(ConfigError, match=r"tokenizer_arch='published'.*multiple of the 32 "
                                          r'GroupNorm groups, 8 \(base_channels=8'):
        train.run(c, '', dry_run=True)


def test_published_is_the_default_of_the_d16_configs_only():
    from configs import var_d16, var_tiny, var_tokenizer_d16, var_tokenizer_tiny
    for module in (var_d16, var_tokenizer_d16):
        v = module.get_config().model.var
        assert (v.arch, v.phi_rule, v.tokenizer_arch) == ('published',) * 3, module.__name__
    for module in (var_tiny, var_tokenizer_tiny):
        v = module.get_config().model.var
        assert (v.arch, v.phi_rule, v.tokenizer_arch) == ('simple',) * 3, module.__name__


def test_a_stage_one_record_without_the_new_keys_reads_as_simple():
    saved = {'patch_nums': [1, 2, 3, 4]}
    assert {**var.TOKENIZER_KEY_DEFAULTS, **saved}['phi_rule'] == 'simple'
    assert set(var.TOKENIZER_KEY_DEFAULTS) <= set(var.TOKENIZER_KEYS)


# ----------------------------------------------------------------------------- 'simple' unchanged

def test_simple_results_are_unchanged():
    """Golden values of the default 'simple' stages, recorded before 'published' existed."""
    c = tok_config()
    tokenizer = var_tokenizer.VQVAE(c, nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    codes = tokenizer.encode(images)
    assert [np.asarray(x).tolist() for x in codes[:3]] == [
        [[19], [14]], [[25, 19, 14, 28], [25, 21, 25, 27]],
        [[25, 26, 19, 25, 9, 19, 14, 27, 28], [25, 14, 14, 14, 14, 19, 25, 5, 27]]]
    assert float(var_tokenizer.tokenizer_loss(tokenizer, {'images': images})[0]) == \
        pytest.approx(0.9140080809593201, rel=1e-6)
    model = build_var(var_config('x'))
    logits = model(tokenizer.teacher_inputs(codes), jnp.array([1, 10]))
    assert float(jnp.abs(logits).sum()) == pytest.approx(384.3040771484375, rel=1e-6)
    assert float(logits[0, 5, 3]) == pytest.approx(0.2992948889732361, rel=1e-5)
    assert float(logits[1, 29, 31]) == pytest.approx(-0.022664576768875122, rel=1e-4)


# ----------------------------------------------------------------------------- the trainer

@pytest.fixture(scope='module')
def published_runs(tmp_path_factory):
    tok_dir = str(tmp_path_factory.mktemp('pub_tok'))
    tok = train.run(published_tok_config(), tok_dir, devices=jax.devices()[:1])
    var_dir = str(tmp_path_factory.mktemp('pub_var'))
    stage2 = train.run(published_var_config(tok_dir), var_dir, devices=jax.devices()[:1])
    return tok_dir, tok, var_dir, stage2


@pytest.mark.slow   # minutes: both VAR stages trained on 2 cores
def test_published_stages_train_through_the_real_trainer(published_runs):
    tok_dir, tok, var_dir, stage2 = published_runs
    for result in (tok, stage2):
        assert len(losses(result)) == 6 and np.isfinite(losses(result)).all()
    assert np.mean(losses(stage2)[-2:]) < np.mean(losses(stage2)[:2])
    model, cfg, step = var.restore_model(var_dir)
    assert step == 6 and cfg.model.var.arch == 'published'
    # The published-only parameters are trained (they start at 0 and log 4).
    assert float(jnp.abs(model.blocks[0].attn.q_bias[...]).max()) > 0
    assert float(jnp.abs(model.head_bias[...]).max()) > 0
    tokenizer, _ = var.load_tokenizer(cfg)
    images, _ = var_sample.sample(model, tokenizer, jnp.arange(2, dtype=jnp.int32),
                                  jax.random.PRNGKey(0), cfg_scale=1.5, top_k=5)
    assert images.shape == (2, 8, 8, 3) and bool(jnp.isfinite(images).all())


@pytest.mark.slow   # minutes: both VAR stages trained on 2 cores
def test_a_simple_stage_two_refuses_a_published_tokenizer(published_runs, tmp_path):
    c = var_config(published_runs[0], steps=3)
    c.model.var.base_channels = 32
    with pytest.raises(ConfigError, match="tokenizer_arch: tokenizer 'published' vs config "
                                          "'simple'"):
        train.run(c, str(tmp_path / 'run'))
