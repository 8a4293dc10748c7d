"""Fault tolerance: kills and restarts, preemption, non-finite steps, timed saves, dry run."""

import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm_tiny
from pretrain import checkpoint as ckpt_lib
from pretrain import config as config_lib
from pretrain import preemption, train
from pretrain import step as step_lib
from pretrain.errors import ConfigError, NonFiniteError
from pretrain.metrics import read_metrics
from pretrain.study.reuse import flatten
from tests.helpers import leaves_by_path, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_MARK = '.orbax-checkpoint-tmp'


# --- a real training process ----------------------------------------------------------------

def _cli_overrides(cfg) -> list[str]:
    """--config.* flags that turn configs/lm_tiny.py into `cfg`."""
    base = flatten(lm_tiny.get_config().to_dict())
    return [f'--config.{k}={v}' for k, v in flatten(cfg.to_dict()).items() if base[k] != v]


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
               XLA_FLAGS='--xla_force_host_platform_device_count=8',
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, '.jax_cache'),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    return env


def _start(cfg, workdir, log_path, *extra) -> subprocess.Popen:
    args = [sys.executable, '-m', 'pretrain.train', '--config=configs/lm_tiny.py',
            f'--workdir={workdir}', *_cli_overrides(cfg), *extra]
    with open(log_path, 'w') as log:
        return subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _train_records(workdir) -> list[dict]:
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    return [r for r in read_metrics(path) if r['split'] == 'train']


