"""SIGTERM/SIGINT at every phase of start-up exits 75 (a scheduler requeues), never signal 15.

Each case runs the real entry point (`python -m pretrain.train`) in a subprocess; a small
wrapper makes the process signal itself exactly once, inside the phase under test, so the
phase is hit deterministically rather than by timing.
"""

import os
import signal
import subprocess
import sys

import pytest

from pretrain import startup_signals
from pretrain.preemption import EXIT_PREEMPTED, Watcher
from tests.helpers import tiny_config
from tests.test_fault_tolerance import ROOT, _cli_overrides, _env

# Runs pretrain.train as __main__ after wrapping the function that starts `phase`, so that the
# process sends itself the signal once, when that function is first called.
_WRAPPER = '''
import os, runpy, signal, sys
phase, sig = sys.argv[1], getattr(signal, sys.argv[2])
del sys.argv[1:3]
sent = []

def signal_first(fn):
    def wrapped(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), sig)
        return fn(*args, **kwargs)
    return wrapped

if phase == 'validation':
    from pretrain import config
    config.validate = signal_first(config.validate)
elif phase == 'data':
    from pretrain import data
    data.make_pipeline = signal_first(data.make_pipeline)
elif phase == 'restore':
    from pretrain import checkpoint
    checkpoint.Checkpointer.restore = signal_first(checkpoint.Checkpointer.restore)
elif phase == 'compile':
    import jax
    jax.stages.Lowered.compile = signal_first(jax.stages.Lowered.compile)
sys.argv[0] = 'pretrain/train.py'
runpy.run_module('pretrain.train', run_name='__main__', alter_sys=True)
'''

# A config file that signals its own process while the flags are parsed.
_SIGNALLING_CONFIG = '''
import os, signal
from configs import lm_tiny

def get_config():
    os.kill(os.getpid(), signal.{sig})
    return lm_tiny.get_config()
'''


def _config(steps=3):
    c = tiny_config(steps=steps)
    c.checkpoint.every_steps = 100
    c.schedule.total_steps = 6   # the same schedule for a first part and its continuation
    return c


def _run(args, tmp_path, timeout=300):
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _train_args(workdir, steps=3):
    return [f'--workdir={workdir}', *_cli_overrides(_config(steps))]


@pytest.mark.parametrize('sig', ['SIGTERM', pytest.param('SIGINT', marks=pytest.mark.slow)])
def test_signal_while_parsing_the_config_exits_75_and_writes_nothing(sig, tmp_path):
    config = tmp_path / 'signalling_config.py'
    config.write_text(_SIGNALLING_CONFIG.format(sig=sig))
    workdir = tmp_path / 'run'
    out = _run([sys.executable, '-m', 'pretrain.train', f'--config={config}',
                *_train_args(workdir)], tmp_path)
    assert out.returncode == EXIT_PREEMPTED, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f'stopped by {sig} during start-up, before the run started; nothing to save. Exit 75: '
        'restart the same command to continue.')
    assert not workdir.exists()


def _phase(phase, workdir, tmp_path, sig='SIGTERM', steps=3):
    wrapper = tmp_path / 'wrapper.py'
    wrapper.write_text(_WRAPPER)
    return _run([sys.executable, str(wrapper), phase, sig, '--config=configs/lm_tiny.py',
                 *_train_args(workdir, steps)], tmp_path)


# One phase by default (the suite's time budget); every phase with -m slow.
@pytest.mark.parametrize('phase', [pytest.param('validation', marks=pytest.mark.slow),
                                   pytest.param('data', marks=pytest.mark.slow), 'compile'])
def test_sigterm_during_start_up_exits_75(phase, tmp_path):
    workdir = tmp_path / 'run'
    out = _phase(phase, workdir, tmp_path)
    assert out.returncode == EXIT_PREEMPTED, out.stderr[-3000:]
    assert 'Traceback' not in out.stderr


def test_a_dry_run_stops_at_the_first_signal_during_its_compile(tmp_path):
    """A dry run saves nothing, so it does not wait for a long compile to finish before a stop
    acts (the recorder would hold the signal until the compile returned)."""
    wrapper = tmp_path / 'wrapper.py'
    wrapper.write_text(_WRAPPER)
    out = _run([sys.executable, str(wrapper), 'compile', 'SIGTERM', '--config=configs/lm_tiny.py',
                '--dry_run'], tmp_path)
    assert out.returncode == -signal.SIGTERM, (out.returncode, out.stderr[-3000:])
    assert 'dry run:' not in out.stdout


@pytest.mark.slow
def test_sigint_during_restore_exits_75_and_a_restart_finishes(tmp_path):
    workdir = tmp_path / 'run'
    first = _run([sys.executable, '-m', 'pretrain.train', '--config=configs/lm_tiny.py',
                  *_train_args(workdir, steps=3)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = _phase('restore', workdir, tmp_path, sig='SIGINT', steps=6)
    assert out.returncode == EXIT_PREEMPTED, out.stderr[-3000:]
    assert 'Traceback' not in out.stderr
    done = _run([sys.executable, '-m', 'pretrain.train', '--config=configs/lm_tiny.py',
                 *_train_args(workdir, steps=6)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


# --- in-process: the recorder and the watcher's takeover ---------------------------------

def test_recorded_signal_is_taken_over_by_the_watcher():
    previous = signal.getsignal(signal.SIGTERM)
    startup_signals.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)   # recorded, not fatal
        assert startup_signals.received() == 'SIGTERM'
        with Watcher() as watcher:
            assert watcher.should_stop(0)      # before the first step: stop there
            assert startup_signals.received() is None
    finally:
        startup_signals.uninstall()
        startup_signals.clear()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_no_signal_no_stop():
    startup_signals.clear()
    with Watcher() as watcher:
        assert not watcher.should_stop(0)
    startup_signals.exit_if_received('anything')   # returns: nothing was received
