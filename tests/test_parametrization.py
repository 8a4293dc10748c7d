"""SP / muP / depth-muP rules: equality at the base shape, each rule row, attention logit scale,
Adam epsilon per role, zero-init options, decay modes (and 'auto'), coord check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_zoo import FAMILIES
from pretrain import config as config_lib
from pretrain import optim, schedules
from pretrain import parametrization as parametrization_lib
from pretrain import state as state_lib
from pretrain.study import coord_check
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
    # Same decay mode on both sides: 'auto' picks 'coupled' for SP and 'independent' for muP.
    sp = _one_step_losses(_cfg('sp', weight_decay_mode='coupled'), steps=3)
    mup = _cfg(name, base_width=32, base_depth=2, weight_decay_mode='coupled')
    assert _one_step_losses(mup, steps=3) == sp


def test_auto_decay_at_the_base_shape_matches_sp_to_rounding():
    sp = _one_step_losses(_cfg('sp'), steps=3)
    np.testing.assert_allclose(_one_step_losses(_cfg('mup', base_width=32), steps=3), sp, rtol=1e-5)


def _init_params(c):
    parametrization = parametrization_lib.from_config(c)
    md = state_lib.model_def(FAMILY.build, c, parametrization)
    init = state_lib.init_fn(FAMILY.build, c, optim.make_optimizer(
        c.optim, lambda s: LR, md, parametrization), parametrization, md)
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
    model = FAMILY.build(c, nnx.Rngs(0), parametrization_lib.from_config(c))
    m, head_dim = 4.0, 64
    assert model.embedding_mult == 3.0
    assert model.readout_mult == 2.0 / m
    assert model.blocks[0].residual_mult == 4 ** -0.5
    np.testing.assert_allclose(model.blocks[0].attn.logit_scale, 1 / head_dim * np.sqrt(head_dim / m))
    sp_cfg = _cfg('sp', width=128, depth=4)
    sp = FAMILY.build(sp_cfg, nnx.Rngs(0), parametrization_lib.from_config(sp_cfg))
    assert (sp.readout_mult, sp.blocks[0].residual_mult) == (1.0, 1.0)
    assert sp.blocks[0].attn.logit_scale == head_dim ** -0.5


@pytest.mark.parametrize('width, heads, base_head_dim, expected', [
    # Head count fixed (4 heads, base width 64 -> base head dim 16), head dim 16 -> 64:
    # sqrt(16) / 64 = 1/16, where SP has 1/sqrt(64) = 1/8.
    (256, 4, 0, 4 / 64),
    # Head dim fixed at 16 (heads 4 -> 16): sqrt(16) / 16 = 1/4, the SP value; the old rule
    # (1/sqrt(d_head) * m^-0.5) gave 1/8 here.
    (256, 16, 16, 4 / 16),
    # Both grow (8 heads of 32 at width 256): sqrt(16) / 32 = 1/8.
    (256, 8, 16, 4 / 32),
    # Base head dim derived from this model's heads (16): 64 / 16 = 4 -> sqrt(4) / 16.
    (256, 16, 0, 2 / 16),
])
def test_attention_logit_scale_for_both_ways_of_widening(width, heads, base_head_dim, expected):
    c = _cfg('mup', width=width, base_width=64)
    c.model.update(n_heads=heads, n_kv_heads=heads)
    c.parametrization.base_head_dim = base_head_dim
    model = FAMILY.build(c, nnx.Rngs(0), parametrization_lib.from_config(c))
    np.testing.assert_allclose(model.blocks[0].attn.logit_scale, expected, rtol=1e-12)
    c.parametrization.name = 'sp'
    assert FAMILY.build(c, nnx.Rngs(0), parametrization_lib.from_config(c)).blocks[0].attn.logit_scale == (width // heads) ** -0.5


def test_attention_logits_stay_order_one_for_aligned_queries_and_keys():
    # Once trained, q and k have correlated coordinates of size Theta(1): q.k grows like d_head.
    # With q = k = 1 the logit is scale * d_head, which muP keeps at sqrt(d_head_base) = 4.
    for head_dim, parametrization in [(16, parametrization_lib.Parametrization('mup', 1.0, base_head_dim=16)),
                           (64, parametrization_lib.Parametrization('mup', 4.0, base_head_dim=16)),
                           (64, parametrization_lib.Parametrization('mup', 4.0)),   # heads fixed
                           (16, parametrization_lib.Parametrization('mup', 4.0, base_head_dim=16))]:
        assert parametrization.attn_logit_scale(head_dim) * head_dim == pytest.approx(4.0)


def test_bad_base_head_dim_is_named():
    c = _cfg('mup', width=96, base_width=48)
    c.parametrization.base_head_dim = -1
    with pytest.raises(ConfigError, match='parametrization.base_head_dim=-1'):
        parametrization_lib.from_config(c)


def test_var_attention_uses_the_same_scale():
    from model_zoo import var
    c = _cfg('mup', width=256, base_width=64)
    c.model.update(**var.depth_rule(4))           # 4 layers of width 256, 4 heads of 64
    c.parametrization.base_head_dim = 64          # VAR's depth rule keeps 64-dim heads
    parametrization = parametrization_lib.from_config(c)
    block = var.Block(c.model, parametrization, nnx.Rngs(0))
    assert block.attn.logit_scale == parametrization.attn_logit_scale(64) == 64 ** -0.5


def test_zero_query_and_zero_readout():
    c = _cfg('mup', width=64, base_width=32)
    c.parametrization.update(zero_query=True, zero_readout=True)
    params, _ = _init_params(c)
    attn = params['blocks'][0]['attn']
    assert not np.asarray(attn['wq']).any() and not np.asarray(params['head']).any()
    assert np.asarray(attn['wk']).std() > 0 and np.asarray(attn['wv']).std() > 0
    c.parametrization.update(zero_query=False, zero_readout=False)
    params, _ = _init_params(c)
    assert np.asarray(params['blocks'][0]['attn']['wq']).std() > 0
    from model_zoo import var
    c.model.update(**var.depth_rule(2))
    c.parametrization.update(zero_query=True, base_head_dim=64)
    block = var.Block(c.model, parametrization_lib.from_config(c), nnx.Rngs(0))
    assert not np.asarray(block.attn.wq[...]).any()


def test_zero_readout_with_tied_embeddings_is_an_error():
    c = _cfg('mup', width=64, base_width=32)
    c.parametrization.zero_readout = True
    c.model.tie_embeddings = True
    with pytest.raises(ConfigError, match='parametrization.zero_readout.*model.tie_embeddings'):
        parametrization_lib.from_config(c)


def _first_update(c, grads_fn):
    params, md = _init_params(c)
    parametrization = parametrization_lib.from_config(c)
    spec = schedules.spec_from_config(c.schedule, c.optim.lr, c.train.steps)
    tx = optim.make_optimizer(c.optim, schedules.make_schedule(spec), md, parametrization)
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


@pytest.mark.parametrize('name', ['sp', 'mup'])
def test_role_lr_multipliers_scale_one_role_on_top_of_the_rule(name):
    c = _cfg(name, width=64, base_width=32, weight_decay=0.0, grad_clip=0.0, eps=1e-12)
    c.parametrization.role_lr_mult.update(embedding=0.25, vector=3.0)
    _, updates = _first_update(c, jnp.ones_like)
    m = 2.0 if name == 'mup' else 1.0
    np.testing.assert_allclose(np.abs(updates['embed']['table']), LR * 0.25, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates['final_norm']['scale']), LR * 3.0, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates['blocks'][0]['mlp']['w_down']), LR / m, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates['head']), LR, rtol=1e-4)


@pytest.mark.parametrize('value', [0.0, -1.0, float('nan')])
def test_bad_role_lr_multiplier_is_named(value):
    c = _cfg('mup')
    c.parametrization.role_lr_mult.hidden = value
    with pytest.raises(ConfigError, match=f'role_lr_mult.hidden={value!r} must be a positive'):
        parametrization_lib.from_config(c)


def test_role_init_multiplier_scales_one_role_on_top_of_the_rule():
    c = _cfg('mup', width=128, base_width=32)
    plain = parametrization_lib.from_config(c)
    c.parametrization.role_init_mult.update(hidden=2.0, embedding=0.0)
    tuned = parametrization_lib.from_config(c)
    assert tuned.init_mult('hidden') == 2.0 * plain.init_mult('hidden') == 1.0
    assert tuned.init_mult('embedding') == 0.0
    assert tuned.init_mult('readout') == plain.init_mult('readout')
    c.parametrization.role_init_mult.hidden = -1.0
    with pytest.raises(ConfigError, match='role_init_mult.hidden=-1.0 must be a non-negative'):
        parametrization_lib.from_config(c)


def test_unknown_role_in_lr_multipliers_is_named():
    c = _cfg('mup')
    c.parametrization.role_lr_mult = dict(embeding=0.5)
    with pytest.raises(ConfigError, match=r"unknown roles \['embeding'\]"):
        parametrization_lib.from_config(c)


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


def test_adam_epsilon_follows_every_roles_gradient_scale():
    # Under muP every gradient here is Theta(1/m) (the 1/m readout multiplier reaches every
    # activation's gradient), so eps / m for every role; the first Adam step is
    # g / (|g| + eps_i) times the LR multiplier.
    g, eps = 1e-9, 1e-8
    c = _cfg('mup', width=128, base_width=32, weight_decay=0.0, grad_clip=0.0, eps=eps)
    _, updates = _first_update(c, lambda p: jnp.full_like(p, g))
    m = 4.0
    np.testing.assert_allclose(-updates['blocks'][0]['mlp']['w_up'], LR / m * g / (g + eps / m), rtol=1e-4)
    for leaf in (updates['embed']['table'], updates['head'], updates['final_norm']['scale'],
                 updates['blocks'][0]['attn_norm']['scale']):
        np.testing.assert_allclose(-leaf, LR * g / (g + eps / m), rtol=1e-4)
    c.parametrization.scale_eps = False
    _, updates = _first_update(c, lambda p: jnp.full_like(p, g))
    np.testing.assert_allclose(-updates['head'], LR * g / (g + eps), rtol=1e-4)


def test_adam_epsilon_depth_scaling_inside_the_blocks():
    # depth-muP: the branch multiplier m_L^-alpha = 4^-0.5 scales in-block gradients, and eps.
    g, eps = 1e-9, 1e-8
    c = _cfg('depth_mup', width=64, base_width=32, depth=4, base_depth=1, weight_decay=0.0,
             grad_clip=0.0, eps=eps)
    _, updates = _first_update(c, lambda p: jnp.full_like(p, g))
    m, branch, depth_lr = 2.0, 0.5, 0.5   # depth_lr = m_L^(alpha - 1) = 4^-0.5
    np.testing.assert_allclose(-updates['blocks'][1]['attn']['wq'],
                               LR / m * depth_lr * g / (g + eps / m * branch), rtol=1e-4)
    np.testing.assert_allclose(-updates['blocks'][1]['mlp_norm']['scale'],
                               LR * depth_lr * g / (g + eps / m * branch), rtol=1e-4)
    np.testing.assert_allclose(-updates['embed']['table'], LR * g / (g + eps / m), rtol=1e-4)
    np.testing.assert_allclose(-updates['final_norm']['scale'], LR * g / (g + eps / m), rtol=1e-4)


def test_eps_and_lr_rules_of_the_ssm_roles():
    parametrization = parametrization_lib.Parametrization('mup', width_mult=8.0)
    assert parametrization.init_mult('hidden_fan_in') == 1.0 and parametrization.init_mult('hidden_to_fixed') == 1 / 8
    assert parametrization.lr_mult('hidden_fan_in', True) == parametrization.lr_mult('hidden_to_fixed', True) == 1 / 8
    assert parametrization.eps_mult('hidden_to_fixed', True) == 1.0       # its gradient stays Theta(1)
    assert parametrization.eps_mult('hidden_fan_in', True) == 1 / 8
    assert parametrization.wd_mult('hidden_to_fixed', 'mup_scaled') == 8.0


@pytest.mark.parametrize('mode', ['coupled', 'independent', 'mup_scaled', 'auto'])
def test_weight_decay_modes(mode):
    lam, m = 0.1, 4.0
    c = _cfg('mup', width=128, base_width=32, weight_decay=lam, weight_decay_mode=mode, grad_clip=0.0)
    c.schedule.update(kind='linear', total_steps=4)     # lr(0) = LR, so the relative schedule is 1
    params, updates = _first_update(c, jnp.zeros_like)  # zero gradients: only decay moves params
    w, dw = params['blocks'][0]['mlp']['w_up'], updates['blocks'][0]['mlp']['w_up']
    # 'auto' under muP: independent, removing LR * lambda per step (what coupled decay removes
    # at the base width) at every width, instead of coupled's LR / m * lambda.
    expected = {'coupled': LR / m * lam, 'independent': lam, 'mup_scaled': LR * lam,
                'auto': LR * lam}[mode]
    np.testing.assert_allclose(dw, -expected * w, rtol=1e-5, atol=1e-12)
    assert not np.asarray(updates['final_norm']['scale']).any()   # vectors never decay
    rates = optim.applied_rates(c.optim, schedules.make_schedule(
        schedules.spec_from_config(c.schedule, LR, c.train.steps)), _init_params(c)[1],
        parametrization_lib.from_config(c))(jnp.int32(0))
    np.testing.assert_allclose(rates['wd/hidden'], expected, rtol=1e-6)
    np.testing.assert_allclose(rates['lr/hidden'], LR / m, rtol=1e-6)
    assert rates['wd/vector'] == 0.0


def test_auto_decay_is_coupled_under_sp():
    lam = 0.1
    c = _cfg('sp', width=128, weight_decay=lam, grad_clip=0.0)
    assert c.optim.weight_decay_mode == 'auto'   # the default
    _, auto = _first_update(c, jnp.ones_like)
    c.optim.weight_decay_mode = 'coupled'
    _, coupled = _first_update(c, jnp.ones_like)
    jax.tree.map(np.testing.assert_array_equal, auto, coupled)


def test_bad_parametrization_is_named():
    c = _cfg('mupp')
    with pytest.raises(ConfigError, match="Did you mean 'mup'"):
        parametrization_lib.from_config(c)
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
    # The attention logits are reported too (fixed head count: the head dim grows with width).
    # After 3 steps they are still small (mean |logit| ~0.01-0.2) and their muP slopes move
    # between about -0.5 (the init, where q.k ~ sqrt(d_head) times the 1/d_head scale) and +0.4;
    # SP's grow about as width^2.5.
    attn = [k for k in mup if k.startswith('attn_logits_')]
    assert len(attn) == c.model.n_layers
    assert min(sp[k][-1] for k in attn) > 1.5
    assert max(mup[k][-1] for k in attn) < 0.8
    assert (tmp_path / 'coord_check.json').exists() and (tmp_path / 'coord_check.png').stat().st_size > 0
