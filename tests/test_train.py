"""End-to-end trainer checks: sharding equivalence, exact resume, bad input, the README command."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pretrain import checkpoint as checkpoint_lib
from pretrain import loop as loop_lib
from pretrain import start as start_lib
from pretrain import train
from pretrain.errors import ConfigError
from tests.helpers import leaves_by_path, losses, tiny_config, with_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def single_device_losses(tmp_path_factory):
    c = with_mesh(tiny_config(steps=4))
    return losses(train.run(c, str(tmp_path_factory.mktemp('one')), devices=jax.devices()[:1]))


@pytest.mark.parametrize('layout', [dict(data=8), dict(fsdp=4, tensor=2),
                                    dict(data=2, fsdp=2, tensor=2)])
def test_sharded_training_matches_one_device(layout, single_device_losses, tmp_path):
    sharded = losses(train.run(with_mesh(tiny_config(steps=4), **layout), str(tmp_path)))
    np.testing.assert_allclose(sharded, single_device_losses, rtol=2e-5, atol=2e-5)


def test_sequence_axis_and_grad_accumulation_match(single_device_losses, tmp_path):
    c = with_mesh(tiny_config(steps=4, grad_accum_steps=2), data=2, sequence=2, tensor=2)
    np.testing.assert_allclose(losses(train.run(c, str(tmp_path))), single_device_losses,
                               rtol=2e-5, atol=2e-5)


def test_exact_resume_is_bit_identical(tmp_path):
    def cfg(steps):
        c = tiny_config(steps=steps)
        c.schedule.total_steps = 6   # absolute: the schedule does not depend on where we stop
        return c

    straight = losses(train.run(cfg(6), str(tmp_path / 'straight')))
    first = train.run(cfg(3), str(tmp_path / 'resumed'))
    second = train.run(cfg(6), str(tmp_path / 'resumed'))
    assert [h['step'] for h in second['history']] == [4, 5, 6]
    assert losses(first) + losses(second) == straight   # bit for bit
    # The final checkpoints' params (re-running a finished run restores nothing).
    a, b = (leaves_by_path(checkpoint_lib.restore_params(str(tmp_path / d))[0])
            for d in ('straight', 'resumed'))
    assert a.keys() == b.keys()
    for path, value in a.items():
        np.testing.assert_array_equal(value, b[path])


def _snapshot(directory):
    return sorted((os.path.relpath(os.path.join(r, f), directory), os.path.getmtime(os.path.join(r, f)))
                  for r, _, files in os.walk(directory) for f in files)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('trained'))
    train.run(tiny_config(steps=3), workdir)
    return workdir


@pytest.mark.parametrize('change, message', [
    (lambda c: c.mesh.ici.update(data=3), 'mesh.ici'),
    (lambda c: c.mesh.ici.update(data=2, tensor=2, fsdp=4), '16'),
    (lambda c: c.train.update(global_batch_size=10), 'global_batch_size=10'),
    (lambda c: c.model.update(n_heads=3, n_kv_heads=3, d_model=48), 'tensor'),
    (lambda c: (c.mesh.ici.update(sequence=2), c.data.update(seq_len=31)), 'data.seq_len=31'),
    (lambda c: c.model.update(d_model=64), 'different shape'),
    (lambda c: c.data.update(tokenizer='sentencepiece', tokenizer_path='/nonexistent/sp.model'),
     '/nonexistent/sp.model'),
    (lambda c: c.data.update(source='text_files', text_dir='EMPTY'), 'data.text_dir'),
    (lambda c: c.model.update(family='transformr'), "Did you mean 'transformer'"),
    (lambda c: c.schedule.update(decay_steps=50), 'schedule.decay_steps'),
])
def test_bad_input_fails_fast_and_keeps_checkpoints(change, message, trained_workdir, tmp_path):
    c = tiny_config(steps=3)
    c.mesh.ici.update(data=2, tensor=2, fsdp=-1)
    change(c)
    if c.data.text_dir == 'EMPTY':
        c.data.text_dir = str(tmp_path)
    before = _snapshot(trained_workdir)
    with pytest.raises(ConfigError, match=message):
        train.run(c, trained_workdir)
    assert _snapshot(trained_workdir) == before


def test_rerunning_a_finished_run_says_so_and_touches_nothing(trained_workdir, capsys, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError('a finished run must not compile or restore')

    monkeypatch.setattr(loop_lib.TrainLoop, 'compile', no_compile)
    monkeypatch.setattr(start_lib.Start, 'state', no_compile)
    before = _snapshot(trained_workdir)
    capsys.readouterr()
    result = train.run(tiny_config(steps=3), trained_workdir)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    assert trained_workdir in lines[0] and 'already finished' in lines[0] and 'step 3' in lines[0]
    assert 'allow_resume_change' in lines[0] and 'new --workdir' in lines[0]
    assert result['already_finished'] and result['step'] == 3 and result['history'] == []
    assert _snapshot(trained_workdir) == before


def test_unknown_key_is_an_error_with_a_suggestion():
    c = tiny_config()
    with pytest.raises(AttributeError, match='Did you mean "steps"'):
        c.train.stepz = 3


def _cli(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    return subprocess.run([sys.executable, '-m', 'pretrain.train', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_rejects_an_unknown_override_before_compute(tmp_path):
    out = _cli('--config=configs/lm_tiny.py', f'--workdir={tmp_path}', '--config.train.stepz=5')
    assert out.returncode != 0
    assert 'stepz' in out.stderr
    assert not os.listdir(tmp_path)


def test_readme_train_command_runs(tmp_path):
    """The README's quick-start command at a reduced step count: loss falls, files appear."""
    readme = open(os.path.join(ROOT, 'README.md')).read()
    assert 'python -m pretrain.train --config=configs/lm_tiny.py' in readme
    out = _cli('--config=configs/lm_tiny.py', f'--workdir={tmp_path}', '--config.train.steps=40',
               '--config.train.log_every=5', '--config.train.eval_every=40',
               '--config.schedule.warmup_steps=5', '--config.schedule.decay_steps=10',
               '--config.data.max_files=300', '--config.checkpoint.every_steps=20')
    assert out.returncode == 0, out.stderr[-3000:]
    from pretrain.metrics import read_metrics
    rows = [r for r in read_metrics(str(tmp_path / 'metrics.jsonl')) if r['split'] == 'train']
    assert rows[-1]['step'] == 40 and rows[-1]['loss'] < rows[0]['loss'] - 1.0
    assert {'lr', 'grad_norm', 'tokens', 'tokens_per_s', 'mfu'} <= set(rows[-1])
    assert any(r['split'] == 'eval' and 'bits_per_byte' in r
               for r in read_metrics(str(tmp_path / 'metrics.jsonl')))
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['20', '40']
    assert os.path.exists(tmp_path / 'config.json') and os.listdir(tmp_path / 'tb')
    assert 'compiled the train step' in out.stderr
    # The console line is short: no absl prefix, no per-group LRs (all equal under SP).
    last = [line for line in out.stderr.splitlines() if line.startswith('step 40/40 ')]
    assert len(last) == 1 and len(last[0]) < 120, out.stderr[-2000:]
    assert ' tok/s | mfu ' in last[0] and '| eta 0s | elapsed ' in last[0] and 'lr/' not in last[0]


