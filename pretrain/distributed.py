"""Joining a multi-process JAX job: from flags or from the cluster's environment.

`--distributed` picks where the coordinator address, process count and process id come from:

    auto   (default) flags if --coordinator_address is given, else SLURM, Kubernetes or GKE TPU
           variables if present, else a single process
    off    a single process; nothing is initialised
    flags  --coordinator_address, --num_processes, --process_id
    slurm  SLURM_PROCID, SLURM_NTASKS and the first host of SLURM_STEP_NODELIST (one task per node)
    k8s    an indexed Job: JOB_COMPLETION_INDEX, plus PRETRAIN_COORDINATOR_ADDRESS (the stable DNS
           name of pod 0 through a headless service) and PRETRAIN_NUM_PROCESSES
    tpu    JAX's own detection (Cloud TPU VM pods, GKE TPU), which asks the TPU metadata server

A flag given explicitly overrides the value read from the environment.

Failure behaviour (measured with jax 0.10.2 on CPU, see README "Multi-host launch"):
- peers that never arrive: a watchdog ends this process after --distributed_init_timeout_s with
  a message naming the coordinator, the process id, the process count and the timeout;
- a peer that dies: JAX's coordination service aborts every other process (SIGABRT, message
  "Terminating process because the JAX distributed service detected fatal errors"); within
  ~0.2 s if process 0 died, else within --distributed_heartbeat_timeout_s;
- an exception in one process: `fail_fast` exits at once instead of waiting in JAX's shutdown
  barrier (up to the shutdown timeout) while the peers wait for it in a collective.
"""

import contextlib
import dataclasses
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping

import jax
from absl import flags, logging

METHODS = ('auto', 'off', 'flags', 'slurm', 'k8s', 'tpu')
COORDINATOR_ENV = 'PRETRAIN_COORDINATOR_ADDRESS'
NUM_PROCESSES_ENV = 'PRETRAIN_NUM_PROCESSES'
DEFAULT_PORT = 8476   # JAX's own default coordinator port on TPU

_METHOD = flags.DEFINE_enum('distributed', 'auto', METHODS,
                            'Where the multi-process job layout comes from (see pretrain/distributed.py).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (0-based).')
_PORT = flags.DEFINE_integer('coordinator_port', None,
                             'Coordinator port when the host comes from the environment '
                             f'(default {DEFAULT_PORT}; under SLURM derived from the job id).')
_INIT_TIMEOUT = flags.DEFINE_integer('distributed_init_timeout_s', 300,
                                     'Seconds to wait for every process to join.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'distributed_heartbeat_timeout_s', 60,
    'Seconds without heartbeats after which a process is declared dead and the job aborts.')
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    'distributed_shutdown_timeout_s', 300,
    'Seconds a finished process waits at exit for the others to finish.')


class DistributedError(RuntimeError):
    """The job layout is missing or inconsistent."""


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """Where this process sits in the job; None fields are left to JAX's detection."""
    method: str
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None

    def describe(self) -> str:
        return (f'process {_or_auto(self.process_id)} of {_or_auto(self.num_processes)}, '
                f'coordinator {_or_auto(self.coordinator_address)} (--distributed={self.method})')


def _or_auto(value) -> str:
    return 'detected by JAX' if value is None else str(value)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-010,12],cpu1' -> 'gpu003'."""
    m = re.match(r'([^,\[]+)(?:\[([^\]]+)\])?', nodelist.strip())
    if not m:
        raise DistributedError(f'cannot read a host from the SLURM node list {nodelist!r}')
    prefix, ranges = m.groups()
    if not ranges:
        return prefix
    # The zero padding of the range start is part of the host name ('003').
    return prefix + ranges.split(',')[0].split('-')[0]


def _with_port(address: str, port: int) -> str:
    return address if re.search(r':\d+$', address) else f'{address}:{port}'


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise DistributedError(f'environment variable {name}={env.get(name)!r} is not an integer') from None


def _detect(env: Mapping[str, str]) -> str:
    if env.get('SLURM_PROCID') is not None and int(env.get('SLURM_NTASKS', '1')) > 1:
        return 'slurm'
    if 'JOB_COMPLETION_INDEX' in env and COORDINATOR_ENV in env:
        return 'k8s'
    if 'TPU_WORKER_HOSTNAMES' in env or 'MEGASCALE_COORDINATOR_ADDRESS' in env:
        return 'tpu'
    return 'off'


