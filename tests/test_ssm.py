"""State-space models: scans against a NumPy recurrence, SSD, step mode, init, sharding, training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_zoo import FAMILIES, mamba, scans
from model_zoo.layers import ROLES
from pretrain import config as config_lib
from pretrain import mesh as mesh_lib
from pretrain import state as state_lib, train
from pretrain import parametrization as parametrization_lib
from pretrain.errors import ConfigError
from tests.helpers import fixed_batch_losses, losses, random_tokens, tiny_config, with_mesh

FAMILY = FAMILIES.get('mamba')


def _config(**ssm):
    c = tiny_config()
    c.model.family = 'mamba'
    c.model.ssm.update(headdim=16, chunk_size=8, d_state=8)
    c.model.ssm.update(**ssm)
    return c


_tokens = random_tokens


# ---------------------------------------------------------------------------------------------
# NumPy references (float64, one token at a time)

def np_selective(x, dt, A, Bm, Cm, D, h0):
    h, ys = h0.copy(), []
    for t in range(x.shape[1]):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * Bm[:, t, None, :]
        ys.append(np.einsum('ben,bn->be', h, Cm[:, t]) + D * x[:, t])
    return np.stack(ys, 1), h


def np_ssd(x, dt, A, Bm, Cm, D, h0):
    H, G = x.shape[2], Bm.shape[2]
    Bh, Ch = np.repeat(Bm, H // G, axis=2), np.repeat(Cm, H // G, axis=2)
    h, ys = h0.copy(), []
    for t in range(x.shape[1]):
        h = (np.exp(dt[:, t] * A)[..., None, None] * h
             + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :])
        ys.append(np.einsum('bhpn,bhn->bhp', h, Ch[:, t]) + D[:, None] * x[:, t])
    return np.stack(ys, 1), h


def _selective_inputs(B=2, L=7, E=3, N=2, seed=0):
    r = np.random.default_rng(seed)
    return [r.normal(size=(B, L, E)), np.log1p(np.exp(r.normal(size=(B, L, E)))),
            -np.exp(r.normal(size=(E, N)) * 0.5), r.normal(size=(B, L, N)), r.normal(size=(B, L, N)),
            r.normal(size=(E,)), r.normal(size=(B, E, N))]


def _ssd_inputs(B=2, L=10, H=4, P=2, G=2, N=3, seed=0):
    r = np.random.default_rng(seed)
    return [r.normal(size=(B, L, H, P)), np.log1p(np.exp(r.normal(size=(B, L, H)))),
            -np.exp(r.normal(size=(H,)) * 0.5), r.normal(size=(B, L, G, N)), r.normal(size=(B, L, G, N)),
            r.normal(size=(H,)), r.normal(size=(B, H, P, N))]


def _np_grads(fn, inputs, cot_y, cot_h, eps=1e-6):
    """Central differences of <cot_y, y> + <cot_h, h_L> through the NumPy recurrence."""
    def f(args):
        y, h = fn(*args)
        return np.sum(cot_y * y) + np.sum(cot_h * h)
    grads = []
    for i, a in enumerate(inputs):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus = [b.copy() for b in inputs]
            minus = [b.copy() for b in inputs]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            g[idx] = (f(plus) - f(minus)) / (2 * eps)
        grads.append(g)
    return grads


def _jax_grads(fn, inputs, cot_y, cot_h):
    def f(*args):
        y, h = fn(*args)
        return jnp.sum(cot_y * y) + jnp.sum(cot_h * h)
    args = [jnp.asarray(a, jnp.float32) for a in inputs]
    return jax.jit(jax.grad(f, argnums=tuple(range(len(args)))))(*args)


SCAN_FNS = {'sequential': scans.scan_sequential, 'associative': scans.scan_associative,
            'chunked': lambda *a: scans.scan_chunked(*a, chunk_size=3)}   # 7 = 3 + 3 + 1: ragged


@pytest.mark.parametrize('name', list(SCAN_FNS))
def test_selective_scan_matches_numpy_recurrence_and_its_gradients(name):
    inputs = _selective_inputs()
    y_ref, h_ref = np_selective(*inputs)
    y, h = jax.jit(SCAN_FNS[name])(*[jnp.asarray(a, jnp.float32) for a in inputs])
    assert y.dtype == h.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), h_ref, rtol=1e-5, atol=1e-5)
    r = np.random.default_rng(1)
    cot_y, cot_h = r.normal(size=y_ref.shape), r.normal(size=h_ref.shape)
    expected = _np_grads(np_selective, inputs, cot_y, cot_h)
    got = _jax_grads(SCAN_FNS[name], inputs, cot_y, cot_h)
    for name_i, g, e in zip(('x', 'dt', 'A', 'B', 'C', 'D', 'h0'), got, expected):
        np.testing.assert_allclose(np.asarray(g), e, rtol=2e-4, atol=2e-4, err_msg=name_i)


def test_every_scan_runs_in_float32_for_bfloat16_inputs():
    inputs = [jnp.asarray(a, jnp.bfloat16) for a in _selective_inputs()]
    for fn in SCAN_FNS.values():
        y, h = fn(*inputs)
        assert y.dtype == h.dtype == jnp.float32


@pytest.mark.parametrize('chunk', [3, 4, 16])
def test_ssd_chunked_matches_sequential_for_ragged_lengths(chunk):
    inputs = _ssd_inputs()   # L = 10 (ragged for every chunk size), grouped B/C (4 heads, 2 groups)
    y_ref, h_ref = np_ssd(*inputs)
    chunked = lambda *a: scans.ssd_chunked(*a, chunk_size=chunk)  # noqa: E731
    y, h = jax.jit(chunked)(*[jnp.asarray(a, jnp.float32) for a in inputs])
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), h_ref, rtol=1e-5, atol=1e-5)
    y_seq, _ = jax.jit(scans.ssd_sequential)(*[jnp.asarray(a, jnp.float32) for a in inputs])
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_seq), rtol=1e-5, atol=1e-5)
    r = np.random.default_rng(2)
    cot_y, cot_h = r.normal(size=y_ref.shape), r.normal(size=h_ref.shape)
    for g, e in zip(_jax_grads(chunked, inputs, cot_y, cot_h),
                    _jax_grads(scans.ssd_sequential, inputs, cot_y, cot_h)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


def test_ssd_sequential_gradients_match_numpy():
    inputs = _ssd_inputs(B=1, L=5, H=2, P=2, G=1, N=2)
    r = np.random.default_rng(3)
    y_ref, h_ref = np_ssd(*inputs)
    cot_y, cot_h = r.normal(size=y_ref.shape), r.normal(size=h_ref.shape)
    for g, e in zip(_jax_grads(scans.ssd_sequential, inputs, cot_y, cot_h),
                    _np_grads(np_ssd, inputs, cot_y, cot_h)):
        np.testing.assert_allclose(np.asarray(g), e, rtol=2e-4, atol=2e-4)


# ---------------------------------------------------------------------------------------------
# The language model

VARIANTS = {'mamba1': dict(version=1), 'mamba2': dict(version=2),
            'hybrid': dict(version=2, attn_every=2)}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_recurrent_step_mode_equals_parallel_forward(variant):
    c = _config(**VARIANTS[variant])
    model = FAMILY.build(c, nnx.Rngs(0), parametrization_lib.from_config(c))
    tokens = _tokens((2, 11))   # 11 = 8 + 3: a ragged last chunk
    logits, stepped = _forward_and_steps(model, tokens)
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(logits), rtol=1e-4, atol=1e-5)


@nnx.jit
def _forward_and_steps(model, tokens_BL):
    """Parallel logits and the logits of feeding the tokens one at a time through `step`."""
    def body(cache, tok_B):
        logits_BV, cache = model.step(tok_B, cache)
        return cache, logits_BV
    _, logits_LBV = jax.lax.scan(body, model.init_cache(*tokens_BL.shape), tokens_BL.T)
    return model(tokens_BL), jnp.moveaxis(logits_LBV, 0, 1)


def test_all_mamba1_scans_give_the_same_model():
    c = _config(version=1)
    model = FAMILY.build(c, nnx.Rngs(0), parametrization_lib.from_config(c))
    tokens = _tokens((2, 11))
    ref = model(tokens)
    for name in ('sequential', 'associative'):
        for block in model.blocks:
            block.mixer.scan_name = name
        np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('variant', ['mamba1', 'mamba2'])
def test_causality(variant):
    c = _config(**VARIANTS[variant])
    model = FAMILY.build(c, nnx.Rngs(0), parametrization_lib.from_config(c))
    tokens = _tokens((2, 16))
    t = 9
    changed = tokens.at[:, t + 1:].set(_tokens((2, 16 - t - 1), seed=1))
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(np.asarray(a[:, :t + 1]), np.asarray(b[:, :t + 1]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(a[:, t + 1:]), np.asarray(b[:, t + 1:]))


def test_initial_A_dt_and_D_follow_their_distributions():
    c = _config(version=1)
    c.model.update(d_model=128, n_layers=1)   # 256 channels
    mixer = mamba.Mamba1Mixer(c.model, nnx.Rngs(0))
    s = c.model.ssm
    A = -np.exp(np.asarray(mixer.A_log[...]))
    np.testing.assert_allclose(A, -np.broadcast_to(np.arange(1, s.d_state + 1), A.shape), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mixer.D[...]), 1.0)
    _check_log_uniform(np.log1p(np.exp(np.asarray(mixer.dt_bias[...], np.float64))), s)

    c.model.ssm.update(version=2, headdim=1)   # 256 heads: enough samples for the statistics
    mixer = mamba.Mamba2Mixer(c.model, nnx.Rngs(1))
    a = np.exp(np.asarray(mixer.A_log[...]))
    assert a.min() >= 1.0 and a.max() <= 16.0
    assert _ks_uniform((a - 1.0) / 15.0) < _KS_CRITICAL / np.sqrt(a.size)
    np.testing.assert_array_equal(np.asarray(mixer.D[...]), 1.0)
    _check_log_uniform(np.log1p(np.exp(np.asarray(mixer.dt_bias[...], np.float64))), s)


_KS_CRITICAL = 1.95   # Kolmogorov-Smirnov: distance * sqrt(n) exceeds this with probability 0.001


def _ks_uniform(u):
    """Kolmogorov-Smirnov distance of samples in [0, 1] from U(0, 1)."""
    u = np.sort(u)
    n = len(u)
    return max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))


def _check_log_uniform(dt, s):
    assert dt.min() >= s.dt_min * (1 - 1e-4) and dt.max() <= s.dt_max * (1 + 1e-4)
    u = (np.log(dt) - math.log(s.dt_min)) / (math.log(s.dt_max) - math.log(s.dt_min))
    assert _ks_uniform(u) < _KS_CRITICAL / np.sqrt(u.size)


@pytest.mark.parametrize('variant', ['mamba1', 'mamba2'])
def test_parameters_carry_axes_and_roles(variant):
    c = _config(**VARIANTS[variant])
    definition = state_lib.model_def(FAMILY.build, c, parametrization_lib.from_config(c))
    infos, shapes = jax.tree.leaves(definition.info), jax.tree.leaves(definition.shapes)
    assert all(i.role in ROLES and len(i.axes) == len(s.shape) for i, s in zip(infos, shapes))
    mixer = definition.info['blocks'][0]['mixer']
    for name in ('A_log', 'D', 'dt_bias'):
        assert mixer[name].role == 'vector'   # no weight decay, no muP width scaling
        assert parametrization_lib.Parametrization().wd_mult(mixer[name].role, 'coupled') == 0.0
    inner = 'inner' if variant == 'mamba1' else 'ssm_heads'
    assert mixer['w_x'].axes[:2] == ('embed', inner)
    spec = mesh_lib.logical_to_spec(mixer['w_x'].axes)
    assert tuple(spec)[:2] == ('fsdp', 'tensor')


def test_validation_names_the_bad_key_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"model.ssm.scan='assoc'.*'associative'"):
        config_lib.validate(_config(scan='assoc'), FAMILY, num_devices=8)
    c = _config(expand=1)
    c.model.d_model = 30
    c.mesh.ici.update(data=2, tensor=4)
    with pytest.raises(ConfigError, match=r'd_inner.*30.*tensor axis size 4'):
        config_lib.validate(c, FAMILY, num_devices=8)
    with pytest.raises(ConfigError, match=r'model.ssm.headdim=48 must divide d_inner.*64'):
        config_lib.validate(_config(version=2, headdim=48), FAMILY, num_devices=8)
    with pytest.raises(ConfigError, match=r'model.ssm.version=3'):
        config_lib.validate(_config(version=3), FAMILY, num_devices=8)


def test_flops_grow_linearly_with_length_without_attention():
    c = _config(version=1)
    per_token = [mamba.flops_per_token(_seq(c, n)) for n in (128, 1024)]
    assert per_token[0] == per_token[1] > 6 * 2 * 32 * 64
    h = _config(version=1, attn_every=2)
    assert mamba.flops_per_token(_seq(h, 1024)) > mamba.flops_per_token(_seq(h, 128))


def _seq(c, n):
    return config_lib.with_overrides(c, {'data.seq_len': n})


# ---------------------------------------------------------------------------------------------
# Training

def _losses(c, devices, steps=2):
    """Losses of `steps` updates on a fixed synthetic batch under the config's mesh."""
    return fixed_batch_losses(c, devices, _tokens((8, 17), seed=3), steps)


