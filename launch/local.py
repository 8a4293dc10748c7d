r"""Runs N processes of a command on this machine as one JAX job (simulated CPU devices).

    python -m launch.local --num_processes=2 --devices_per_process=4 [--timeout_s=600] \
        -- python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/mp

Each process gets `JAX_PLATFORMS=cpu`, `XLA_FLAGS=--xla_force_host_platform_device_count=K` and
`--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I` appended to the command.
Output lines are prefixed with `[I]`; known native chatter (gloo's `Rank N is connected`) is
dropped unless `--verbosity` is 1 or more (pretrain/logs.py lists it). SIGINT/SIGTERM are forwarded to the processes. When one
fails, the others get `--grace_s` to stop on their own (a JAX job aborts its peers by itself),
then they are terminated; on `--timeout_s` all are. Only this launcher's children (and their
process groups) are ever signalled. Exit status: 0 if every process succeeded, else the first
failure's code (124 on timeout), with a message naming the process.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from absl import app, flags

from pretrain import logs

TIMEOUT_EXIT = 124


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def describe_exit(code: int) -> str:
    if code < 0:
        return f'killed by {signal.Signals(-code).name}'
    if code > 128 and code - 128 in signal.valid_signals():
        return f'exit code {code} ({signal.Signals(code - 128).name})'
    return f'exit code {code}'


def child_env(devices_per_process: int, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    # Replace any device count already in XLA_FLAGS, keep the other XLA flags.
    flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', env.get('XLA_FLAGS', ''))
    env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices_per_process}'.strip()
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONUNBUFFERED'] = '1'   # interleaved output arrives when it is written
    return env


class Launcher:
    """Starts the processes, forwards their output and signals, and supervises them."""

    def __init__(self, command: Sequence[str], num_processes: int, devices_per_process: int,
                 timeout_s: float | None = None, grace_s: float = 30.0, port: int | None = None,
                 verbosity: int = 0):
        self.command = list(command)
        self.verbosity = verbosity
        self.num_processes = num_processes
        self.devices_per_process = devices_per_process
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.port = port or free_port()
        self.procs: list[subprocess.Popen] = []
        self.exit_times: dict[int, float] = {}   # index -> monotonic time its exit was seen
        self._readers: list[threading.Thread] = []
        self._write_lock = threading.Lock()

    def _say(self, text: str) -> None:
        with self._write_lock:
            sys.stdout.write(f'[launch.local] {text}\n')
            sys.stdout.flush()

    def _forward(self, index: int, stream) -> None:
        for line in iter(stream.readline, b''):
            if self.verbosity <= 0 and logs.native_noise(line.decode(errors='replace')):
                continue
            with self._write_lock:
                sys.stdout.buffer.write(f'[{index}] '.encode() + line)
                sys.stdout.flush()
        stream.close()

    def start(self) -> None:
        env = child_env(self.devices_per_process)
        address = f'127.0.0.1:{self.port}'
        for i in range(self.num_processes):
            argv = self.command + [f'--coordinator_address={address}',
                                   f'--num_processes={self.num_processes}', f'--process_id={i}']
            # A session of its own: a terminal's Ctrl-C reaches the launcher only, which forwards
            # it once; and the child's process group lets us stop its helpers with it.
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(proc)
            self._say(f'process {i} pid {proc.pid}: {" ".join(argv)}')
            reader = threading.Thread(target=self._forward, args=(i, proc.stdout), daemon=True)
            reader.start()
            self._readers.append(reader)
            # A blocked wait() per child wakes at its exit: polling in index order would blame
            # the lower index when two exits fall between polls.
            threading.Thread(target=self._note_exit, args=(i, proc), daemon=True).start()

    def _note_exit(self, index: int, proc: subprocess.Popen) -> None:
        proc.wait()
        self.exit_times.setdefault(index, time.monotonic())

    def signal_all(self, sig: int) -> None:
        """Sends `sig` to the process group of each child that is still running."""
        for proc in self.procs:
            if proc.returncode is None:   # not yet reaped: its pid (= group id) is still ours
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass

    def stop_all(self, wait_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL whatever is left after `wait_s`."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(p.returncode is None for p in self.procs):
            time.sleep(0.05)
        self.signal_all(signal.SIGKILL)
        for i, proc in enumerate(self.procs):
            proc.wait()
            self.exit_times.setdefault(i, time.monotonic())

    def _failures(self) -> list[int]:
        """Indices of the processes that exited non-zero, earliest exit first."""
        seen = dict(self.exit_times)   # a copy: the waiter threads add to it
        return sorted((i for i in seen if self.procs[i].returncode != 0), key=seen.__getitem__)

    def supervise(self) -> int:
        """Waits for the processes; returns the launcher's exit status."""
        start = time.monotonic()
        first_failure: tuple[int, int] | None = None
        failed_at = 0.0
        timed_out = False
        while len(self.exit_times) < len(self.procs):
            now = time.monotonic()
            if first_failure is None:
                failed = self._failures()
                if failed:
                    i = failed[0]
                    first_failure, failed_at = (i, self.procs[i].returncode), now
                    self._say(f'process {i} (pid {self.procs[i].pid}) failed: '
                              f'{describe_exit(self.procs[i].returncode)}; '
                              f'giving the others {self.grace_s:g}s to stop')
            if first_failure is not None and now - failed_at > self.grace_s:
                self._say('terminating the remaining processes')
                self.stop_all()
                break
            if self.timeout_s and now - start > self.timeout_s:
                timed_out = True
                self._say(f'timeout after {self.timeout_s:g}s: terminating the processes')
                self.stop_all()
                break
            time.sleep(0.05)
        for reader in self._readers:
            reader.join(timeout=5)
        codes = [p.returncode for p in self.procs]
        if first_failure is None and self._failures():
            i = self._failures()[0]
            first_failure = (i, codes[i])
        t0 = min(self.exit_times.values(), default=0.0)
        summary = ', '.join(f'{i}: {describe_exit(c)}'
                            + (f' at +{self.exit_times[i] - t0:.1f}s' if i in self.exit_times else '')
                            for i, c in enumerate(codes))
        if timed_out:
            self._say(f'FAILED: timeout after {self.timeout_s:g}s ({summary})')
            return TIMEOUT_EXIT
        if first_failure is not None:
            i, code = first_failure
            self._say(f'FAILED: process {i} (pid {self.procs[i].pid}) failed first with '
                      f'{describe_exit(code)} ({summary})')
            return code if 0 < code < 256 else 1
        self._say(f'all {len(self.procs)} processes succeeded')
        return 0


