"""Damaged checkpoints: each kind of damage is detected, moved aside, and an older step restored.

The checkpoints are a real tiny run's (steps 2, 4 and 6); every case damages a copy of them.
"""

import glob
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from model_zoo import FAMILIES
from pretrain import checkpoint as ckpt_lib
from pretrain import config as config_lib
from pretrain import data as data_lib
from pretrain import train
from pretrain.errors import CheckpointError, ConfigError
from tests.helpers import tiny_config

def _config():
    c = tiny_config(steps=6)
    c.checkpoint.update(every_steps=2, keep_last=5)
    return config_lib.finalize(c)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('run')
    train.run(_config(), str(workdir))
    return workdir / 'checkpoints'


@pytest.fixture(scope='module')
def reference(run_dir):
    """Abstract state (the saved structure, on this process's devices) and each step's arrays."""
    ckpt = ckpt_lib.Checkpointer(str(run_dir), _config().checkpoint, read_only=True)
    arrays = {}
    for step in ckpt.all_steps():
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))['state']
        arrays[step] = [np.asarray(x) for x in jax.tree.leaves(restored)]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            restored)
    ckpt.close()
    return abstract, arrays


def _data_iter():
    cfg = _config()
    pipeline = data_lib.make_pipeline(cfg, FAMILIES.get(cfg.model.family),
                                      global_batch_size=cfg.train.global_batch_size,
                                      num_eval_batches=0, seed=cfg.seed)
    return pipeline.train_iterator()


# --- the damage ---------------------------------------------------------------------------

def _array_files(step_dir: str) -> list[str]:
    return sorted(f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'),
                                       recursive=True) if os.path.isfile(f))


