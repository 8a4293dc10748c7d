"""Schedules against hand-computed values, under jit, through JSON, and their config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_zoo import base_config
from pretrain.errors import ConfigError
from pretrain.schedules import ScheduleSpec, describe, make_schedule, spec_from_config

RTOL, ATOL = 2e-6, 1e-7

# Hand-computed: cos(pi/4) = 0.70710678, cos(15 pi/16) = -0.98078528, cos(0.95 pi) = -0.98768834,
# sqrt(0.5) = 0.70710678, sqrt(0.95) = 0.97467943.

CONSTANT = ScheduleSpec('constant', peak=3.0, warmup_steps=6, total_steps=10)
CONSTANT_VALUES = {
    0: 0.5,         # 3 * 1/6
    2: 1.5,         # mid-warmup: 3 * 3/6
    5: 3.0,         # last warmup step reaches the peak
    6: 3.0,
    9: 3.0,
    10: 3.0,        # past total_steps: still the peak
    10**6: 3.0,
}

# floor = 2 * 0.25 = 0.5; decay from step 4 over 16 steps.
COSINE = ScheduleSpec('cosine', peak=2.0, warmup_steps=4, total_steps=20, min_lr_ratio=0.25)
COSINE_VALUES = {
    0: 0.5,         # 2 * 1/4
    1: 1.0,         # 2 * 2/4
    3: 2.0,
    4: 2.0,         # decay start
    8: 1.78033009,  # p = 1/4: 0.5 + 0.75 * (1 + 0.70710678)
    12: 1.25,       # p = 1/2: 0.5 + 0.75 * 1
    19: 0.51441104,  # p = 15/16: 0.5 + 0.75 * (1 - 0.98078528)
    20: 0.5,
    1000: 0.5,
}

LINEAR = ScheduleSpec('linear', peak=2.0, warmup_steps=4, total_steps=20, min_lr_ratio=0.25)
LINEAR_VALUES = {
    0: 0.5,
    1: 1.0,
    3: 2.0,
    4: 2.0,
    8: 1.625,       # 0.5 + 1.5 * 3/4
    12: 1.25,       # 0.5 + 1.5 * 1/2
    19: 0.59375,    # 0.5 + 1.5 * 1/16
    20: 0.5,
    1000: 0.5,
}

# floor 0.1, warmup 10, stable 10..79, decay 80..100 (20 steps).
WSD_COMMON = {
    0: 0.1,         # 1 * 1/10
    4: 0.5,         # 1 * 5/10
    9: 1.0,
    10: 1.0,
    50: 1.0,
    79: 1.0,
    80: 1.0,        # decay start
    100: 0.1,
    500: 0.1,
}
WSD_VALUES = {
    'linear': {85: 0.775, 90: 0.55, 99: 0.145},   # 0.1 + 0.9 * (1 - p)
    # 0.1 + 0.45 * (1 + cos(pi p))
    'cosine': {85: 0.86819805, 90: 0.55, 99: 0.10554025},
    # 0.1 + 0.9 * (1 - sqrt(p)): p = 1/4 -> 0.5, p = 1/2 -> 0.29289322, p = 0.95 -> 0.02532057
    '1-sqrt': {85: 0.55, 90: 0.3636039, 99: 0.12278851},
}


def wsd(shape: str, **kw) -> ScheduleSpec:
    args = dict(kind='wsd', peak=1.0, warmup_steps=10, total_steps=100, decay_steps=20,
                decay_shape=shape, min_lr_ratio=0.1)
    args.update(kw)
    return ScheduleSpec(**args)


CASES = [
    pytest.param(CONSTANT, CONSTANT_VALUES, id='constant'),
    pytest.param(COSINE, COSINE_VALUES, id='cosine'),
    pytest.param(LINEAR, LINEAR_VALUES, id='linear'),
] + [pytest.param(wsd(shape), {**WSD_COMMON, **values}, id=f'wsd-{shape}')
     for shape, values in WSD_VALUES.items()]


@pytest.mark.parametrize('spec, expected', CASES)
def test_values_match_hand_computed(spec, expected):
    schedule = make_schedule(spec)
    for step, want in expected.items():
        got = schedule(step)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), want, rtol=RTOL, atol=ATOL, err_msg=f'step {step}')


@pytest.mark.parametrize('spec, expected', CASES)
def test_jit_matches_eager(spec, expected):
    schedule = make_schedule(spec)
    jitted = jax.jit(schedule)
    for step in expected:
        eager = schedule(step)
        traced = jitted(jnp.int32(step))
        assert traced.dtype == jnp.float32 and traced.shape == ()
        np.testing.assert_allclose(float(traced), float(eager), rtol=RTOL, atol=ATOL)
    steps = jnp.array(sorted(expected), jnp.int32)
    np.testing.assert_allclose(jitted(steps), [float(schedule(int(s))) for s in steps],
                               rtol=RTOL, atol=ATOL)


def test_traced_inside_loop():
    schedule = make_schedule(wsd('1-sqrt'))

    def body(step, total):
        return total + schedule(step)

    got = jax.jit(lambda: jax.lax.fori_loop(0, 100, body, jnp.float32(0)))()
    want = sum(float(schedule(t)) for t in range(100))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_no_warmup():
    cosine = make_schedule(ScheduleSpec('cosine', peak=2.0, warmup_steps=0, total_steps=10))
    np.testing.assert_allclose([float(cosine(t)) for t in (0, 5, 10)], [2.0, 1.0, 0.0],
                               rtol=RTOL, atol=ATOL)
    constant = make_schedule(ScheduleSpec('constant', peak=2.0, warmup_steps=0, total_steps=10))
    assert float(constant(0)) == 2.0
    spec = wsd('linear', warmup_steps=0)
    assert float(make_schedule(spec)(0)) == 1.0
    assert spec.stable_phase(0)


def test_warmup_fills_the_run():
    # Nothing to decay through: the last step is the peak, total_steps is the floor.
    schedule = make_schedule(ScheduleSpec('linear', peak=1.0, warmup_steps=4, total_steps=4,
                                          min_lr_ratio=0.5))
    np.testing.assert_allclose([float(schedule(t)) for t in range(6)],
                               [0.25, 0.5, 0.75, 1.0, 0.5, 0.5], rtol=RTOL)


def test_decay_start_and_stable_phase():
    spec = wsd('1-sqrt')
    assert spec.decay_start == 80
    assert [spec.stable_phase(t) for t in (0, 9, 10, 50, 79, 80, 99, 100, 200)] == [
        False, False, True, True, True, False, False, False, False]
    assert CONSTANT.decay_start is None
    assert [CONSTANT.stable_phase(t) for t in (0, 5, 6, 10, 10**6)] == [
        False, False, True, True, True]
    for spec in (COSINE, LINEAR):
        assert spec.decay_start == 4
        assert not any(spec.stable_phase(t) for t in range(30))
    # warmup + decay == total leaves no stable phase.
    tight = wsd('linear', warmup_steps=80)
    assert not any(tight.stable_phase(t) for t in range(120))


@pytest.mark.parametrize('spec', [CONSTANT, COSINE, LINEAR, wsd('cosine'),
                                  wsd('1-sqrt', peak=3e-4, min_lr_ratio=0.1)])
def test_json_round_trip(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    back = ScheduleSpec.from_dict(d)
    assert back == spec
    assert back.to_dict() == spec.to_dict()
    assert float(make_schedule(back)(85)) == float(make_schedule(spec)(85))


def test_from_dict_rejects_unknown_keys():
    d = {**COSINE.to_dict(), 'decay_fraction': 0.2}
    with pytest.raises(ConfigError, match='decay_fraction'):
        ScheduleSpec.from_dict(d)


def schedule_cfg(**overrides):
    cfg = base_config().schedule
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_spec_from_config_defaults():
    c = base_config()
    spec = spec_from_config(c.schedule, c.optim.lr, c.train.steps)
    # No length given: the default fractions, 10% warmup and 20% decay, as absolute steps.
    assert spec == ScheduleSpec('wsd', peak=c.optim.lr, warmup_steps=50, total_steps=500,
                                decay_steps=100, decay_shape='1-sqrt', min_lr_ratio=0.0)
    assert spec.decay_start == 400
    explicit = spec_from_config(schedule_cfg(total_steps=1000), 1e-3, 500)
    assert explicit.total_steps == 1000
    assert 'wsd' in describe(spec) and '\n' not in describe(spec)


@pytest.mark.parametrize('cfg, lr, key, value', [
    (dict(kind='cosin'), 1e-3, 'schedule.kind', "'cosin'"),
    (dict(decay_shape='sqrt'), 1e-3, 'schedule.decay_shape', "'sqrt'"),
    (dict(warmup_steps=-2), 1e-3, 'schedule.warmup_steps', '-2'),
    (dict(total_steps=-2), 1e-3, 'schedule.total_steps', '-2'),
    (dict(kind='cosine', decay_steps=-5), 1e-3, 'schedule.decay_steps', '-5'),
    (dict(warmup_steps=600, decay_steps=0, kind='constant'), 1e-3, 'schedule.warmup_steps',
     '600'),
    (dict(decay_steps=0), 1e-3, 'schedule.decay_steps', '0'),
    (dict(warmup_steps=450, decay_steps=100), 1e-3, 'schedule.decay_steps', '100'),
    (dict(min_lr_ratio=-0.1), 1e-3, 'schedule.min_lr_ratio', '-0.1'),
    (dict(min_lr_ratio=1.5), 1e-3, 'schedule.min_lr_ratio', '1.5'),
    (dict(), 0.0, 'optim.lr', '0.0'),
    (dict(), -1e-3, 'optim.lr', '-0.001'),
], ids=['kind', 'shape', 'neg-warmup', 'neg-total', 'neg-decay', 'warmup>total',
        'wsd-no-decay', 'warmup+decay>total', 'ratio<0', 'ratio>1', 'lr=0', 'lr<0'])
def test_config_errors(cfg, lr, key, value):
    with pytest.raises(ConfigError) as err:
        spec_from_config(schedule_cfg(**cfg), lr, 500)
    msg = str(err.value)
    assert f'{key}={value}' in msg, msg


def test_error_states_allowed_range():
    with pytest.raises(ConfigError, match=r'decay_steps <= 50'):
        spec_from_config(schedule_cfg(warmup_steps=450, decay_steps=100), 1e-3, 500)
    with pytest.raises(ConfigError, match=r'\[0, 1\]'):
        spec_from_config(schedule_cfg(min_lr_ratio=2.0), 1e-3, 500)
    with pytest.raises(ConfigError, match="'1-sqrt'"):
        spec_from_config(schedule_cfg(decay_shape='exp'), 1e-3, 500)


def test_non_integer_steps_rejected():
    with pytest.raises(ConfigError, match='schedule.warmup_steps=10.5'):
        ScheduleSpec('constant', peak=1.0, warmup_steps=10.5, total_steps=100)
    # An integral float (1e3 on a command line) is fine and stored as an int.
    assert ScheduleSpec('constant', peak=1.0, warmup_steps=10, total_steps=1e3).total_steps == 1000


# --- Lengths as fractions of the run ------------------------------------------------------

def test_fractions_resolve_to_absolute_steps():
    spec = spec_from_config(schedule_cfg(warmup_fraction=0.05, decay_fraction=0.25), 1e-3, 200)
    assert (spec.warmup_steps, spec.decay_steps, spec.total_steps) == (10, 50, 200)
    # Fractions are of schedule.total_steps when it is set, not of train.steps.
    spec = spec_from_config(schedule_cfg(decay_fraction=0.5, total_steps=40), 1e-3, 30)
    assert (spec.warmup_steps, spec.decay_steps) == (4, 20)
    # What a checkpoint stores is steps only: the same spec as the explicit counts.
    explicit = spec_from_config(schedule_cfg(warmup_steps=10, decay_steps=50), 1e-3, 200)
    assert explicit.to_dict() == spec_from_config(
        schedule_cfg(warmup_fraction=0.05, decay_fraction=0.25), 1e-3, 200).to_dict()
    assert 'fraction' not in str(explicit.to_dict())


def test_fraction_rounding_and_minimum_decay():
    assert spec_from_config(schedule_cfg(warmup_fraction=0.125), 1e-3, 4).warmup_steps == 1  # 0.5 up
    assert spec_from_config(schedule_cfg(), 1e-3, 3).decay_steps == 1   # 0.6 -> 1
    assert spec_from_config(schedule_cfg(), 1e-3, 2).decay_steps == 1   # 0.4 -> at least 1
    with pytest.raises(ConfigError, match='schedule.decay_steps=0'):
        spec_from_config(schedule_cfg(decay_fraction=0.0), 1e-3, 100)   # wsd needs a decay


def test_a_count_and_a_fraction_together_are_an_error():
    for phase in ('warmup', 'decay'):
        cfg = schedule_cfg(**{f'{phase}_steps': 10, f'{phase}_fraction': 0.1})
        with pytest.raises(ConfigError) as err:
            spec_from_config(cfg, 1e-3, 100)
        msg = str(err.value)
        assert f'schedule.{phase}_steps=10' in msg and f'schedule.{phase}_fraction=0.1' in msg


@pytest.mark.parametrize('cfg, key', [
    (dict(warmup_fraction=1.5), 'schedule.warmup_fraction=1.5'),
    (dict(decay_fraction=-0.5), 'schedule.decay_fraction=-0.5'),
    (dict(warmup_fraction=0.9), 'schedule.warmup_fraction=0.9'),   # 90% + 20% > the run
    (dict(warmup_steps=95), 'schedule.warmup_steps=95'),           # 95 + 20% of 100
])
def test_fraction_errors_name_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        spec_from_config(schedule_cfg(**cfg), 1e-3, 100)


@pytest.mark.parametrize('name', ['lm_tiny', 'ssm_tiny', 'var_tiny', 'var_tokenizer_tiny'])
@pytest.mark.parametrize('steps', [2, 5, 20, 100, 600])
def test_tiny_configs_accept_short_runs(name, steps):
    """The README examples at any small --config.train.steps (once: decay_steps=120 of 100)."""
    import importlib
    c = importlib.import_module(f'configs.{name}').get_config()
    spec = spec_from_config(c.schedule, c.optim.lr, steps)
    assert spec.total_steps == steps and spec.warmup_steps + spec.decay_steps <= steps


def test_readme_branching_schedules_are_compatible():
    """README: a 2000-step constant parent, a 1200-step child decaying over its last 200."""
    import importlib
    from pretrain import branching
    c = importlib.import_module('configs.lm_tiny').get_config()
    parent_cfg = schedule_cfg(**{**c.schedule.to_dict(), 'kind': 'constant', 'warmup_steps': 100})
    parent = spec_from_config(parent_cfg, c.optim.lr, 2000)
    child_cfg = schedule_cfg(**{**c.schedule.to_dict(), 'warmup_steps': 100, 'decay_steps': 200})
    child = spec_from_config(child_cfg, c.optim.lr, 1200)
    lineage = branching.check({'schedule': parent.to_dict()}, 'runs/constant', 1000, child, 1200)
    assert lineage == [{'run': 'runs/constant', 'step': 1000}]
    # lm_tiny keeps every checkpoint of the parent, so step 1000 is still there to branch from.
    ckpt = c.checkpoint
    assert ckpt.keep_every > 0 and 1000 % ckpt.keep_every == 0
    assert ckpt.keep_every % ckpt.every_steps == 0


def test_branch_with_a_derived_warmup_says_which_warmup_to_give():
    from pretrain import branching
    parent = spec_from_config(schedule_cfg(kind='constant'), 1e-3, 2000)     # warmup 200
    child = spec_from_config(schedule_cfg(decay_steps=200), 1e-3, 1200)     # warmup 120
    with pytest.raises(ConfigError, match='schedule.warmup_steps=200'):
        branching.check({'schedule': parent.to_dict()}, 'runs/constant', 1000, child, 1200)


@pytest.mark.parametrize('spec', [
    ScheduleSpec('wsd', peak=3e-3, warmup_steps=7, total_steps=50, decay_steps=11,
                 decay_shape='1-sqrt', min_lr_ratio=0.1),
    ScheduleSpec('cosine', peak=0.0123, warmup_steps=5, total_steps=40, min_lr_ratio=0.05),
    ScheduleSpec('linear', peak=1.7e-4, warmup_steps=0, total_steps=30),
])
def test_traced_lr_levels_give_the_constant_schedule_bit_for_bit(spec):
    from pretrain.schedules import peak_inputs
    steps = jnp.arange(spec.total_steps + 2)
    constant = jax.jit(lambda t: make_schedule(spec)(t))(steps)
    traced = jax.jit(lambda t, levels: make_schedule(spec, levels)(t))(steps, peak_inputs(spec))
    np.testing.assert_array_equal(np.asarray(constant), np.asarray(traced))
