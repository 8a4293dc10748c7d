"""Tests for pretrain/logs.py: library chatter hidden by default, back with --verbosity."""

import io
import logging
import os
import subprocess
import sys

import pytest
from absl import logging as absl_logging

from pretrain import logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def handler():
    """A handler on a private logger, filtered like the entry points' handlers."""
    stream = io.StringIO()
    h = logging.StreamHandler(stream)
    logger = logging.getLogger('test_logs_private')
    logger.propagate = False
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    h.addFilter(logs._FILTER)
    yield logger, stream
    logger.removeHandler(h)


def test_known_chatter_is_dropped_and_the_rest_kept(handler):
    logger, stream = handler
    logger.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
    logger.warning('CheckpointManagerOptions.read_only=True, setting max_to_keep=None.')
    logger.warning('Given directory is read only=%s', '/runs/var/checkpoints')
    logger.info('Connecting to JAX distributed service on 127.0.0.1:1234')
    logger.warning('a real warning')
    logger.info('step 10/100 | loss 2.0')
    assert stream.getvalue().splitlines() == ['a real warning', 'step 10/100 | loss 2.0']


def test_verbosity_brings_the_chatter_back(handler):
    logger, stream = handler
    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(1)
    try:
        logger.info("Unable to initialize backend 'tpu': not found")
    finally:
        absl_logging.set_verbosity(before)
    assert 'Unable to initialize backend' in stream.getvalue()


def test_install_is_idempotent():
    logs.quiet_libraries()
    logs.quiet_libraries()
    assert absl_logging.get_absl_handler().filters.count(logs._FILTER) == 1


def test_native_noise():
    assert logs.native_noise('[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of '
                             'connected peer ranks is : 1\n')
    # Two ranks writing at once: pieces of both on one line, the rest on the next.
    assert logs.native_noise('[Gloo] Rank 0[Gloo] Rank 2 is connected to 7 peer ranks. '
                             'Expected number of connected peer ranks is : 7')
    assert logs.native_noise(' is connected to 7 peer ranks. Expected number of connected '
                             'peer ranks is : 7')
    assert not logs.native_noise('step 10/100 | loss 2.0')


def _launch(*options):
    code = ('import sys; print("[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of '
            'connected peer ranks is : 1"); print("hello", sys.argv[-1])')
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, '-m', 'launch.local', '--num_processes=2',
                           '--devices_per_process=1', *options, '--', sys.executable, '-c', code],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_launch_local_hides_gloo_lines_unless_verbose():
    quiet = _launch()
    assert quiet.returncode == 0, quiet.stderr
    assert 'hello --process_id=0' in quiet.stdout and 'hello --process_id=1' in quiet.stdout
    forwarded = lambda out: [l for l in out.splitlines() if l.startswith(('[0] ', '[1] '))]
    assert not [l for l in forwarded(quiet.stdout) if 'is connected to' in l]
    loud = _launch('--verbosity=1')
    assert len([l for l in forwarded(loud.stdout) if 'is connected to' in l]) == 2


def _quickstart(tmp_path, install_ok: bool):
    """launch/quickstart.sh in a scratch copy whose .venv python is a stand-in for pip."""
    (tmp_path / 'launch').mkdir(exist_ok=True)
    script = open(os.path.join(ROOT, 'launch', 'quickstart.sh')).read()
    (tmp_path / 'launch' / 'quickstart.sh').write_text(script)
    (tmp_path / 'pyproject.toml').write_text('[project]\nname = "x"\n')
    bin_dir = tmp_path / '.venv' / 'bin'
    bin_dir.mkdir(parents=True, exist_ok=True)
    fail = '' if install_ok else 'exit 3'
    (bin_dir / 'python').write_text(
        '#!/usr/bin/env bash\n'
        'if [ "$3" = install ]; then\n'
        '  echo "running develop"; echo "Successfully installed x-0.0.0"\n'
        f'  case "$*" in *-e*) {fail} ;; esac\n'
        '  exit 0\n'
        'fi\n'
        'echo "ran: $*"\n')
    (bin_dir / 'python').chmod(0o755)
    return subprocess.run(['bash', 'launch/quickstart.sh', 'train', '--config.train.steps=3'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_quickstart_installs_quietly_and_shows_the_log_on_failure(tmp_path):
    ok = _quickstart(tmp_path, install_ok=True)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].startswith('quickstart: installing') and 'install.log' in lines[0]
    assert 'running develop' not in ok.stdout + ok.stderr        # pip's banner is in the log
    assert 'running develop' in (tmp_path / '.venv' / 'install.log').read_text()
    assert lines[-1].startswith('ran: -m pretrain.train') and '--config.train.steps=3' in lines[-1]
    again = subprocess.run(['bash', 'launch/quickstart.sh', 'train'], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert again.stdout.startswith('ran: ')                       # installed once: no message
    for stamp in (tmp_path / '.venv').glob('.installed-*'):
        stamp.unlink()
    failed = _quickstart(tmp_path, install_ok=False)
    assert failed.returncode == 1
    assert 'Successfully installed' in failed.stderr and 'installing failed' in failed.stderr