def _truncate_arrays(step_dir):
    for f in _array_files(step_dir):
        os.truncate(f, os.path.getsize(f) // 2)


def _zero_arrays(step_dir):
    for f in _array_files(step_dir):
        size = os.path.getsize(f)
        with open(f, 'wb') as out:
            out.write(bytes(size))


def _flip_array_bytes(step_dir):
    # One byte in the middle of each file: the raw array chunks are not checksummed by the
    # storage layer, so this restores without an error unless the record's checksums catch it.
    for f in _array_files(step_dir):
        data = bytearray(open(f, 'rb').read())
        data[len(data) // 2] ^= 0xFF
        open(f, 'wb').write(bytes(data))


def _arrays_of_step_4(step_dir):
    # Readable arrays that are not the ones saved with this record (a mixed-up copy): only the
    # checksums in the record can tell.
    shutil.rmtree(os.path.join(step_dir, 'state'))
    shutil.copytree(os.path.join(os.path.dirname(step_dir), '4', 'state'),
                    os.path.join(step_dir, 'state'))


def _empty_an_array_file(step_dir):
    os.truncate(max(_array_files(step_dir), key=os.path.getsize), 0)


def _delete_array_files(step_dir):
    for f in _array_files(step_dir):
        os.remove(f)


def _garble(relpath):
    def damage(step_dir):
        with open(os.path.join(step_dir, relpath), 'wb') as f:
            f.write(b'\x00\x9f{"step": 6, garbage')
    return damage


def _delete(relpath):
    def damage(step_dir):
        path = os.path.join(step_dir, relpath)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return damage


def _empty_step(step_dir):
    for entry in os.listdir(step_dir):
        _delete(entry)(step_dir)


DATA_STATE = 'data/process_0-of-1.json'
ARRAY_SLUGS = {'unreadable', 'checksum-mismatch'}   # which one depends on the bytes hit

DAMAGE_CASES = {
    # name: (damage, slugs the step may be moved aside under, words the log line must name)
    'array files truncated': (_truncate_arrays, ARRAY_SLUGS, ''),
    'array files zeroed': (_zero_arrays, ARRAY_SLUGS, ''),
    'array bytes flipped': (_flip_array_bytes, ARRAY_SLUGS, ''),
    'arrays of another step': (_arrays_of_step_4, {'checksum-mismatch'}, 'saved checksums'),
    'an array file emptied': (_empty_an_array_file, {'array-file-empty'}, 'is empty'),
    'array files deleted': (_delete_array_files, {'unreadable'}, 'reading it failed'),
    'state/_METADATA deleted': (_delete('state/_METADATA'), {'state-metadata-missing'},
                                'state/_METADATA'),
    'state/_METADATA garbled': (_garble('state/_METADATA'), {'state-metadata-garbled'},
                                'state/_METADATA'),
    'array manifest deleted': (_delete('state/manifest.ocdbt'), {'unreadable'}, 'reading it failed'),
    'state folder deleted': (_delete('state'), {'state-missing'}, 'state/'),
    'record deleted': (_delete('meta/metadata'), {'record-missing'}, 'record'),
    'record garbled': (_garble('meta/metadata'), {'record-garbled'}, 'record'),
    'data-iterator state deleted': (_delete(DATA_STATE), {'data-missing'}, 'data-iterator'),
    'data-iterator state garbled': (_garble(DATA_STATE), {'data-garbled'}, 'data-iterator'),
    'step folder emptied': (_empty_step, {'empty'}, 'empty'),
}


def _copy(run_dir, tmp_path) -> str:
    target = str(tmp_path / 'checkpoints')
    shutil.copytree(run_dir, target)
    return target


def _equal(state, arrays) -> bool:
    return all(np.array_equal(np.asarray(x), y) for x, y in zip(jax.tree.leaves(state), arrays))


@pytest.mark.parametrize('case', list(DAMAGE_CASES))
def test_damaged_latest_is_moved_aside_and_the_previous_step_restored(case, run_dir, reference,
                                                                      tmp_path):
    damage, slugs, words = DAMAGE_CASES[case]
    abstract, arrays = reference
    directory = _copy(run_dir, tmp_path)
    damage(os.path.join(directory, '6'))
    files_before = sorted(os.path.relpath(f, os.path.join(directory, '6'))
                          for f in glob.glob(os.path.join(directory, '6', '**'), recursive=True))
    ckpt = ckpt_lib.Checkpointer(directory, _config().checkpoint)
    lines = []
    data_iter = _data_iter()
    restored = ckpt.restore_latest(abstract, data_iter, log=lines.append)
    ckpt.close()

    assert restored.step == 4 and restored.record['step'] == 4
    assert _equal(restored.state, arrays[4])
    assert data_iter.get_state()['next_index'] == 4   # the iterator of step 4, too
    assert len(lines) == 1, lines
    assert lines[0].startswith(f'checkpoint step 6 in {directory} is damaged (')
    assert words in lines[0] and 'trying step 4' in lines[0]
    moved = [m for m in os.listdir(os.path.join(directory, ckpt_lib.DAMAGED_DIR))]
    assert len(moved) == 1 and moved[0].split('.', 1)[1] in slugs, moved
    moved_path = os.path.join(directory, ckpt_lib.DAMAGED_DIR, moved[0])
    assert f'moved to {moved_path}' in lines[0]
    files_after = sorted(os.path.relpath(f, moved_path)
                         for f in glob.glob(os.path.join(moved_path, '**'), recursive=True))
    assert files_after == files_before   # moved, nothing deleted
    assert sorted(e for e in os.listdir(directory) if e.isdigit()) == ['2', '4']
    # A later manager does not see the moved step, and saving goes on beside it.
    again = ckpt_lib.Checkpointer(directory, _config().checkpoint)
    assert again.all_steps() == [2, 4]
    again.close()


def test_an_intact_latest_restores_without_a_line(run_dir, reference, tmp_path):
    abstract, arrays = reference
    ckpt = ckpt_lib.Checkpointer(_copy(run_dir, tmp_path), _config().checkpoint)
    lines = []
    restored = ckpt.restore_latest(abstract, _data_iter(), log=lines.append)
    assert restored.step == 6 and _equal(restored.state, arrays[6]) and lines == []
    assert ckpt.verify(6) is None and ckpt.verify(2) is None


def test_two_damaged_steps_fall_back_twice(run_dir, reference, tmp_path):
    abstract, arrays = reference
    directory = _copy(run_dir, tmp_path)
    _empty_step(os.path.join(directory, '6'))
    # step 2's arrays under step 4's record
    shutil.rmtree(os.path.join(directory, '4', 'state'))
    shutil.copytree(os.path.join(directory, '2', 'state'), os.path.join(directory, '4', 'state'))
    ckpt = ckpt_lib.Checkpointer(directory, _config().checkpoint)
    lines = []
    restored = ckpt.restore_latest(abstract, _data_iter(), log=lines.append)
    assert restored.step == 2 and _equal(restored.state, arrays[2])
    assert [line.split(' in ')[0] for line in lines] == ['checkpoint step 6', 'checkpoint step 4']
    assert sorted(os.listdir(os.path.join(directory, ckpt_lib.DAMAGED_DIR))) == [
        '4.checksum-mismatch', '6.empty']


def test_every_step_damaged_fails_naming_the_folder(run_dir, reference, tmp_path):
    abstract, _ = reference
    directory = _copy(run_dir, tmp_path)
    for step in ('2', '4', '6'):
        _garble('meta/metadata')(os.path.join(directory, step))
    ckpt = ckpt_lib.Checkpointer(directory, _config().checkpoint)
    lines = []
    with pytest.raises(CheckpointError, match=f'no intact checkpoint in {directory}:') as err:
        ckpt.restore_latest(abstract, _data_iter(), log=lines.append)
    assert '\n' not in str(err.value) and len(lines) == 3
    assert 'no older checkpoint' in lines[-1]
    assert len(os.listdir(os.path.join(directory, ckpt_lib.DAMAGED_DIR))) == 3


def test_no_checkpoint_returns_none_and_a_config_check_is_not_damage(run_dir, reference, tmp_path):
    abstract, _ = reference
    empty = ckpt_lib.Checkpointer(str(tmp_path / 'none'), _config().checkpoint)
    assert empty.restore_latest(abstract, _data_iter()) is None

    def refuse(record, step):
        raise ConfigError(f'shape differs at step {step}')

    directory = _copy(run_dir, tmp_path)
    ckpt = ckpt_lib.Checkpointer(directory, _config().checkpoint)
    with pytest.raises(ConfigError, match='step 6'):
        ckpt.restore_latest(abstract, _data_iter(), check_record=refuse)
    assert not os.path.exists(os.path.join(directory, ckpt_lib.DAMAGED_DIR))


def test_same_step_damaged_twice_keeps_both_copies(run_dir, reference, tmp_path):
    directory = _copy(run_dir, tmp_path)
    ckpt = ckpt_lib.Checkpointer(directory, _config().checkpoint)
    first = ckpt.move_aside(6, ckpt_lib.Damage('empty', 'its folder is empty'))
    shutil.copytree(os.path.join(run_dir, '6'), os.path.join(directory, '6'))
    ckpt.manager.reload()
    second = ckpt.move_aside(6, ckpt_lib.Damage('empty', 'its folder is empty'))
    assert first != second and os.path.isdir(first) and os.path.isdir(second)


def test_checksums_name_leaves_independently_of_containers():
    import jax.numpy as jnp
    a = {'params': {'w': jnp.arange(6.0).reshape(2, 3)}, 'step': jnp.int32(3)}
    sums = ckpt_lib.state_checksums(a)
    assert set(sums) == {'params/w', 'step'}
    b = {'params': {'w': jnp.arange(6.0).reshape(2, 3).at[1, 2].set(5.000001)}, 'step': jnp.int32(3)}
    assert ckpt_lib.state_checksums(b)['params/w'] != sums['params/w']
    assert ckpt_lib.state_checksums({'params': [jnp.ones(3, jnp.bfloat16)], 'step': jnp.int8(1)})


# --- read-only or unusable workdir ----------------------------------------------------------

def test_check_writable(tmp_path):
    ckpt_lib.check_writable(str(tmp_path / 'new' / 'run'))   # created later under tmp_path
    ckpt_lib.check_writable(str(tmp_path))
    file = tmp_path / 'file'
    file.write_text('x')
    with pytest.raises(ConfigError, match='is a file'):
        ckpt_lib.check_writable(str(file))
    with pytest.raises(ConfigError, match='cannot be created'):
        ckpt_lib.check_writable(str(file / 'run'))


def test_read_only_workdir_fails_in_one_line(tmp_path):
    if os.geteuid() != 0:
        workdir = tmp_path / 'run'
        (workdir / 'checkpoints').mkdir(parents=True)
        os.chmod(workdir, 0o555)
        where = str(workdir)
    else:   # root ignores permission bits; sysfs refuses new files even to root
        workdir = '/sys/pretrain-run'
        where = '/sys'
    try:
        with pytest.raises(ConfigError) as err:
            ckpt_lib.check_writable(str(workdir))
    finally:
        if os.geteuid() != 0:
            os.chmod(workdir, 0o755)
    message = str(err.value)
    assert message.startswith(f'--workdir={workdir} is not writable ({where}: ') and '\n' not in message
    if os.geteuid() != 0:
        assert os.listdir(workdir) == ['checkpoints']


def test_latest_verified_reads_only_records_and_sets_aside_visible_damage(run_dir, tmp_path):
    directory = _copy(run_dir, tmp_path)
    _garble(DATA_STATE)(os.path.join(directory, '6'))
    _zero_arrays(os.path.join(directory, '4'))   # not visible without reading arrays
    ckpt = ckpt_lib.Checkpointer(directory, _config().checkpoint)
    lines = []
    step, record = ckpt.latest_verified(log=lines.append)
    assert (step, record['step']) == (4, 4) and len(lines) == 1 and 'step 6' in lines[0]
    assert ckpt.all_steps() == [2, 4]


def test_the_trainer_resumes_past_a_damaged_latest_step_and_logs_each_step_once(tmp_path):
    """Through train.run: the newest checkpoint is truncated after the run ended; a longer run on
    the same workdir moves it aside, resumes from the step before and logs every (split, step)
    once, as an uninterrupted run does."""
    from pretrain.metrics import read_metrics

    def config(steps):
        c = tiny_config(steps=steps)
        c.train.update(eval_every=2, eval_batches=1, log_every=1)
        c.checkpoint.update(every_steps=2, keep_last=5)
        c.schedule.total_steps = 8   # the same schedule in both parts, so the resume is allowed
        return config_lib.finalize(c)

    workdir = tmp_path / 'run'
    train.run(config(6), str(workdir))
    _truncate_arrays(str(workdir / 'checkpoints' / '6'))
    out = train.run(config(8), str(workdir))
    assert out['step'] == 8 and not out['preempted']
    assert os.listdir(workdir / 'checkpoints' / 'damaged')   # moved aside, not deleted
    rows = [(r.get('split', 'train'), r['step']) for r in read_metrics(str(workdir / 'metrics.jsonl'))
            if 'step' in r and 'loss' in r]
    assert len(rows) == len(set(rows))
    assert sorted(s for split, s in rows if split == 'eval') == [2, 4, 6, 8]
    assert sorted(s for split, s in rows if split == 'train') == list(range(1, 9))
