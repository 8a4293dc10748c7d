"""Multi-process jobs on one machine: launch.local, pretrain.distributed, and the trainer across
processes (2 processes x 4 simulated CPU devices against 1 process x 8)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from launch import local
from pretrain import data as data_lib
from pretrain import distributed, train
from tests.helpers import losses, tiny_config, with_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 10
# Measured on a loaded 2-core machine: a SIGKILLed non-coordinator is detected 0.6-1.1 x the
# heartbeat timeout after it (6.1-10.6 s for 10 s); the margin is for a busy machine.
DEATH_BOUND_S = HEARTBEAT_S + 20
TOTAL_STEPS = 6


def _env() -> dict[str, str]:
    # No persistent compilation cache: only process 0 writes it, so process 0 would start
    # stepping while process 1 still compiles, and gloo's first collective gives up after 30 s.
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')


def _config(**train_kw):
    c = tiny_config(**train_kw)
    c.schedule.total_steps = TOTAL_STEPS   # the schedule does not depend on where a run stops
    return c


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
    """A config file for subprocesses (tiny_config) and a tokenized-data cache shared by all."""
    d = tmp_path_factory.mktemp('multihost')
    path = d / 'tiny.py'
    path.write_text(textwrap.dedent(f'''
        from tests.helpers import tiny_config

        def get_config():
            c = tiny_config()
            c.schedule.total_steps = {TOTAL_STEPS}
            return c
    '''))
    return {'config': str(path), 'cache': str(d / 'data_cache')}


def _train_cmd(shared, workdir, *overrides: str) -> list[str]:
    return [sys.executable, '-m', 'pretrain.train', f'--config={shared["config"]}',
            f'--workdir={workdir}', f'--config.data.cache_dir={shared["cache"]}',
            f'--distributed_heartbeat_timeout_s={HEARTBEAT_S}', *overrides]


class Launch:
    """`python -m launch.local ...` as a subprocess; collects its output; cleans up after itself."""

    def __init__(self, command: list[str], *options: str):
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'launch.local', *options, '--', *command], cwd=ROOT, env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return ''.join(self.lines)

    def child_pids(self) -> dict[int, int]:
        return {int(i): int(p) for i, p in re.findall(r'\[launch\.local\] process (\d+) pid (\d+)', self.output)}

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def cleanup(self) -> None:
        """Ends the launcher and the processes it started, if a failed test left them running."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        groups = set(self.child_pids().values())   # each child leads its own process group
        for pid in groups:
            _kill_in_groups(pid, groups)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _kill_in_groups(pid: int, groups: set[int]) -> None:
    """SIGKILLs `pid` only if it is still in one of `groups` (a recycled pid is not ours)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            pgrp = int(f.read().rsplit(')', 1)[1].split()[2])
        if pgrp in groups:
            os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


def _gone(pid: int, within: float = 10.0) -> bool:
    """True once `pid` no longer runs (a zombie awaiting its reaper counts as gone)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _metrics(workdir) -> list[dict]:
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get('split', 'train') == 'train']


# ---------------------------------------------------------------- layout from flags / environment

def test_resolve_from_flags_and_environment():
    assert distributed.resolve('auto', env={}) is None
    assert distributed.resolve('auto', '10.0.0.1:1234', 2, 1, env={}) == distributed.JobSpec(
        'flags', '10.0.0.1:1234', 2, 1)
    slurm = {'SLURM_PROCID': '3', 'SLURM_NTASKS': '4', 'SLURM_JOB_ID': '1234',
             'SLURM_STEP_NODELIST': 'gpu[007-010],cpu1'}
    assert distributed.resolve('auto', env=slurm) == distributed.JobSpec('slurm', 'gpu007:21234', 4, 3)
    assert distributed.resolve('slurm', coordinator_port=9000, env=slurm).coordinator_address == 'gpu007:9000'
    k8s = {'JOB_COMPLETION_INDEX': '2', distributed.COORDINATOR_ENV: 'trainer-0.trainer',
           distributed.NUM_PROCESSES_ENV: '4'}
    assert distributed.resolve('auto', env=k8s) == distributed.JobSpec('k8s', 'trainer-0.trainer:8476', 4, 2)
    assert distributed.resolve('tpu', env={}) == distributed.JobSpec('tpu', None, None, None)
    assert distributed.resolve('off', '10.0.0.1:1234', 2, 1, env=slurm) is None
    assert distributed.first_host('node1') == 'node1'
    assert distributed.first_host('a-b[1-2]') == 'a-b1'


@pytest.mark.parametrize('kwargs, message', [
    (dict(method='flags', coordinator_address='h:1'), '--num_processes, --process_id'),
    (dict(method='flags', coordinator_address='h:1', num_processes=2, process_id=2), '[0, 2)'),
    (dict(method='flags', coordinator_address='host', num_processes=2, process_id=0), 'host:port'),
    (dict(method='k8s', env={'JOB_COMPLETION_INDEX': '0'}), distributed.COORDINATOR_ENV),
    (dict(method='slurm', env={'SLURM_PROCID': '0', 'SLURM_NTASKS': '2'}), 'srun'),
])
def test_resolve_errors_name_what_is_missing(kwargs, message):
    kwargs.setdefault('env', {})
    with pytest.raises(distributed.DistributedError, match=re.escape(message)):
        distributed.resolve(**kwargs)


