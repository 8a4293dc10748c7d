"""Peak FLOP/s and MFU, throughput, and the metrics writer (JSONL, TensorBoard, progress).

The JSONL file is the durable record of a run: one JSON object per `write`, flushed line by
line. TensorBoard and the progress line are conveniences on top of it.
"""

import functools
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pretrain.jsonable import jsonable

# Dense (no sparsity) bf16 peak FLOP/s per *JAX device*, keyed by a lowercase substring of
# `device.device_kind`. Lookup takes the first key found in the kind, so a key that is a
# substring of another (e.g. 'tpu v5' of 'tpu v5 lite', 'a10' of 'a100', 'l4' of 'l40s') must
# come after it.
PEAK_FLOPS: dict[str, float] = {
    # Google TPU (cloud.google.com/tpu/docs/system-architecture-tpu-vm and per-version pages).
    # v2 and v3 expose each of the chip's two TensorCores as a JAX device, so per device is half
    # the per-chip number; v4 and v5p are megacore (one device per chip).
    'tpu v6 lite': 918e12,   # v6e / Trillium, 918 TFLOP/s per chip
    'tpu v6e': 918e12,
    'tpu v5 lite': 197e12,   # v5e, 197 TFLOP/s per chip
    'tpu v5e': 197e12,
    'tpu v5p': 459e12,
    'tpu v5': 459e12,        # v5p reports its kind as 'TPU v5'
    'tpu v4': 275e12,
    'tpu v3': 61.5e12,       # 123 TFLOP/s per chip, 2 cores
    'tpu v2': 22.5e12,       # 45 TFLOP/s per chip, 2 cores
    # NVIDIA (datasheets; the "with sparsity" numbers halved).
    'gb200': 2.5e15,         # per Blackwell GPU in a GB200 superchip
    'b200': 2.25e15,         # HGX B200: 18 PFLOP/s sparse per 8 GPUs
    'b100': 1.75e15,
    'gh200': 989e12,         # Hopper GPU of the Grace Hopper superchip
    'h200': 989e12,          # same tensor cores as H100 SXM
    'h100 pcie': 756e12,
    'h100 nvl': 835e12,      # 1,671 TFLOP/s sparse per GPU
    'h100': 989e12,          # SXM ('NVIDIA H100 80GB HBM3'): 1,979 sparse
    'h800': 989e12,
    'a100': 312e12,          # SXM and PCIe
    'a800': 312e12,
    'l40s': 362e12,          # 733 sparse
    'l40': 181e12,
    'nvidia l4': 121e12,     # 242 sparse
    'a10g': 125e12,          # AWS's A10 variant; AWS publishes no tensor peak, A10 datasheet used
    'nvidia a10': 125e12,
    'a6000': 154.8e12,       # RTX A6000, 309.7 sparse
    'v100s': 130e12,         # Volta has no bf16 tensor cores: fp16 tensor peak
    'v100-pcie': 112e12,
    'v100': 125e12,          # SXM2
    't4': 65e12,             # fp16 tensor peak, no bf16
    # AMD (Instinct datasheets).
    'mi300x': 1307.4e12,
    'mi325x': 1307.4e12,
}


def lookup_peak_flops(device_kind: str) -> tuple[float, str] | None:
    """The table entry whose key occurs in `device_kind` first, as (flops, key); None if none."""
    kind = device_kind.lower()
    for key, flops in PEAK_FLOPS.items():
        if key in kind:
            return flops, key
    return None