def test_mamba2_sharded_training_matches_one_device():
    c = _config(version=2)
    c.model.n_layers = 1   # one block shows the sharding; a second would only add compile time
    c.mesh.ici.update(data=1, fsdp=1, tensor=1, sequence=1)
    one = _losses(c, jax.devices()[:1])
    c.mesh.ici.update(data=2, fsdp=2, tensor=2)
    config_lib.validate(c, FAMILY, num_devices=8)
    np.testing.assert_allclose(_losses(c, jax.devices()), one, rtol=2e-5, atol=2e-5)
    assert one[1] < one[0]


def _corpus_config(**model):
    """configs/ssm_tiny.py (Mamba-1, chunked scan) on the embedded corpus, shrunk for the suite."""
    from configs import ssm_tiny
    c = ssm_tiny.get_config()
    c.model.update(**model)
    c.train.update(steps=30, log_every=1, eval_every=0, global_batch_size=8)
    c.data.update(max_files=40, seq_len=64)
    c.schedule.update(warmup_steps=5, decay_steps=5)
    c.checkpoint.update(every_steps=100, async_save=False)
    c.metrics.update(peak_flops_per_device=1e12, tensorboard=False)
    return c


def test_mamba1_on_the_corpus_sharded_equals_one_device_and_the_loss_falls(tmp_path):
    c = with_mesh(_corpus_config(d_model=32, n_layers=1))
    one = losses(train.run(c, str(tmp_path / 'one'), devices=jax.devices()[:1]))
    sharded = losses(train.run(with_mesh(c, fsdp=4, tensor=2), str(tmp_path / 'sharded')))
    np.testing.assert_allclose(sharded, one, rtol=2e-5, atol=2e-5)
    assert np.mean(one[-5:]) < one[0] - 1.0, one