_JOIN = '''
import jax
from pretrain import distributed
distributed.initialize(distributed.resolve('auto'), init_timeout_s=60, heartbeat_timeout_s=10)
print('joined', jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
'''


def _free_port_in(lo: int, hi: int) -> int:
    for port in np.random.default_rng().integers(lo, hi, 50):
        try:
            with socket.socket() as s:
                s.bind(('127.0.0.1', int(port)))
            return int(port)
        except OSError:
            continue
    raise RuntimeError(f'no free port in [{lo}, {hi})')


@pytest.mark.parametrize('cluster', ['slurm', 'k8s'])
def test_processes_join_from_the_cluster_environment(cluster):
    port = _free_port_in(20000, 40000)
    base = {k: v for k, v in _env().items()
            if not k.startswith(('SLURM_', 'PRETRAIN_', 'JOB_COMPLETION_INDEX', 'TPU_'))}
    base['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    procs = []
    try:
        for i in range(2):
            if cluster == 'slurm':   # the coordinator port is derived from the job id
                extra = {'SLURM_PROCID': str(i), 'SLURM_NTASKS': '2', 'SLURM_JOB_ID': str(port - 20000),
                         'SLURM_STEP_NODELIST': 'localhost'}
            else:
                extra = {'JOB_COMPLETION_INDEX': str(i), distributed.NUM_PROCESSES_ENV: '2',
                         distributed.COORDINATOR_ENV: f'localhost:{port}'}
            procs.append(subprocess.Popen([sys.executable, '-c', _JOIN], cwd=ROOT, env={**base, **extra},
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        assert f'joined {i} 2 4' in out


def test_child_env_sets_the_device_count_and_keeps_other_xla_flags():
    env = local.child_env(4, {'XLA_FLAGS': '--xla_foo=1 --xla_force_host_platform_device_count=8'})
    assert env['XLA_FLAGS'].split() == ['--xla_foo=1', '--xla_force_host_platform_device_count=4']
    assert env['JAX_PLATFORMS'] == 'cpu'


# ---------------------------------------------------------------- trainer across processes

@pytest.fixture(scope='module')
def two_process_run(shared, tmp_path_factory):
    """3 of 6 steps by 2 processes x 4 devices on mesh data=2, fsdp=2, tensor=2 (one checkpoint)."""
    workdir = str(tmp_path_factory.mktemp('two_process') / 'run')
    launch = Launch(_train_cmd(shared, workdir, '--config.train.steps=3', '--config.mesh.ici.data=2',
                               '--config.mesh.ici.fsdp=2', '--config.mesh.ici.tensor=2'),
                    '--num_processes=2', '--devices_per_process=4', '--timeout_s=400')
    try:
        rc = launch.wait(timeout=450)
    finally:
        launch.cleanup()
    assert rc == 0, launch.output[-5000:]
    return {'workdir': workdir, 'output': launch.output}


@pytest.fixture(scope='module')
def one_process_losses(shared, tmp_path_factory):
    """The uninterrupted reference: 6 steps, 1 process x 8 devices, the same mesh shape."""
    c = with_mesh(_config(steps=TOTAL_STEPS), data=2, fsdp=2, tensor=2)
    c.data.cache_dir = shared['cache']
    return losses(train.run(c, str(tmp_path_factory.mktemp('one_process'))))


def test_two_processes_train_like_one(two_process_run, one_process_losses):
    rows = _metrics(two_process_run['workdir'])
    # Only process 0 writes metrics: each step appears once, not once per process.
    assert [r['step'] for r in rows] == [1, 2, 3]
    assert '2 process(es)' in two_process_run['output']
    np.testing.assert_allclose([r['loss'] for r in rows], one_process_losses[:3], rtol=1e-5, atol=1e-5)


def test_processes_read_disjoint_rows_that_make_the_global_batch(shared):
    # The trainer builds its pipeline exactly so, with jax.process_index()/process_count(); the
    # matching losses above show it used these rows (duplicated rows would change the loss).
    cfg = _config()
    cfg.data.cache_dir = shared['cache']
    kwargs = dict(global_batch_size=cfg.train.global_batch_size, num_eval_batches=0, seed=cfg.seed)
    whole = data_lib.make_text_pipeline(cfg.data, **kwargs).train_iterator()
    parts = [data_lib.make_text_pipeline(cfg.data, process_index=p, process_count=2, **kwargs)
             .train_iterator() for p in range(2)]
    for _ in range(3):
        a, b, both = next(parts[0]), next(parts[1]), next(whole)
        assert a['inputs'].shape[0] == b['inputs'].shape[0] == cfg.train.global_batch_size // 2
        assert not any(np.array_equal(x, y) for x in a['inputs'] for y in b['inputs'])
        np.testing.assert_array_equal(np.concatenate([a['inputs'], b['inputs']]), both['inputs'])


def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(
        two_process_run, one_process_losses, shared, tmp_path):
    workdir = str(tmp_path / 'resumed')
    shutil.copytree(two_process_run['workdir'], workdir)
    c = with_mesh(_config(steps=TOTAL_STEPS), fsdp=4, tensor=2)   # was data=2, fsdp=2, tensor=2
    c.data.cache_dir = shared['cache']
    result = train.run(c, workdir, devices=jax.devices())
    assert [h['step'] for h in result['history']] == [4, 5, 6]
    np.testing.assert_allclose(losses(result), one_process_losses[3:], rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------- failures

@pytest.mark.slow   # about 45 s; peer failure stays covered by the missing-peer test below
def test_killing_one_process_stops_the_other_in_bounded_time(shared, tmp_path):
    workdir = str(tmp_path / 'run')
    launch = Launch(_train_cmd(shared, workdir, '--config.train.steps=100000',
                               '--config.schedule.total_steps=100000',
                               '--config.checkpoint.every_steps=100000'),
                    '--num_processes=2', '--devices_per_process=4', '--timeout_s=300', '--grace_s=120')
    try:
        deadline = time.monotonic() + 240
        while len(_metrics(workdir)) < 2:   # both processes are in the training loop
            assert launch.proc.poll() is None, launch.output[-5000:]
            assert time.monotonic() < deadline, 'training did not start'
            time.sleep(0.2)
        victim = launch.child_pids()[1]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        rc = launch.wait(timeout=DEATH_BOUND_S + 30)
        elapsed = time.monotonic() - killed
    finally:
        launch.cleanup()
    out = launch.output
    assert rc != 0
    assert elapsed < DEATH_BOUND_S, f'the survivor took {elapsed:.1f}s to stop'
    assert f'process 1 (pid {victim}) failed first with killed by SIGKILL' in out
    assert 'terminating the remaining processes' not in out   # process 0 stopped on its own
    assert re.search(r'\[0\] .*detected fatal errors', out), out[-5000:]


def test_peers_that_never_arrive_give_a_clear_error(shared, tmp_path):
    port = local.free_port()
    start = time.monotonic()
    proc = subprocess.run(
        _train_cmd(shared, str(tmp_path / 'run'), f'--coordinator_address=127.0.0.1:{port}',
                   '--num_processes=2', '--process_id=0', '--distributed_init_timeout_s=3'),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert time.monotonic() - start < 60
    for text in (f'127.0.0.1:{port}', 'process 0 of 2', 'distributed_init_timeout_s=3s'):
        assert text in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / 'run')


_SLEEPER = '''
import subprocess, sys, time
helper = subprocess.Popen(['sleep', '300'])
print('helper', helper.pid, flush=True)
time.sleep(300)
'''


def test_launcher_timeout_kills_only_its_own_children():
    bystander = subprocess.Popen(['sleep', '300'])
    launch = Launch([sys.executable, '-c', _SLEEPER], '--num_processes=2', '--devices_per_process=1',
                    '--timeout_s=3')
    try:
        start = time.monotonic()
        rc = launch.wait(timeout=60)
        assert rc == local.TIMEOUT_EXIT
        assert time.monotonic() - start < 30
        assert 'timeout after 3s' in launch.output
        helpers = [int(p) for p in re.findall(r'\] helper (\d+)', launch.output)]
        assert len(helpers) == 2, launch.output
        for pid in [*launch.child_pids().values(), *helpers]:
            assert _gone(pid), f'pid {pid} survived the launcher'
        assert bystander.poll() is None   # not ours to kill
    finally:
        launch.cleanup()
        groups = set(launch.child_pids().values())
        for pid in re.findall(r'\] helper (\d+)', launch.output):
            _kill_in_groups(int(pid), groups)
        bystander.kill()
        bystander.wait()


def test_launcher_forwards_sigterm_and_reports_the_failure():
    script = 'import time; time.sleep(300)'
    launch = Launch([sys.executable, '-c', script], '--num_processes=2', '--devices_per_process=1',
                    '--timeout_s=60', '--grace_s=5')
    try:
        deadline = time.monotonic() + 30
        while len(launch.child_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        launch.proc.send_signal(signal.SIGTERM)
        rc = launch.wait(timeout=30)
    finally:
        launch.cleanup()
    assert rc != 0
    assert 'received SIGTERM: forwarding it' in launch.output
    assert re.search(r'FAILED: process \d \(pid \d+\) failed first with killed by SIGTERM', launch.output)


def test_launcher_succeeds_only_when_all_succeed():
    script = 'import sys; sys.exit(3 if "--process_id=1" in sys.argv else 0)'
    launch = Launch([sys.executable, '-c', script], '--num_processes=2', '--devices_per_process=1')
    try:
        assert launch.wait(timeout=60) == 3
    finally:
        launch.cleanup()
    assert 'FAILED: process 1' in launch.output and 'exit code 3' in launch.output
    ok = Launch([sys.executable, '-c', 'pass'], '--num_processes=2', '--devices_per_process=1')
    try:
        assert ok.wait(timeout=60) == 0
    finally:
        ok.cleanup()
