"""The single setup, family-owned config sections, the trainer's import boundary, params-only
restore and throughput that leaves checkpoint time out."""

import ast
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_zoo
from pretrain import checkpoint as checkpoint_lib
from pretrain import config as config_lib
from pretrain import setup as setup_lib
from pretrain import train
from pretrain.errors import ConfigError
from pretrain.registry import Registry
from tests.helpers import leaves_by_path, tiny_config, with_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Entry points look the family registry up and hand it in; every other module of pretrain/ is
# the trainer's core, below model_zoo.
ENTRY_POINTS = ('pretrain/train.py', 'pretrain/sweep.py', 'pretrain/import_hf.py', 'pretrain/tpu_fit.py',
                'pretrain/var_official.py',
                'pretrain/study/')


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_pretrain_core_imports_nothing_from_model_zoo():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, 'pretrain')):
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), ROOT)
            if not name.endswith('.py') or path.startswith(ENTRY_POINTS):
                continue
            if any(m == 'model_zoo' or m.startswith('model_zoo.') for m in _imports(path)):
                offenders.append(path)
    assert offenders == []


def test_base_config_is_core_keys_plus_every_family_section():
    core, full = config_lib.core_config(), model_zoo.base_config()
    assert 'ssm' not in core.model and 'var' not in core.model
    assert full.model.ssm.to_dict() == model_zoo.mamba.default_config()['ssm']
    assert full.model.var.num_classes == 10
    with pytest.raises(AttributeError):   # still locked: a typo is an error
        full.model.ssm.d_stat = 3


def test_two_families_may_not_give_one_section_different_defaults():
    families = Registry('model.family')
    base = model_zoo.FAMILIES.get('transformer')
    families.register('a')(dataclasses.replace(base, default_config=lambda: {'x': {'k': 1}}))
    families.register('b')(dataclasses.replace(base, default_config=lambda: {'x': {'k': 2}}))
    with pytest.raises(ValueError, match="model.x is given different defaults by families 'a' and 'b'"):
        model_zoo.base_config(families)


def test_branch_from_format_is_checked_by_validate():
    c = config_lib.finalize(tiny_config())
    family = model_zoo.FAMILIES.get('transformer')
    config_lib.validate(c, family, num_devices=1)
    bad = config_lib.with_overrides(c, {'schedule.branch_from': 'runs/parent'})
    with pytest.raises(ConfigError, match='PARENT_WORKDIR@STEP'):
        config_lib.validate(bad, family, num_devices=1)


def test_batch_sharding_follows_the_family_data_kind():
    assert setup_lib.batch_axes(model_zoo.FAMILIES.get('transformer')) == ('act_batch', 'act_length')
    assert setup_lib.batch_axes(model_zoo.FAMILIES.get('var_tokenizer')) == ('act_batch',)


def test_runs_that_differ_only_in_lr_share_one_compiled_step():
    def lowered(lr, mode):
        c = tiny_config()
        c.optim.update(lr=lr, weight_decay_mode=mode)
        c.parametrization.name = 'mup'
        setup = setup_lib.build(c, jax.devices()[:1], families=model_zoo.FAMILIES)
        with setup.activate():
            return setup.train_step.lower(setup.restore_target(), setup.abstract_batch()).as_text()

    for mode in ('auto', 'coupled'):   # auto under muP: decay scaled by the (traced) peak
        assert lowered(3e-3, mode) == lowered(1.1e-2, mode)
    assert lowered(3e-3, 'auto') != lowered(3e-3, 'coupled')


def test_setup_hands_its_parametrization_to_the_optimizer():
    """Under muP at twice the base width a hidden matrix's first Adam step is half an embedding's."""
    c = with_mesh(tiny_config())
    c.parametrization.update(name='mup', base_width=c.model.d_model // 2)
    c.optim.update(weight_decay=0.0, grad_clip=0.0)
    setup = setup_lib.build(c, jax.devices()[:1], families=model_zoo.FAMILIES)
    assert setup.parametrization.width_mult == 2.0
    with setup.activate():
        state = setup.init_state()
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, _ = setup.optimizer.update(grads, setup.optimizer.init(state.params), state.params)
    hidden = float(updates['blocks'][0]['mlp']['w_up'].ravel()[0])
    embedding = float(updates['embed']['table'].ravel()[0])
    np.testing.assert_allclose(hidden / embedding, 0.5, rtol=1e-3)


def test_throughput_leaves_out_save_time_and_restore_params_reads_the_params(tmp_path, monkeypatch):
    pause_s = 2.0
    real_save = checkpoint_lib.Checkpointer.save

    def slow_save(self, *args, **kwargs):
        time.sleep(pause_s)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save', slow_save)
    c = with_mesh(tiny_config(steps=4, log_every=2))
    c.checkpoint.update(every_steps=1)   # a save after every step, logged every second step
    result = train.run(c, str(tmp_path), devices=jax.devices()[:1])
    assert [h['step'] for h in result['history']] == [2, 4]
    # Each log covers the one step after the previous save; a save's pause would dominate it.
    assert all(h['step_time_s'] < pause_s / 2 for h in result['history']), result['history']

    params, record, step = checkpoint_lib.restore_params(str(tmp_path))
    assert step == 4 and record['step'] == 4
    restored, trained = leaves_by_path(params), leaves_by_path(result['state'].params)
    assert restored.keys() == trained.keys()   # parameters only: no optimizer state
    for path, value in trained.items():
        np.testing.assert_array_equal(restored[path], value)
    with pytest.raises(ConfigError, match='no checkpoint at step 7'):
        checkpoint_lib.restore_params(str(tmp_path), step=7)