@pytest.mark.slow
def test_tiny_config_loss_falls_on_the_embedded_corpus(tmp_path):
    history = losses(train.run(_corpus_config(), str(tmp_path)))
    assert np.mean(history[-5:]) < history[0] - 1.0, history


@pytest.mark.parametrize('name,millions', [
    ('mamba_130m', 130), ('mamba2_130m', 130),
    pytest.param('mamba_370m', 370, marks=pytest.mark.slow),     # 48 layers: ~15 s to trace
    pytest.param('mamba2_370m', 370, marks=pytest.mark.slow)])
def test_published_size_configs_validate_and_have_their_sizes(name, millions):
    import importlib
    c = importlib.import_module(f'configs.{name}').get_config()
    config_lib.validate(c, FAMILY, num_devices=8)
    n = state_lib.param_count(state_lib.model_def(FAMILY.build, c, parametrization_lib.from_config(c)))
    assert abs(n / 1e6 - millions) / millions < 0.1, n


# ---------------------------------------------------------------------------------------------
# muP roles of the SSM parameters (table in model_zoo/mamba.py)

def _scaled_init(c):
    """The parameters as the trainer initialises them (built init x the role's muP multiplier)."""
    parametrization = parametrization_lib.from_config(c)
    md = state_lib.model_def(FAMILY.build, c, parametrization)
    params = nnx.to_pure_dict(nnx.state(FAMILY.build(c, nnx.Rngs(0), parametrization), nnx.Param))
    return parametrization_lib.scale_init(params, md.info, parametrization), md


