"""SP / muP / depth-muP rules: equality at the base shape, each rule row, decay modes, coord check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_zoo import FAMILIES
from pretrain import config as config_lib
from pretrain import coord_check, optim, parametrization, schedules
from pretrain import state as state_lib
from pretrain.errors import ConfigError
from tests.helpers import tiny_config
from tests.test_model import _one_step_losses

FAMILY = FAMILIES.get('transformer')
LR = 1e-2


def _cfg(name='sp', width=32, base_width=0, depth=2, base_depth=0, **optim_cfg):
    c = tiny_config()
    c.mesh.ici.update(data=1)
    c.model.update(d_model=width, d_ff=2 * width, n_layers=depth, n_heads=2, n_kv_heads=2)
    c.parametrization.update(name=name, base_width=base_width, base_depth=base_depth)
    c.optim.update(lr=LR, **optim_cfg)
    c.schedule.update(kind='constant', warmup_steps=0)
    return c


@pytest.mark.parametrize('name', ['mup', 'depth_mup'])
def test_mup_at_the_base_shape_is_sp_bit_for_bit(name):
    sp = _one_step_losses(_cfg('sp'), steps=3)
    assert _one_step_losses(_cfg(name, base_width=32, base_depth=2), steps=3) == sp


def _init_params(c):
    md = state_lib.model_def(FAMILY.build, c)
    init = state_lib.init_fn(FAMILY.build, c, optim.make_optimizer(
        c.optim, lambda s: LR, md.info, parametrization.from_config(c)))
    return init(jax.random.PRNGKey(0)).params, md


def test_init_std_follows_the_role_at_two_widths():
    for width in (64, 256):
        params, _ = _init_params(_cfg('mup', width=width, base_width=64))
        m = width / 64
        hidden = np.asarray(params['blocks'][0]['mlp']['w_up'])
        np.testing.assert_allclose(hidden.std(), 0.02 / np.sqrt(m), rtol=0.05)
        np.testing.assert_allclose(np.asarray(params['head']).std(), 0.02, rtol=0.05)
        np.testing.assert_allclose(np.asarray(params['embed']['table']).std(), 0.02, rtol=0.05)
        assert np.all(np.asarray(params['blocks'][0]['attn_norm']['scale']) == 1.0)
    c = _cfg('mup', width=64, base_width=32)
    c.parametrization.zero_readout = True
    assert not np.asarray(_init_params(c)[0]['head']).any()


def test_forward_multipliers():
    c = _cfg('depth_mup', width=128, base_width=32, depth=4, base_depth=1)
    c.parametrization.update(input_mult=3.0, output_mult=2.0, depth_alpha=0.5)
    model = FAMILY.build(c, nnx.Rngs(0))
    m, head_dim = 4.0, 64
    assert model.embedding_mult == 3.0
    assert model.readout_mult == 2.0 / m
    assert model.blocks[0].residual_mult == 4 ** -0.5
    np.testing.assert_allclose(model.blocks[0].attn.logit_scale, 1 / head_dim * np.sqrt(head_dim / m))
    sp = FAMILY.build(_cfg('sp', width=128, depth=4), nnx.Rngs(0))
    assert (sp.readout_mult, sp.blocks[0].residual_mult) == (1.0, 1.0)
    assert sp.blocks[0].attn.logit_scale == head_dim ** -0.5


def _first_update(c, grads_fn):
    params, md = _init_params(c)
    p13n = parametrization.from_config(c)
    spec = schedules.spec_from_config(c.schedule, c.optim.lr, c.train.steps)
    tx = optim.make_optimizer(c.optim, schedules.make_schedule(spec), md.info, p13n)
    updates, _ = tx.update(jax.tree.map(grads_fn, params), tx.init(params), params)
    return params, updates


@pytest.mark.parametrize('width', [32, 128])
def test_adam_lr_multipliers_per_role(width):
    # The first Adam step moves every coordinate with a non-zero gradient by about its LR.
    c = _cfg('mup', width=width, base_width=32, weight_decay=0.0, grad_clip=0.0, eps=1e-12)
    _, updates = _first_update(c, lambda p: jnp.ones_like(p))
    m = width / 32
    np.testing.assert_allclose(np.abs(updates['blocks'][0]['mlp']['w_down']), LR / m, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates['embed']['table']), LR, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates['head']), LR, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates['final_norm']['scale']), LR, rtol=1e-4)


def test_depth_mup_lr_multipliers():
    c = _cfg('depth_mup', width=64, base_width=32, depth=4, base_depth=1,
             weight_decay=0.0, grad_clip=0.0, eps=1e-12)
    c.parametrization.depth_alpha = 1.0   # CompleteP: m_L^(alpha - 1) = 1
    _, updates = _first_update(c, jnp.ones_like)
    np.testing.assert_allclose(np.abs(updates['blocks'][1]['attn']['wq']), LR / 2, rtol=1e-4)
    c.parametrization.depth_alpha = 0.5   # depth-muP: hidden eta/m * 4^-0.5, block vectors eta * 4^-0.5
    _, updates = _first_update(c, jnp.ones_like)
    np.testing.assert_allclose(np.abs(updates['blocks'][1]['attn']['wq']), LR / 2 / 2, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates['blocks'][1]['mlp_norm']['scale']), LR / 2, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates['final_norm']['scale']), LR, rtol=1e-4)


def test_adam_epsilon_is_scaled_for_hidden_matrices():
    g, eps = 1e-9, 1e-8
    c = _cfg('mup', width=128, base_width=32, weight_decay=0.0, grad_clip=0.0, eps=eps)
    _, updates = _first_update(c, lambda p: jnp.full_like(p, g))
    m = 4.0
    # First Adam step: g / (|g| + eps_i), times the LR multiplier.
    np.testing.assert_allclose(-updates['blocks'][0]['mlp']['w_up'], LR / m * g / (g + eps / m), rtol=1e-4)
    np.testing.assert_allclose(-updates['embed']['table'], LR * g / (g + eps), rtol=1e-4)


@pytest.mark.parametrize('mode', ['coupled', 'independent', 'mup_scaled'])
def test_weight_decay_modes(mode):
    lam, m = 0.1, 4.0
    c = _cfg('mup', width=128, base_width=32, weight_decay=lam, weight_decay_mode=mode, grad_clip=0.0)
    c.schedule.update(kind='linear', total_steps=4)     # lr(0) = LR, so the relative schedule is 1
    params, updates = _first_update(c, jnp.zeros_like)  # zero gradients: only decay moves params
    w, dw = params['blocks'][0]['mlp']['w_up'], updates['blocks'][0]['mlp']['w_up']
    expected = {'coupled': LR / m * lam, 'independent': lam, 'mup_scaled': LR * lam}[mode]
    np.testing.assert_allclose(dw, -expected * w, rtol=1e-5, atol=1e-12)
    assert not np.asarray(updates['final_norm']['scale']).any()   # vectors never decay
    rates = optim.applied_rates(c.optim, schedules.make_schedule(
        schedules.spec_from_config(c.schedule, LR, c.train.steps)), _init_params(c)[1].info,
        parametrization.from_config(c))(jnp.int32(0))
    np.testing.assert_allclose(rates['wd/hidden'], expected, rtol=1e-6)
    np.testing.assert_allclose(rates['lr/hidden'], LR / m, rtol=1e-6)
    assert rates['wd/vector'] == 0.0


def test_bad_parametrization_is_named():
    c = _cfg('mupp')
    with pytest.raises(ConfigError, match="Did you mean 'mup'"):
        parametrization.from_config(c)
    c = _cfg('mup')
    c.optim.weight_decay_mode = 'decoupled'
    with pytest.raises(ConfigError, match='optim.weight_decay_mode'):
        optim.validate(c.optim)


@pytest.mark.slow   # ~35 s cold; the per-role rules it rests on are unit-tested above
def test_coordinate_check_separates_sp_from_mup(tmp_path):
    c = _cfg('sp')
    c.data.max_files = 20
    lines = []
    result = coord_check.run(config_lib.finalize(c), [32, 128], 3, ['sp', 'mup'], str(tmp_path),
                             progress=lines.append)
    assert lines == [f'coord_check: {n} at width {w} ({i}/4), 3 steps ...'
                     for i, (n, w) in enumerate([('sp', 32), ('sp', 128), ('mup', 32),
                                                 ('mup', 128)], 1)]
    sp, mup = result['sp']['slopes'], result['mup']['slopes']
    hidden = [k for k in sp if k.startswith('block_')]
    assert min(sp[k][-1] for k in hidden) > 0.7            # SP: activations grow with width
    assert max(abs(mup[k][-1]) for k in hidden) < 0.3      # muP: near flat
    assert abs(mup['logits'][-1]) < 0.3
    assert (tmp_path / 'coord_check.json').exists() and (tmp_path / 'coord_check.png').stat().st_size > 0