def resolve(method: str = 'auto', coordinator_address: str | None = None,
            num_processes: int | None = None, process_id: int | None = None,
            coordinator_port: int | None = None,
            env: Mapping[str, str] | None = None) -> JobSpec | None:
    """The job layout for `method`; None for a single process. Explicit arguments win."""
    env = os.environ if env is None else env
    if method not in METHODS:
        raise DistributedError(f'--distributed={method!r}; choose one of {list(METHODS)}')
    if method == 'auto':
        method = 'flags' if coordinator_address else _detect(env)
    if method == 'off':
        return None
    if method == 'flags':
        missing = [f'--{name}' for name, v in (('coordinator_address', coordinator_address),
                                               ('num_processes', num_processes),
                                               ('process_id', process_id)) if v is None]
        if missing:
            raise DistributedError(f'--distributed=flags needs {", ".join(missing)}')
        spec = JobSpec('flags', coordinator_address, num_processes, process_id)
    elif method == 'slurm':
        nodes = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST')
        if not nodes and not coordinator_address:
            raise DistributedError('--distributed=slurm but neither SLURM_STEP_NODELIST nor '
                                   'SLURM_JOB_NODELIST is set: run the command under srun')
        port = coordinator_port or DEFAULT_PORT
        if not coordinator_port and 'SLURM_JOB_ID' in env:
            port = 20000 + _int(env, 'SLURM_JOB_ID') % 20000   # jobs sharing a node differ
        spec = JobSpec('slurm', coordinator_address or f'{first_host(nodes)}:{port}',
                       num_processes if num_processes is not None else _int(env, 'SLURM_NTASKS'),
                       process_id if process_id is not None else _int(env, 'SLURM_PROCID'))
    elif method == 'k8s':
        address = coordinator_address or env.get(COORDINATOR_ENV)
        if not address:
            raise DistributedError(f'--distributed=k8s needs {COORDINATOR_ENV} (e.g. '
                                   'JOB-0.SERVICE:8476) or --coordinator_address')
        if num_processes is None and NUM_PROCESSES_ENV not in env:
            raise DistributedError(f'--distributed=k8s needs {NUM_PROCESSES_ENV} or --num_processes')
        spec = JobSpec('k8s', _with_port(address, coordinator_port or DEFAULT_PORT),
                       num_processes if num_processes is not None else _int(env, NUM_PROCESSES_ENV),
                       process_id if process_id is not None else _int(env, 'JOB_COMPLETION_INDEX'))
    else:   # tpu: JAX fills in whatever is None
        address = coordinator_address and _with_port(coordinator_address, coordinator_port or DEFAULT_PORT)
        spec = JobSpec('tpu', address, num_processes, process_id)
    _check(spec)
    return spec


def _check(spec: JobSpec) -> None:
    n, i = spec.num_processes, spec.process_id
    if n is not None and n < 1:
        raise DistributedError(f'{spec.describe()}: the process count must be >= 1')
    if i is not None and not 0 <= i < (n if n is not None else i + 1):
        raise DistributedError(f'{spec.describe()}: the process id must be in [0, {n})')
    if spec.coordinator_address is not None and not re.search(r'.:\d+$', spec.coordinator_address):
        raise DistributedError(f'{spec.describe()}: the coordinator address must be host:port')


def _init_failed(spec: JobSpec, timeout_s: int) -> None:
    n = '' if spec.num_processes is None else f'{spec.num_processes} '
    sys.stderr.write(
        f'\ndistributed init failed: {spec.describe()} waited --distributed_init_timeout_s='
        f'{timeout_s}s and not all {n}processes joined. Check that every process was started '
        f'with the same coordinator address and process count and a distinct process id, that '
        f'process 0 is running, and that its port is reachable from this host.\n')
    sys.stderr.flush()
    os._exit(1)   # JAX's connect is blocked in C++; nothing else can end it cleanly


def initialize(spec: JobSpec | None, init_timeout_s: int = 300, heartbeat_timeout_s: int = 60,
               shutdown_timeout_s: int = 300) -> None:
    """Joins the job described by `spec` (None: a single process, nothing to do)."""
    if spec is None:
        return
    logging.info('joining the job: %s', spec.describe())
    # JAX aborts from C++ with a terse DEADLINE_EXCEEDED when peers never arrive; a watchdog
    # that fires first ends the process with a message that says what to check. (Measured:
    # JAX's own abort comes ~5 s after its timeout, so it gets a margin on top.)
    watchdog = threading.Timer(init_timeout_s, _init_failed, (spec, init_timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
            process_id=spec.process_id, initialization_timeout=init_timeout_s + 60,
            heartbeat_timeout_seconds=heartbeat_timeout_s, shutdown_timeout_seconds=shutdown_timeout_s)
    except Exception as e:
        raise DistributedError(f'could not join the job ({spec.describe()}): {e}') from e
    finally:
        watchdog.cancel()
    logging.info('joined: process %d of %d, %d local / %d global devices', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
    """`initialize` with the layout and timeouts given by this module's flags."""
    spec = resolve(_METHOD.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                   _PORT.value)
    initialize(spec, _INIT_TIMEOUT.value, _HEARTBEAT_TIMEOUT.value, _SHUTDOWN_TIMEOUT.value)


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches `name` (each name once per job); no-op alone.

    It goes through the coordination service, not a device collective: on CPU, gloo gives up a
    first collective after a fixed 30 s when a peer is still compiling (e.g. process 0 hit the
    compilation cache, which only process 0 writes, and process 1 did not).
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed   # the client has no public handle
    jax_distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """In a multi-process job, an uncaught exception ends this process at once.

    A normal exit waits in JAX's shutdown barrier for every peer, while the peers wait for this
    process in their next collective: the job would hang for the whole shutdown timeout. Exiting
    immediately lets the coordination service see the death and abort the peers within the
    heartbeat bound. SystemExit (config errors, preemption) is a deliberate exit and passes.
    """
    try:
        yield
    except SystemExit:
        raise
    except BaseException:
        if not jax.distributed.is_initialized():
            raise
        traceback.print_exc()
        sys.stderr.write(f'process {jax.process_index()} failed; exiting without the shutdown '
                         'barrier so that the other processes stop too\n')
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