def _width_config(version, name, width, **parametrization):
    c = _config(version=version)
    c.model.update(d_model=width, n_layers=2)
    c.parametrization.update(name=name, base_width=64, **parametrization)
    return c


_SIGMA = 0.02


@pytest.mark.parametrize('name', ['sp', 'mup'])
def test_mamba1_init_std_per_matrix_at_widths_64_and_512(name):
    for width in (64, 512):
        m = width / 64 if name == 'mup' else 1.0
        R = math.ceil(width / 16)
        mixer = _scaled_init(_width_config(1, name, width))[0]['blocks'][0]['mixer']
        expected = {
            'w_x': _SIGMA / math.sqrt(m),
            'w_dt_low': _SIGMA / math.sqrt(m),
            # U(+-R^-0.5) already scales with its fan-in R: 0.289 at 64, 0.102 at 512, under
            # SP and muP alike (the old double shrink gave 0.036 at 512).
            'w_dt': R ** -0.5 / math.sqrt(3),
            'w_B': _SIGMA / m,      # width -> state size: TP5 output layer, std ~ 1/fan_in
            'w_C': _SIGMA / m,
            'w_out': _SIGMA / math.sqrt(2) / math.sqrt(m),   # sigma/sqrt(n_layers), hidden
        }
        for key, std in expected.items():
            np.testing.assert_allclose(np.asarray(mixer[key]).std(), std, rtol=0.1, err_msg=key)