def measure_matmul_flops(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 5,
                         device: jax.Device | None = None) -> float:
    """Best FLOP/s of a jitted n×n matmul on one device (default: the first device)."""
    device = device or jax.devices()[0]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(kb, (n, n), dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()   # compile and warm caches outside the timed runs
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / max(best, 1e-12)


@functools.cache
def _measured_peak(platform: str, device_kind: str) -> float:
    # Keyed by (platform, kind) rather than the device so that the 8 simulated CPU devices, or
    # many unknown accelerators of one kind, share a single measurement per process.
    device = next(d for d in jax.devices(platform) if d.device_kind == device_kind)
    # CPUs run bf16 matmuls slowly (no native support), so measure what CPU runs use.
    dtype = jnp.float32 if platform == 'cpu' else jnp.bfloat16
    return measure_matmul_flops(dtype=dtype, device=device)


def peak_flops(device: jax.Device, override: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number came from."""
    if override > 0:
        return float(override), 'config'
    found = lookup_peak_flops(device.device_kind)
    if found is not None and device.platform != 'cpu':
        return found[0], f'table: {found[1]}'
    flops = _measured_peak(device.platform, device.device_kind)
    if device.platform == 'cpu':
        return flops, 'measured matmul'
    # A measured bf16 matmul is below the datasheet peak, so MFU here reads high.
    return flops, f'measured matmul (unknown accelerator {device.device_kind!r})'


def total_peak_flops(devices: Sequence[jax.Device], override: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of all `devices` together and where the number came from."""
    if not devices:
        raise ValueError('total_peak_flops needs at least one device.')
    per_device, source = peak_flops(devices[0], override)
    if devices[0].platform == 'cpu' and override <= 0:
        # Simulated CPU devices (--xla_force_host_platform_device_count) all run on the same
        # physical cores, and XLA's CPU matmul already uses every core, so the single-device
        # measurement is the whole host's peak; multiplying by the device count would
        # understate MFU by that factor.
        return per_device, source
    return per_device * len(devices), source


def mfu(flops_per_s: float, peak_total: float) -> float:
    """Model FLOPs utilization as a fraction; 0 when the peak is unknown."""
    return flops_per_s / peak_total if peak_total > 0 else 0.0


class Throughput:
    """Tokens/s and FLOP/s between consecutive `update` calls (or since `reset`).

    Pass to `update` only the work done since the previous `update`/`reset`; call `reset()`
    after an eval or checkpoint pause so the pause is not counted as training time.
    """

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def reset(self) -> None:
        """Restart the clock now."""
        self._last = time.perf_counter()

    def update(self, tokens: float, flops: float, steps: int = 0) -> dict[str, float]:
        """Rates over the time since the last call; also seconds per step when steps > 0."""
        now = time.perf_counter()
        elapsed = max(now - self._last, 1e-9)
        self._last = now
        rates = {'tokens_per_s': tokens / elapsed, 'flops_per_s': flops / elapsed}
        if steps > 0:
            rates['step_time_s'] = elapsed / steps
        return rates


# --- Formatting ---------------------------------------------------------------------------

# Metrics shown first and how they are labelled; the rest follow in the order given.
_LEADING = ('loss', 'lr', 'tokens_per_s', 'mfu')
_LABELS = {'tokens_per_s': 'tok/s', 'flops_per_s': 'flop/s', 'step_time_s': 's/step'}
_NONFINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}


def _si(x: float) -> str:
    for unit, scale in (('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
        if abs(x) >= scale:
            return f'{x / scale:.3g}{unit}'
    return f'{x:.3g}'


def format_value(name: str, value: float | int) -> str:
    """A metric value written compactly for humans, by what its name says it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if name == 'mfu':
        return f'{100 * value:.1f}%'
    if name == 'lr' or name.endswith('_lr'):
        return f'{value:.1e}'
    if name.endswith('tokens_per_s'):
        return f'{value:,.0f}'
    if name.endswith('per_s'):
        return _si(value)
    if name.endswith('time_s'):
        return format_duration(value) if value >= 60 else f'{value:.3g}s'
    if isinstance(value, (bool, int)):
        return f'{value:,}'
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f'{value:.3e}'
    return f'{value:.4g}'


def format_duration(seconds: float) -> str:
    """E.g. '42s', '3m07s', '2h05m', '1d03h'."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m{s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h{s % 3600 // 60:02d}m'
    return f'{s // 86400}d{s % 86400 // 3600:02d}h'


def _ordered(metrics: Mapping[str, Any]) -> list[str]:
    first = [k for k in _LEADING if k in metrics]
    return first + [k for k in metrics if k not in _LEADING]


def format_metrics(step: int, metrics: Mapping[str, Any], *, total_steps: int = 0,
                   split: str = 'train', eta_s: float | None = None) -> str:
    """One log line: 'step 120/500 | loss 2.314 | lr 3.0e-03 | tok/s 3,412 | mfu 31.2% | ...'."""
    head = f'step {step}/{total_steps}' if total_steps > 0 else f'step {step}'
    if split != 'train':
        head = f'[{split}] {head}'
    parts = [head]
    for name in _ordered(metrics):
        value = _to_python(name, metrics[name])
        parts.append(f'{_LABELS.get(name, name)} {format_value(name, value)}')
    if eta_s is not None:
        parts.append(f'eta {format_duration(eta_s)}')
    return ' | '.join(parts)


def _progress_line(step: int, metrics: Mapping[str, Any], total_steps: int,
                   eta_s: float | None, width: int) -> str:
    parts = []
    if total_steps > 0:
        filled = min(20, int(20 * step / total_steps))
        parts.append(f'[{"#" * filled}{"." * (20 - filled)}] {step}/{total_steps}')
    else:
        parts.append(f'step {step}')
    for name in _LEADING:
        if name != 'lr' and isinstance(metrics.get(name), (int, float)):
            parts.append(f'{_LABELS.get(name, name)} {format_value(name, metrics[name])}')
    if eta_s is not None:
        parts.append(f'eta {format_duration(eta_s)}')
    # A line wider than the terminal wraps, and '\r' would then redraw only its last row.
    return ' | '.join(parts)[:max(width - 1, 20)]


# --- Values -------------------------------------------------------------------------------

def _to_python(name: str, value: Any) -> float | int | bool:
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        arr = np.asarray(value)
        if arr.size != 1:
            raise TypeError(f'Metric {name!r} must be a scalar, got shape {arr.shape}.')
        return arr.reshape(()).item()
    raise TypeError(f'Metric {name!r} has unsupported type {type(value).__name__}.')


def _parsed_lines(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every line of a metrics.jsonl that parses; the others are skipped."""
    out = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logging.warning('%s:%d: skipping a line that is not JSON (an interrupted write?)',
                                path, lineno)
                continue
            if isinstance(record, dict):
                out.append((line if line.endswith('\n') else line + '\n', record))
    return out


def truncate_metrics(path: str, last_step: int) -> int:
    """Keeps only the records with step <= `last_step`, in order; returns how many were dropped.

    For a run resumed from the checkpoint of `last_step`: it logs every later step again, so
    the rows of the stretch after that checkpoint (and a torn last line) must go. The file is
    replaced atomically (write, then rename), so a kill here leaves the old or the new file.
    """
    if not os.path.exists(path):
        return 0
    with open(path, 'rb') as f:
        total = sum(1 for line in f if line.strip())
    kept = [line for line, record in _parsed_lines(path)
            if isinstance(record.get('step'), int) and record['step'] <= last_step]
    if len(kept) == total:
        return 0
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return total - len(kept)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl, with 'nan'/'inf'/'-inf' strings back as floats.

    A line that does not parse (the tail of a killed write) is skipped with a warning.
    """
    records = []
    for _, record in _parsed_lines(path):
        for k, v in record.items():
            if k != 'split' and isinstance(v, str) and v in _NONFINITE:
                record[k] = _NONFINITE[v]
        records.append(record)
    return records


# --- Writer -------------------------------------------------------------------------------

_WRITER_COUNT = itertools.count()


def _drop_torn_tail(path: str) -> None:
    """Cuts a last line without its newline (a killed write): it would break line readers.

    A last line that is a whole record and lacks only the newline gets the newline instead.
    """
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, 'rb+') as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        window = min(size, 1 << 20)
        f.seek(size - window)
        tail = f.read()
        if tail.endswith(b'\n'):
            return
        cut = tail.rfind(b'\n')
        if cut < 0 and window < size:   # a line longer than 1 MiB is not ours: leave it alone
            return
        try:
            json.loads(tail[cut + 1:])
        except ValueError:
            f.truncate(size - window + cut + 1)
        else:
            f.write(b'\n')


class MetricsWriter:
    """Writes metrics to <workdir>/metrics.jsonl, TensorBoard (<workdir>/tb) and the console.

    With active=False (every process but 0 in a multi-host run) every method does nothing and
    no file is created. `stream` is where progress goes (stderr by default); when it is a TTY
    the train metrics redraw one line, otherwise they are logged through absl.
    """

    def __init__(self, workdir: str, *, active: bool = True, total_steps: int = 0,
                 tensorboard: bool = True, stream: TextIO | None = None,
                 resume_step: int | None = None) -> None:
        """resume_step: the step the run (re)starts from (0 for a fresh start). The records of
        later steps, left by an earlier attempt that was killed, are dropped from metrics.jsonl
        and hidden in TensorBoard, so each step is logged once. None appends to what is there.
        """
        self.active = active
        self.total_steps = total_steps
        self.path = os.path.join(workdir, 'metrics.jsonl')
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, 'isatty', lambda: False)())
        self._progress = ''       # the progress line now on screen (TTY mode)
        self._first: tuple[int, float] | None = None   # (step, time) of the first train write
        self._file = None
        self._tb = None
        self._closed = False
        if not active:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None:
            dropped = truncate_metrics(self.path, resume_step)
            if dropped:
                logging.info('%s: dropped %d record(s) after step %d, logged before the restart',
                             self.path, dropped, resume_step)
        _drop_torn_tail(self.path)
        self._file = open(self.path, 'a', encoding='utf-8')
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported here: only process 0 needs it
            # purge_step writes a session-start event: TensorBoard then hides every earlier
            # event at a step >= resume_step + 1, i.e. those of the stretch logged again.
            purge = None if resume_step is None else resume_step + 1
            # The suffix keeps two writers started in the same second (a restart loop) from
            # sharing one events file name, which would overwrite the first file.
            suffix = f'.{os.getpid()}.{next(_WRITER_COUNT)}'
            self._tb = SummaryWriter(logdir=os.path.join(workdir, 'tb'), flush_secs=10,
                                     purge_step=purge, filename_suffix=suffix)

    def write(self, step: int, metrics: Mapping[str, Any], split: str = 'train') -> None:
        """Record `metrics` at `step` under `split` ('train', 'eval', ...)."""
        if not self.active:
            return
        if self._closed:
            raise RuntimeError('MetricsWriter.write after close().')
        if 'step' in metrics or 'split' in metrics:
            raise ValueError("Metric names 'step' and 'split' are reserved.")
        values = {name: _to_python(name, v) for name, v in metrics.items()}
        record = {'step': int(step), 'split': split}
        record.update({k: jsonable(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()   # a kill loses at most the line being written
        if self._tb is not None:
            for name, v in values.items():
                self._tb.add_scalar(f'{split}/{name}', float(v), int(step))
        self._show(int(step), values, split)

    def text(self, msg: str) -> None:
        """A plain log line; in TTY mode printed above the progress line."""
        if not self.active:
            return
        if self._tty:
            self._print_above(msg)
        else:
            logging.info('%s', msg)

    def _eta(self, step: int) -> float | None:
        # Average wall time per step since this writer's first train write, so pauses for eval
        # and checkpoints (which recur) are included in the estimate.
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)
            return None
        first_step, first_time = self._first
        if self.total_steps <= 0 or step <= first_step:
            return None
        per_step = (now - first_time) / (step - first_step)
        return max(self.total_steps - step, 0) * per_step

    def _show(self, step: int, values: Mapping[str, Any], split: str) -> None:
        eta = self._eta(step) if split == 'train' else None
        if not self._tty:
            logging.info('%s', format_metrics(step, values, total_steps=self.total_steps,
                                              split=split, eta_s=eta))
        elif split == 'train':
            width = shutil.get_terminal_size().columns
            self._progress = _progress_line(step, values, self.total_steps, eta, width)
            self._stream.write('\r\x1b[K' + self._progress)
            self._stream.flush()
        else:
            self._print_above(format_metrics(step, values, total_steps=self.total_steps,
                                             split=split))

    def _print_above(self, line: str) -> None:
        # Clear the progress line, print the message on its own line, then redraw progress.
        self._stream.write('\r\x1b[K' + line + '\n' + self._progress)
        self._stream.flush()

    def close(self) -> None:
        """Flush and close the files; safe to call twice."""
        if not self.active or self._closed:
            return
        self._closed = True
        if self._tty and self._progress:
            self._stream.write('\n')
            self._stream.flush()
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> 'MetricsWriter':
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
