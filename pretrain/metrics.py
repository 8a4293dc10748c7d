"""Throughput and the metrics writer (JSONL, TensorBoard, optional Weights & Biases, the console
line and progress bar).

Peak FLOP/s and MFU live in pretrain/peak_flops.py.

The JSONL file is the durable record of a run: one JSON object per `write`, flushed line by
line. TensorBoard and the progress line are conveniences on top of it.
"""

import hashlib
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
import numpy as np
from absl import logging

from pretrain.jsonable import jsonable

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


def _groups(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """{'hidden': v, ...} from the 'prefix/<group>' metrics."""
    return {k[len(prefix) + 1:]: v for k, v in metrics.items() if k.startswith(prefix + '/')}


def _all_equal(values: Sequence[float]) -> bool:
    return all(math.isclose(v, values[0], rel_tol=1e-6, abs_tol=0.0) for v in values)


def _rate_parts(metrics: Mapping[str, Any]) -> list[str]:
    """'lr 3.0e-03' when every LR group agrees (SP), else one value per group; weight decay
    only when its decayed groups differ (µP's per-group rules)."""
    parts = []
    lr_groups = _groups(metrics, 'lr')
    if lr_groups and not _all_equal(list(lr_groups.values())):
        parts.append('lr ' + ' '.join(f'{g} {format_value("lr", v)}' for g, v in lr_groups.items()))
    elif 'lr' in metrics or lr_groups:
        parts.append(f'lr {format_value("lr", metrics.get("lr", next(iter(lr_groups.values()), 0.0)))}')
    # Groups without decay (norm gains, biases: 0 by design) do not make the decay differ.
    wd_groups = {g: v for g, v in _groups(metrics, 'wd').items() if v != 0}
    if wd_groups and not _all_equal(list(wd_groups.values())):
        parts.append('wd ' + ' '.join(f'{g} {format_value("lr", v)}' for g, v in wd_groups.items()))
    return parts


def _console_parts(metrics: Mapping[str, Any]) -> list[str]:
    """The few train metrics a person watches; the rest are in metrics.jsonl / TensorBoard."""
    parts = []
    if 'loss' in metrics:
        parts.append(f'loss {format_value("loss", metrics["loss"])}')
    if 'tokens_per_s' in metrics:
        parts.append(f'{format_value("tokens_per_s", metrics["tokens_per_s"])} tok/s')
    if metrics.get('mfu'):
        parts.append(f'mfu {format_value("mfu", metrics["mfu"])}')
    parts += _rate_parts(metrics)
    if metrics.get('skipped'):
        parts.append(f'skipped {int(metrics["skipped"])}')
    return parts


def format_metrics(step: int, metrics: Mapping[str, Any], *, total_steps: int = 0,
                   split: str = 'train', eta_s: float | None = None,
                   elapsed_s: float | None = None) -> str:
    """One short console line.

    Train: 'step 120/500 | loss 2.314 | 3,412 tok/s | mfu 31.2% | lr 3.0e-03 | eta 3m07s |
    elapsed 1m02s' (LR per group only when the groups differ). Other splits show every metric:
    '[eval] step 200/500 | loss 1.41 | bits_per_byte 2.03'.
    """
    head = f'step {step}/{total_steps}' if total_steps > 0 else f'step {step}'
    if split != 'train':
        parts = [f'[{split}] {head}']
        for name in _ordered(metrics):
            value = _to_python(name, metrics[name])
            parts.append(f'{_LABELS.get(name, name)} {format_value(name, value)}')
        return ' | '.join(parts)
    values = {name: _to_python(name, v) for name, v in metrics.items()}
    parts = [head] + _console_parts(values)
    if eta_s is not None:
        parts.append(f'eta {format_duration(eta_s)}')
    if elapsed_s is not None:
        parts.append(f'elapsed {format_duration(elapsed_s)}')
    return ' | '.join(parts)


_BAR = 20   # characters of the TTY progress bar


def _progress_line(step: int, metrics: Mapping[str, Any], total_steps: int,
                   eta_s: float | None, width: int, elapsed_s: float | None = None) -> str:
    line = format_metrics(step, metrics, total_steps=total_steps, eta_s=eta_s,
                          elapsed_s=elapsed_s)
    if total_steps > 0:
        filled = min(_BAR, int(_BAR * step / total_steps))
        line = f'[{"#" * filled}{"." * (_BAR - filled)}] {line[len("step "):]}'
    # A line wider than the terminal wraps, and '\r' would then redraw only its last row.
    return line[:max(width - 1, 20)]


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


def wandb_run_id(workdir: str) -> str:
    """The W&B run id of `workdir`: the same for every attempt (a resume continues that run)."""
    digest = hashlib.sha256(os.path.abspath(workdir).encode('utf-8')).hexdigest()
    return f'pretrain-{digest[:16]}'


def _start_wandb(workdir: str, project: str, mode: str, run_config: Mapping[str, Any] | None):
    import wandb  # imported here: only a run with metrics.wandb_project set needs it

    return wandb.init(
        project=project, dir=workdir, mode=mode, config=dict(run_config or {}),
        id=wandb_run_id(workdir), name=os.path.basename(os.path.abspath(workdir)),
        resume='allow',
        # The trainer owns the console (its progress line redraws stderr): W&B must not wrap it.
        settings=wandb.Settings(console='off'))


class MetricsWriter:
    """Writes metrics to <workdir>/metrics.jsonl, TensorBoard (<workdir>/tb) and the console,
    and to Weights & Biases when `wandb_project` is set.

    With active=False (every process but 0 in a multi-host run) every method does nothing and
    no file is created. `stream` is where the console lines go (stderr by default): when it is
    a TTY the train metrics redraw one progress-bar line, otherwise each is a plain line. The
    console shows a few metrics (`format_metrics`); the files get every one. W&B gets every row
    of metrics.jsonl at the same step, as '<split>/<name>' (TensorBoard's names).
    """

    def __init__(self, workdir: str, *, active: bool = True, total_steps: int = 0,
                 tensorboard: bool = True, stream: TextIO | None = None,
                 resume_step: int | None = None, wandb_project: str = '',
                 wandb_mode: str = 'offline',
                 run_config: Mapping[str, Any] | None = None) -> None:
        """resume_step: the step the run (re)starts from (0 for a fresh start). The records of
        later steps, left by an earlier attempt that was killed, are dropped from metrics.jsonl
        and hidden in TensorBoard, so each step is logged once. None appends to what is there.

        wandb_project: '' (off: wandb is not imported) or the W&B project; the run is
        `wandb_run_id(workdir)` under <workdir>/wandb, resumed when it exists, in `wandb_mode`,
        with `run_config` as its config. W&B keeps the rows an earlier attempt logged past
        resume_step (it refuses steps below its last one), so after a restart its history
        continues from the killed attempt's last logged step; metrics.jsonl is the exact record.
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
        self._wandb = None
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
        if wandb_project:
            self._wandb = _start_wandb(workdir, wandb_project, wandb_mode, run_config)

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
        if self._wandb is not None:
            self._wandb.log({f'{split}/{name}': v for name, v in values.items()}, step=int(step))
        self._show(int(step), values, split)

    def text(self, msg: str) -> None:
        """A plain line; in TTY mode printed above the progress line."""
        if not self.active:
            return
        self._elapsed()   # the clock of 'elapsed' starts with the first message
        if self._tty:
            self._print_above(msg)
        else:
            self._print(msg)

    # Set on the first message or write; a class default keeps __init__ to the files.
    _started: float | None = None

    def _elapsed(self) -> float:
        now = time.perf_counter()
        if self._started is None:
            self._started = now
        return now - self._started

    def _eta(self, step: int, values: Mapping[str, Any]) -> float | None:
        # First write: the interval's own seconds per step (compile excluded by the trainer's
        # throughput clock). Later: the average wall time per step since the first write, so
        # pauses for eval and checkpoints (which recur) are included in the estimate.
        now = time.perf_counter()
        remaining = max(self.total_steps - step, 0)
        if self._first is None:
            self._first = (step, now)
            per_step = values.get('step_time_s')
            if self.total_steps <= 0 or not isinstance(per_step, (int, float)) or per_step <= 0:
                return None
            return remaining * float(per_step)
        first_step, first_time = self._first
        if self.total_steps <= 0 or step <= first_step:
            return None
        return remaining * (now - first_time) / (step - first_step)

    def _show(self, step: int, values: Mapping[str, Any], split: str) -> None:
        elapsed = self._elapsed()
        if split != 'train':
            line = format_metrics(step, values, total_steps=self.total_steps, split=split)
            self._print_above(line) if self._tty else self._print(line)
            return
        eta = self._eta(step, values)
        if self._tty:
            width = shutil.get_terminal_size().columns
            self._progress = _progress_line(step, values, self.total_steps, eta, width, elapsed)
            self._stream.write('\r\x1b[K' + self._progress)
            self._stream.flush()
        else:
            self._print(format_metrics(step, values, total_steps=self.total_steps, eta_s=eta,
                                       elapsed_s=elapsed))

    def _print(self, line: str) -> None:
        self._stream.write(line + '\n')
        self._stream.flush()

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
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> 'MetricsWriter':
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