def test_mamba2_init_std_per_matrix_under_mup():
    for width in (64, 512):
        m = width / 64
        mixer = _scaled_init(_width_config(2, 'mup', width))[0]['blocks'][0]['mixer']
        for key, std in {'w_x': _SIGMA / math.sqrt(m), 'w_dt': _SIGMA / math.sqrt(m),
                         'w_B': _SIGMA / m, 'w_C': _SIGMA / m,
                         'w_out': _SIGMA / math.sqrt(2) / math.sqrt(m)}.items():
            np.testing.assert_allclose(np.asarray(mixer[key]).std(), std, rtol=0.1, err_msg=key)


@pytest.mark.parametrize('version', [1, 2])
def test_depth_mup_scales_the_ssm_branch_once(version):
    # 4 layers over a 1-layer base: the branch multiplier is 4^-0.5 and w_out keeps the base
    # model's sigma / sqrt(1); SP at 4 layers uses sigma / sqrt(4) and no multiplier.
    c = _width_config(version, 'depth_mup', 64, base_depth=1)
    c.model.n_layers = 4
    params, _ = _scaled_init(c)
    model = FAMILY.build(c, nnx.Rngs(0), parametrization_lib.from_config(c))
    assert model.blocks[0].residual_mult == 0.5
    np.testing.assert_allclose(np.asarray(params['blocks'][0]['mixer']['w_out']).std(), _SIGMA, rtol=0.1)
    c.parametrization.name = 'sp'
    params, _ = _scaled_init(c)
    assert FAMILY.build(c, nnx.Rngs(0), parametrization_lib.from_config(c)).blocks[0].residual_mult == 1.0
    np.testing.assert_allclose(np.asarray(params['blocks'][0]['mixer']['w_out']).std(), _SIGMA / 2,
                               rtol=0.1)


def test_mamba1_first_adam_step_per_role_under_mup():
    from pretrain import optim
    c = _width_config(1, 'mup', 256)
    c.optim.update(lr=1e-2, weight_decay=0.0, grad_clip=0.0, eps=1e-12)
    params, md = _scaled_init(c)
    tx = optim.make_optimizer(c.optim, lambda step: 1e-2, md, parametrization_lib.from_config(c))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    mixer = updates['blocks'][0]['mixer']
    for key, lr in {'w_B': 1e-2 / 4, 'w_dt': 1e-2 / 4, 'w_x': 1e-2 / 4, 'dt_bias': 1e-2}.items():
        np.testing.assert_allclose(np.abs(np.asarray(mixer[key])), lr, rtol=1e-4, err_msg=key)


def test_fixed_dt_rank_under_mup_is_an_error():
    c = _width_config(1, 'mup', 128)
    c.model.ssm.dt_rank = 8
    with pytest.raises(ConfigError, match='model.ssm.dt_rank=8'):
        config_lib.validate(c, FAMILY, num_devices=1)