def _wait_until(proc, condition, timeout=120.0, poll=0.002) -> bool:
    """Polls `condition` until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError('the training process did not get there in time')


def _ckpt_entries(workdir) -> list[str]:
    d = os.path.join(workdir, 'checkpoints')
    return os.listdir(d) if os.path.isdir(d) else []


def _committed(workdir) -> list[int]:
    return sorted(int(e) for e in _ckpt_entries(workdir) if e.isdigit())


def _kill_cfg(steps: int, optim: dict | None = None):
    c = tiny_config(steps=steps)
    c.checkpoint.update(every_steps=1, keep_last=2, async_save=True)
    if optim:
        c = config_lib.with_overrides(c, {f'optim.{k}': v for k, v in optim.items()})
    return c


def _kill_and_resume(tmp_path, steps: int, moments: list[str], seed: int,
                     optim: dict | None = None) -> None:
    """Kills a real run with SIGKILL at `moments` ('save' or 'random'), restarting each time;
    every logged loss and the final params must equal those of an uninterrupted run. `optim`:
    optim.* overrides (e.g. another optimizer)."""
    rng = random.Random(seed)
    straight = train.run(_kill_cfg(steps, optim), str(tmp_path / 'straight'))
    expected = {h['step']: h['loss'] for h in straight['history']}
    workdir = tmp_path / 'killed'
    killed_mid_save = 0
    for i, moment in enumerate(moments + ['finish']):
        start_records = len(_train_records(workdir))
        committed = _committed(workdir)
        before = set(_ckpt_entries(workdir))   # a leftover of the last kill is not a new save

        def new_tmp() -> bool:
            return any(TMP_MARK in e and e not in before for e in _ckpt_entries(workdir))

        proc = _start(_kill_cfg(steps, optim), workdir, tmp_path / f'segment{i}.log')
        try:
            if moment == 'save':    # the moment a half-written checkpoint directory appears
                reached = _wait_until(proc, new_tmp)
            elif moment == 'random':
                n = rng.randint(1, 4)
                reached = _wait_until(proc, lambda: len(_train_records(workdir)) >= start_records + n)
            else:
                reached = False
                assert proc.wait(timeout=300) == 0, (tmp_path / f'segment{i}.log').read_text()[-3000:]
            if reached:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            _stop(proc)
        log = (tmp_path / f'segment{i}.log').read_text()
        if committed and committed[-1] == steps:   # the kill came after the final save
            assert 'is already finished' in log, log[-3000:]
        elif committed:   # a restart resumes from the last complete checkpoint
            assert f'resumed from step {committed[-1]} ' in log, log[-3000:]
        assert reached or moment == 'finish', f'run ended before the {moment} kill'
        killed_mid_save += new_tmp()
    if 'save' in moments:
        assert killed_mid_save, 'no kill landed while a checkpoint was being written'
    assert not any(TMP_MARK in e for e in _ckpt_entries(workdir))   # cleaned on restart
    records = _train_records(workdir)
    assert {r['step'] for r in records} == set(expected)
    for r in records:   # every segment, including re-done steps, reproduces the losses bit for bit
        assert r['loss'] == expected[r['step']], r
    final, _, final_step = ckpt_lib.restore_params(str(workdir))
    assert final_step == steps
    expected_params = leaves_by_path(straight['state'].params)
    assert leaves_by_path(final).keys() == expected_params.keys()
    for path, value in leaves_by_path(final).items():
        np.testing.assert_array_equal(value, expected_params[path])


def test_sigkill_during_save_and_at_random_moments_resumes_bit_identical(tmp_path):
    _kill_and_resume(tmp_path, steps=14, moments=['random', 'save'], seed=0)


@pytest.mark.slow
def test_many_sigkills_resume_bit_identical(tmp_path):
    _kill_and_resume(tmp_path, steps=30, moments=['save', 'random', 'save', 'random', 'random'],
                     seed=1)


def test_sigterm_saves_the_current_step_and_exits_75(tmp_path):
    c = tiny_config(steps=500)
    c.checkpoint.every_steps = 1000   # no periodic save: the one we find is the preemption's
    proc = _start(c, tmp_path, tmp_path / 'log')
    try:
        assert _wait_until(proc, lambda: len(_train_records(tmp_path)) >= 3, poll=0.01)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        _stop(proc)
    log = (tmp_path / 'log').read_text()
    assert rc == preemption.EXIT_PREEMPTED == 75, log[-3000:]
    last = _train_records(tmp_path)[-1]['step']
    assert 3 <= last < 500
    ckpt_dir = os.path.join(tmp_path, 'checkpoints')
    assert f'preempted at step {last}: checkpoint saved to {ckpt_dir}{os.sep}{last}' in log
    assert _ckpt_entries(tmp_path) == [str(last)]


def test_sigint_in_process_returns_preempted_and_restores_handlers(tmp_path, monkeypatch):
    sent = []
    write = train.metrics_lib.MetricsWriter.write

    def write_then_interrupt(self, step, metrics, split='train'):
        write(self, step, metrics, split)
        if step == 2 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)   # arrives after step 2's stop check

    monkeypatch.setattr(train.metrics_lib.MetricsWriter, 'write', write_then_interrupt)
    handler = signal.getsignal(signal.SIGINT)
    result = train.run(tiny_config(steps=6), str(tmp_path))
    assert result['preempted'] and result['step'] == 3
    assert 3 in ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), tiny_config().checkpoint).all_steps()
    assert signal.getsignal(signal.SIGINT) is handler


# --- several processes agree on the stop step -----------------------------------------------

_WORKER = '''
import sys, time
import jax
from pretrain import preemption
pid, port, ready, service = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == '1'
jax.config.update('jax_enable_preemption_service', service)
jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                           process_id=pid)
agree_s, agreements = 0.0, 0
with preemption.Watcher() as w:
    open(f'{ready}{pid}', 'w').close()
    for step in range(1, 3000):
        time.sleep(0.01 * (1 + pid))   # uneven speeds: the processes are at different steps
        stop = w.should_stop(step)
        if step % 5 == 0 and w.needs_agreement:   # as the trainer does at log steps
            start = time.perf_counter()
            stop, _ = preemption.agree(stop or w.local_flag, False)
            agree_s, agreements = agree_s + time.perf_counter() - start, agreements + 1
        if stop:
            break
print(f'STOP {step} {w.signal_name} agree_ms {1e3 * agree_s / max(agreements, 1):.2f}', flush=True)
jax.distributed.shutdown()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('sig, target, service', [
    (signal.SIGTERM, 1, True),    # JAX's preemption sync manager
    (signal.SIGINT, 0, True),     # SIGINT re-sent as SIGTERM into the same protocol
    (signal.SIGTERM, 0, False),   # preemption service off: local flags OR-ed by `agree`
])
def test_processes_stop_at_the_same_step(sig, target, service, tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(_WORKER)
    port, ready = _free_port(), str(tmp_path / 'ready')
    env = dict(_env(), XLA_FLAGS='')
    procs = [subprocess.Popen([sys.executable, str(script), str(p), str(port), ready, str(int(service))],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for p in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all(os.path.exists(f'{ready}{p}') for p in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        time.sleep(0.5)
        procs[target].send_signal(sig)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            _stop(p)
    stops = [next(line.split() for line in out.splitlines() if line.startswith('STOP'))
             for out in outs]
    assert stops[0][1] == stops[1][1], outs
    assert all(p.returncode == 0 for p in procs)


# --- non-finite loss or gradients ---------------------------------------------------------

def _poison(monkeypatch, bad_step: int) -> None:
    """Makes the loss, and so every gradient, NaN at logged step `bad_step` (update bad_step-1)."""
    original = step_lib.make_train_step

    def patched(loss_fn, *args, **kwargs):
        current = {}

        def loss(model, batch):
            value, metrics = loss_fn(model, batch)
            value = value * jnp.where(current['step'] == bad_step - 1, jnp.nan, 1.0)
            return value, dict(metrics, loss=value)

        inner = original(loss, *args, **kwargs)

        def train_step(state, batch):
            current['step'] = state.step   # a tracer of the same trace as the loss
            return inner(state, batch)

        return train_step

    monkeypatch.setattr(step_lib, 'make_train_step', patched)


def test_nonfinite_skip_keeps_params_and_counts(tmp_path, monkeypatch):
    _poison(monkeypatch, bad_step=3)
    c = tiny_config(steps=5, nonfinite_policy='skip', grad_accum_steps=2)
    c.mesh.ici.update(data=4, tensor=2)   # 4 sequences per micro-batch over data=4
    result = train.run(c, str(tmp_path))
    h = {r['step']: r for r in result['history']}
    assert np.isnan(h[3]['loss']) and all(np.isfinite(h[s]['loss']) for s in (1, 2, 4, 5))
    assert h[3]['param_norm'] == h[2]['param_norm']    # the update was not applied
    assert [h[s]['skipped'] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert result['skipped'] == 1 and result['step'] == 5
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result['state'].params))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), c.checkpoint)
    assert ckpt.read_record(5)['skipped_steps'] == 1


def test_nonfinite_stop_names_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    # Step 5 is evaluated but neither logged nor saved: under 'stop' the step does not roll
    # its state back, so the flag must be read before the evaluation too.
    _poison(monkeypatch, bad_step=5)
    c = tiny_config(steps=6, nonfinite_policy='stop', log_every=2, eval_every=5)
    c.checkpoint.update(every_steps=2, async_save=True)
    with pytest.raises(NonFiniteError, match='at step 5') as err:
        train.run(c, str(tmp_path))
    ckpt_dir = tmp_path / 'checkpoints'
    assert err.value.step == 5 and err.value.checkpoint == str(ckpt_dir / '4')
    assert f'Last good checkpoint: {ckpt_dir / "4"} (step 4)' in str(err.value)
    assert sorted(os.listdir(ckpt_dir)) == ['2', '4']   # the bad state was not saved
    rows = read_metrics(str(tmp_path / 'metrics.jsonl'))
    assert [(r['split'], r['step']) for r in rows] == [('train', 2), ('train', 4)]
    assert not isinstance(err.value, ConfigError)


def test_nonfinite_policy_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="train.nonfinite_policy='skp'.*Did you mean 'skip'"):
        train.run(tiny_config(nonfinite_policy='skp'), str(tmp_path))


# --- time-based checkpoints ---------------------------------------------------------------

def test_time_based_checkpoints_at_log_steps(tmp_path):
    c = tiny_config(steps=6, log_every=2)
    c.checkpoint.update(every_steps=100, every_minutes=1e-9)   # always due when checked
    train.run(c, str(tmp_path))
    assert sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints')) == [2, 4, 6]


def test_save_timer_with_a_fake_clock():
    now = [0.0]
    timer = ckpt_lib.SaveTimer(2.0, clock=lambda: now[0])
    now[0] = 119.0
    assert not timer.due()
    now[0] = 120.0
    assert timer.due()
    timer.reset()
    assert not timer.due()
    assert not ckpt_lib.SaveTimer(0.0, clock=lambda: 1e9).due()


def test_every_minutes_is_validated(tmp_path):
    c = tiny_config()
    c.checkpoint.every_minutes = -1.0
    with pytest.raises(ConfigError, match='checkpoint.every_minutes'):
        train.run(c, str(tmp_path))


# --- dry run ----------------------------------------------------------------------------

def test_dry_run_reports_and_writes_nothing(tmp_path, capsys):
    c = tiny_config()
    c.mesh.ici.update(data=1, fsdp=4, tensor=2)
    workdir = tmp_path / 'run'
    report = train.run(c, str(workdir), dry_run=True)
    out = capsys.readouterr().out
    assert not workdir.exists()
    assert report['params'] == 35_488 and report['mesh']['fsdp'] == 4
    assert report['flops_per_step'] > 0 and report['temp_bytes'] > 0
    assert 0 < report['argument_bytes'] < 4 * report['params'] * 3   # sharded: < full state
    assert '35,488 params' in out and 'FLOPs per step' in out and 'memory per device' in out


def test_dry_run_impossible_mesh_fails_before_compile(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError('built the model before validating')

    monkeypatch.setattr(train.setup_lib.state_lib, 'model_def', no_model)
    c = tiny_config()
    c.mesh.ici.update(data=3)
    with pytest.raises(ConfigError, match='mesh.ici'):
        train.run(c, str(tmp_path / 'run'), dry_run=True)
    assert not (tmp_path / 'run').exists()


def test_cli_dry_run(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'pretrain.train', '--config=configs/lm_tiny.py',
                          f'--workdir={tmp_path / "run"}', '--dry_run',
                          '--config.mesh.ici.fsdp=2', '--config.mesh.ici.tensor=2'],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'params' in out.stdout and 'memory per device' in out.stdout
    assert not (tmp_path / 'run').exists()