def define_flags() -> None:
    """The launcher's flags; defined only when it runs as a program, since the trainer it may be
    imported beside has its own --num_processes (pretrain.distributed)."""
    flags.DEFINE_integer('num_processes', 2, 'Processes to start.', lower_bound=1)
    flags.DEFINE_integer('devices_per_process', 4, 'Simulated CPU devices per process.',
                         lower_bound=1)
    flags.DEFINE_float('timeout_s', None, 'Kill everything after this many seconds.')
    flags.DEFINE_float('grace_s', 30.0, 'After a failure, how long the others may take to stop '
                       'on their own.')
    flags.DEFINE_integer('port', None, 'Coordinator port (default: a free one).')
    # --verbosity is absl's own flag: 1 or more also forwards the chatter hidden by default (the
    # command's own --verbosity governs its Python logs).


def main(argv: Sequence[str]) -> int:
    command = list(argv[1:])   # everything after --
    if not command:
        raise app.UsageError('no command: put it after --, e.g. -- python -m pretrain.train ...')
    values = flags.FLAGS
    launcher = Launcher(command, values.num_processes, values.devices_per_process,
                        values.timeout_s, values.grace_s, values.port, values.verbosity)

    def forward(signum, frame):
        launcher._say(f'received {signal.Signals(signum).name}: forwarding it to the processes')
        launcher.signal_all(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start()
        return launcher.supervise()
    finally:
        launcher.stop_all(wait_s=1.0)   # no-op when all have exited; never leaves orphans
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == '__main__':
    define_flags()
    app.run(main)