def test_checkpoint_retention_keeps_last_n_and_every_kth(tmp_path):
    c = tiny_config(steps=7)
    c.checkpoint.update(every_steps=1, keep_last=2, keep_every=3, async_save=True)
    train.run(c, str(tmp_path))
    assert sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints')) == [3, 6, 7]


def test_scaling_rule_is_applied_before_the_run_and_recorded(tmp_path):
    import json
    c = tiny_config(steps=3)                      # global batch 8 sequences
    c.optim.lr = 0.123                            # replaced by the rule
    c.schedule.update(kind='constant', warmup_steps=0)
    c.scaling.update(rule='sqrt_adam', ref_global_batch_size=2, ref_lr=1e-3, ref_b1=0.9,
                     ref_b2=0.99, ref_eps=1e-8)
    result = train.run(c, str(tmp_path))
    k = 4.0                                       # 8 / 2 sequences of the same length
    assert result['history'][-1]['lr'] == pytest.approx(1e-3 * k ** 0.5, rel=1e-6)
    saved = json.load(open(tmp_path / 'config.json'))
    assert saved['optim']['lr'] == pytest.approx(2e-3)
    assert saved['optim']['b2'] == pytest.approx(1 - 0.01 * k)
    assert saved['optim']['eps'] == pytest.approx(1e-8 / 2)
    assert 'sqrt_adam' in saved['scaling_applied']['explanation']


def test_dry_run_checks_a_layout_for_more_devices_than_present(tmp_path):
    tiny = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.n_layers=1',
            '--config.data.seq_len=32', '--config.train.global_batch_size=16']
    out = _cli('--config=configs/lm_tiny.py', '--dry_run', '--dry_run_devices=32', *tiny,
               '--config.mesh.ici.data=4', '--config.mesh.ici.fsdp=4', '--config.mesh.ici.tensor=2')
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'data': 4, 'fsdp': 4, 'tensor': 2" in out.stdout and 'memory per device' in out.stdout
    out = _cli('--config=configs/lm_tiny.py', '--dry_run', '--dry_run_devices=32', *tiny,
               '--config.mesh.ici.data=3')
    assert out.returncode != 0 and 'but there are 32 devices' in out.stderr
