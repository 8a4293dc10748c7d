"""Cooldowns branched from a constant-LR checkpoint: exact, checked, and recorded."""

import os

import pytest

from pretrain import checkpoint as ckpt_lib
from pretrain import train
from pretrain.errors import ConfigError
from tests.helpers import losses, tiny_config


def _wsd(steps=5, decay=3, **schedule):
    c = tiny_config(steps=steps)
    c.checkpoint.update(every_steps=2)
    c.schedule.update(**{'kind': 'wsd', 'warmup_steps': 1, 'decay_steps': decay, **schedule})
    return c


@pytest.fixture(scope='module')
def parent(tmp_path_factory):
    """A constant-LR run with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp('constant'))
    c = tiny_config(steps=4)
    c.checkpoint.update(every_steps=2)
    c.schedule.update(kind='constant', warmup_steps=1)
    return workdir, train.run(c, workdir)


def test_branched_cooldown_equals_a_wsd_run_bit_for_bit(parent, tmp_path):
    parent_dir, parent_result = parent
    scratch = train.run(_wsd(), str(tmp_path / 'scratch'))        # decays from step 2 of 5
    child_cfg = _wsd(branch_from=f'{parent_dir}@2')
    child = train.run(child_cfg, str(tmp_path / 'child'))
    assert [h['step'] for h in child['history']] == [3, 4, 5]
    assert losses(parent_result)[:2] + losses(child) == losses(scratch)
    # The LR up to the branch is the parent's; afterwards the cooldown's.
    lrs = lambda r: [h['lr'] for h in r['history']]  # noqa: E731
    assert lrs(parent_result)[:2] == lrs(scratch)[:2]
    assert lrs(child) == lrs(scratch)[2:]
    record = ckpt_lib.Checkpointer(str(tmp_path / 'child' / 'checkpoints'), child_cfg.checkpoint,
                                   read_only=True).read_record(5)
    assert record['lineage'] == [{'run': os.path.abspath(parent_dir), 'step': 2}]


def test_a_branch_resumes_from_its_own_checkpoints(parent, tmp_path):
    parent_dir, _ = parent
    straight = train.run(_wsd(steps=6, decay=4, branch_from=f'{parent_dir}@2'), str(tmp_path / 'a'))
    c = _wsd(steps=4, decay=4, branch_from=f'{parent_dir}@2', total_steps=6)
    first = train.run(c, str(tmp_path / 'b'))
    second = train.run(_wsd(steps=6, decay=4, branch_from=f'{parent_dir}@2'), str(tmp_path / 'b'))
    assert losses(first) + losses(second) == losses(straight)


def test_parent_checkpoints_are_untouched(parent, tmp_path):
    parent_dir, _ = parent
    before = sorted(os.listdir(os.path.join(parent_dir, 'checkpoints')))
    train.run(_wsd(branch_from=f'{parent_dir}@4', steps=6, decay=2), str(tmp_path / 'c'))
    assert sorted(os.listdir(os.path.join(parent_dir, 'checkpoints'))) == before


@pytest.mark.parametrize('change, message', [
    (dict(branch_from='nowhere'), 'PARENT_WORKDIR@STEP'),
    (dict(branch_from='{parent}@3'), r'no checkpoint at step 3; .* has steps \[2, 4\]'),
    (dict(branch_from='/nonexistent/run@2'), 'does not exist'),
    (dict(branch_from='{parent}@2', warmup_steps=2), 'gives lr'),
])
def test_bad_branches_fail_before_compute(parent, change, message, tmp_path):
    parent_dir, _ = parent
    change = {k: v.format(parent=parent_dir) if isinstance(v, str) else v for k, v in change.items()}
    with pytest.raises(ConfigError, match=message):
        train.run(_wsd(**change), str(tmp_path))
    assert not os.path.exists(tmp_path / 'checkpoints')


def test_cannot_branch_from_a_decaying_parent(tmp_path):
    c = _wsd(steps=5, decay=3)
    train.run(c, str(tmp_path / 'wsd'))
    with pytest.raises(ConfigError, match='not in its stable phase at step 4'):
        train.run(_wsd(steps=6, decay=2, branch_from=f'{tmp_path / "wsd"}@4'), str(tmp_path / 'x'))
