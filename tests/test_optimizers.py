"""Muon and Adafactor: sharded equal to one device, optimizer state sharded like its parameter,
muP rules (Muon's spectral scale, Adafactor's Adam-like rows), validation, exact resume after
SIGKILL and exact branching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_zoo
from pretrain import config as config_lib
from pretrain import optim, scaling_rules, schedules, train
from pretrain import parametrization as parametrization_lib
from pretrain import setup as setup_lib
from pretrain.errors import ConfigError
from tests.helpers import fixed_batch_losses, losses, random_tokens, tiny_config, with_mesh
from tests.test_fault_tolerance import _kill_and_resume
from tests.test_model import _one_step_losses
from tests.test_parametrization import LR, _cfg, _first_update, _init_params


def _with_optimizer(c, name):
    c.optim.name = name
    c.optim.adafactor.min_dim_size_to_factor = 16   # factor the tiny model's matrices too
    return c


@pytest.mark.parametrize('name', ['muon', 'adafactor'])
def test_sharded_step_equals_one_device(name):
    tokens = random_tokens((8, 33), seed=3, vocab=264)
    one = fixed_batch_losses(with_mesh(_with_optimizer(tiny_config(), name), data=1),
                             jax.devices()[:1], tokens, steps=3)
    eight = fixed_batch_losses(with_mesh(_with_optimizer(tiny_config(), name), fsdp=4, tensor=2),
                               jax.devices(), tokens, steps=3)
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    assert one[2] < one[0]


def _spec_by_path(tree) -> dict:
    return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                     for k in path): s.spec
            for path, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_optimizer_state_is_sharded_like_its_parameter():
    c = with_mesh(_with_optimizer(tiny_config(), 'muon'), fsdp=4, tensor=2)
    setup = setup_lib.build(c, jax.devices(), families=model_zoo.FAMILIES)
    wq_spec = setup.state_shardings.params['blocks'][0]['attn']['wq'].spec
    opt = _spec_by_path(setup.state_shardings.opt_state)
    muon_moments = [spec for path, spec in opt.items()
                    if path.endswith('mu/blocks/0/attn/wq') and '/muon/' in path]
    assert muon_moments == [wq_spec] and any(wq_spec)
    c = with_mesh(_with_optimizer(tiny_config(), 'adafactor'), fsdp=4, tensor=2)
    setup = setup_lib.build(c, jax.devices(), families=model_zoo.FAMILIES)
    w_up = setup.state_shardings.params['blocks'][0]['mlp']['w_up'].spec    # (embed, mlp)
    opt = _spec_by_path(setup.state_shardings.opt_state)
    # Adafactor keeps a row and a column statistic: the parameter with one axis removed.
    factored = sorted(tuple(spec) for path, spec in opt.items()
                      if path.endswith('blocks/0/mlp/w_up') and ('v_row' in path or 'v_col' in path))
    assert factored == sorted([(w_up[0],), (w_up[1],)]), (factored, w_up)
    assert all(spec == jax.sharding.PartitionSpec() for path, spec in opt.items()
               if path.endswith('count'))


def test_muon_sees_each_parameter_as_its_matrix():
    c = _with_optimizer(tiny_config(), 'muon')
    _, md = _init_params(_cfg())
    dims = lambda i: None if optim.matrix_dims(i) is None else tuple(optim.matrix_dims(i))  # noqa: E731
    attn, mlp = md.info['blocks'][0]['attn'], md.info['blocks'][0]['mlp']
    assert dims(attn['wq']) == ((0,), (1, 2))        # embed -> heads x head_dim
    assert dims(attn['wo']) == ((0, 1), (2,))        # heads x head_dim -> embed
    assert dims(mlp['w_up']) == ((0,), (1,)) and dims(mlp['w_down']) == ((0,), (1,))
    assert dims(md.info['embed']['table']) is None     # embeddings, readout, vectors: Adam
    assert dims(md.info['head']) is None
    assert dims(md.info['final_norm']['scale']) is None
    del c


def _update_norms(name, width, optimizer='muon'):
    c = _cfg(name, width=width, base_width=32, weight_decay=0.0, grad_clip=0.0, eps=1e-12)
    c.optim.name = optimizer
    params, updates = _first_update(
        c, lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape, p.dtype))
    w_up = np.asarray(updates['blocks'][0]['mlp']['w_up'])
    return np.linalg.norm(w_up, 2), np.sqrt(np.mean(w_up ** 2)), updates


def test_muon_update_spectral_norm_stays_put_under_mup_and_grows_under_sp():
    # An orthogonalised update has all singular values near 1; the spectral scale sets its size.
    # muP: sqrt(fan_out / fan_in) is the same at every width for a hidden matrix, so the
    # update's spectral norm does not grow; SP (Liu et al.'s RMS matching) grows it as sqrt(m).
    mup_32, rms_32, _ = _update_norms('mup', 32)
    mup_128, _, updates = _update_norms('mup', 128)
    sp_128, _, _ = _update_norms('sp', 128)
    np.testing.assert_allclose(mup_128 / mup_32, 1.0, rtol=0.15)
    np.testing.assert_allclose(sp_128 / mup_32, 2.0, rtol=0.15)
    # At the base shape the update's RMS is update_rms x LR (to Newton-Schulz's accuracy).
    np.testing.assert_allclose(rms_32, 0.2 * LR, rtol=0.3)
    # Embedding and readout stay with Adam and its muP LR: a first step of size LR.
    np.testing.assert_allclose(np.abs(updates['head']), LR, rtol=1e-3)


def test_spectral_scale_rule():
    sp = parametrization_lib.Parametrization('sp')
    mup = parametrization_lib.Parametrization('mup', width_mult=4.0)
    assert sp.spectral_scale('hidden', 64, 192, 0.2) == 0.2 * np.sqrt(192)   # Liu et al. 2025
    base = parametrization_lib.Parametrization('mup', width_mult=1.0)
    assert base.spectral_scale('hidden', 64, 192, 0.2) == sp.spectral_scale('hidden', 64, 192, 0.2)
    # 4x wider under muP: a hidden matrix keeps its scale, a width -> fixed matrix (Mamba's B/C
    # projections) shrinks as sqrt(fan_out / fan_in), i.e. by 1/2.
    np.testing.assert_allclose(mup.spectral_scale('hidden', 256, 768, 0.2), 0.2 * np.sqrt(192))
    np.testing.assert_allclose(mup.spectral_scale('hidden_to_fixed', 256, 16, 0.2),
                               sp.spectral_scale('hidden_to_fixed', 64, 16, 0.2) / 2)


def test_logged_rates_follow_each_optimizers_rules():
    def rates(optimizer):
        c = _cfg('mup', width=128, base_width=32)
        c.optim.name = optimizer
        parametrization = parametrization_lib.from_config(c)
        spec = schedules.spec_from_config(c.schedule, c.optim.lr, c.train.steps)
        return optim.applied_rates(c.optim, schedules.make_schedule(spec), _init_params(c)[1],
                                   parametrization)(jnp.int32(0))
    muon, adam = rates('muon'), rates('adamw')
    np.testing.assert_allclose(adam['lr/hidden'], LR / 4, rtol=1e-6)
    np.testing.assert_allclose(muon['lr/hidden'], LR, rtol=1e-6)       # the scale carries width
    np.testing.assert_allclose(muon['lr/readout'], LR, rtol=1e-6)
    np.testing.assert_allclose(muon['wd/hidden'], adam['wd/hidden'], rtol=1e-6)


def test_adafactor_first_step_follows_the_adam_rows_under_mup():
    # First step: v = g^2, so the update is sign(g) (then clipped at RMS 1), like Adam's.
    c = _cfg('mup', width=128, base_width=32, weight_decay=0.0, grad_clip=0.0)
    _with_optimizer(c, 'adafactor')
    _, updates = _first_update(c, jnp.ones_like)
    np.testing.assert_allclose(np.abs(updates['blocks'][0]['mlp']['w_down']), LR / 4, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates['embed']['table']), LR, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates['head']), LR, rtol=1e-4)


@pytest.mark.parametrize('name', ['muon', 'adafactor'])
def test_mup_at_the_base_shape_is_sp_bit_for_bit(name):
    sp = _one_step_losses(_with_optimizer(_cfg('sp', weight_decay_mode='coupled'), name), steps=3)
    mup = _with_optimizer(_cfg('mup', base_width=32, weight_decay_mode='coupled'), name)
    assert _one_step_losses(mup, steps=3) == sp


@pytest.mark.parametrize('key, value, message', [
    ('optim.name', 'lion', "optim.name='lion' is not allowed"),
    ('optim.muon.momentum', 1.0, 'optim.muon.momentum=1.0 must be in'),
    ('optim.muon.ns_steps', 0, 'optim.muon.ns_steps=0 must be an integer'),
    ('optim.muon.update_rms', 0.0, 'optim.muon.update_rms=0.0 must be > 0'),
    ('optim.weight_decay_mode', 'mup_scaled', "'mup_scaled' cannot be used with optim.name='muon'"),
])
def test_bad_muon_settings_are_named(key, value, message):
    c = config_lib.with_overrides(tiny_config(), {'optim.name': 'muon', key: value})
    with pytest.raises(ConfigError, match=message):
        optim.validate(c.optim)


@pytest.mark.parametrize('key, value', [('optim.adafactor.decay_rate', 0.0),
                                        ('optim.adafactor.min_dim_size_to_factor', 0),
                                        ('optim.adafactor.clipping_threshold', -1.0),
                                        ('optim.adafactor.eps', 0.0)])
def test_bad_adafactor_settings_are_named(key, value):
    c = config_lib.with_overrides(tiny_config(), {'optim.name': 'adafactor', key: value})
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        optim.validate(c.optim)


def test_scaling_rules_without_a_meaning_for_the_optimizer_refuse_it():
    c = tiny_config()
    c.optim.name = 'muon'
    c.scaling.update(rule='sqrt_adam', ref_global_batch_size=8, ref_lr=1e-3, ref_eps=1e-8)
    with pytest.raises(ConfigError, match=r"scaling.rule='sqrt_adam' cannot be used with "
                                          r"optim.name='muon'.*second-moment"):
        scaling_rules.validate(c)
    c.scaling.update(rule='adamw_timescale', ref_weight_decay=0.1, ref_tokens=10_000)
    scaling_rules.validate(c)        # decoupled decay's timescale holds for any update


@pytest.mark.parametrize('name', ['muon', 'adafactor'])
def test_sigkill_resumes_bit_identical(name, tmp_path):
    _kill_and_resume(tmp_path, steps=8, moments=['random'], seed=2,
                     optim={'name': name, 'adafactor.min_dim_size_to_factor': 16})


@pytest.mark.parametrize('name', ['muon', 'adafactor'])
def test_branched_cooldown_equals_a_from_scratch_run(name, tmp_path):
    parent = _with_optimizer(tiny_config(steps=4), name)
    parent.checkpoint.update(every_steps=2)
    parent.schedule.update(kind='constant', warmup_steps=1)
    parent_result = train.run(parent, str(tmp_path / 'parent'))

    def wsd(**schedule):
        c = _with_optimizer(tiny_config(steps=5), name)
        c.schedule.update(kind='wsd', warmup_steps=1, decay_steps=3, **schedule)
        return c
    scratch = train.run(wsd(), str(tmp_path / 'scratch'))
    child = train.run(wsd(branch_from=f'{tmp_path / "parent"}@2'), str(tmp_path / 'child'))
    assert losses(parent_result)[:2] + losses(child) == losses(scratch)
