"""Tests for pretrain/metrics.py: peak FLOPs, MFU, throughput and the metrics writer."""

import glob
import io
import json
import math
import os
import struct
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain import metrics as M
from pretrain import peak_flops as P


def fake_device(kind: str, platform: str = 'gpu') -> SimpleNamespace:
    return SimpleNamespace(device_kind=kind, platform=platform)


# --- Peak FLOPs and MFU -------------------------------------------------------------------

@pytest.mark.parametrize('kind, flops, key', [
    ('NVIDIA H100 80GB HBM3', 989e12, 'h100'),
    ('NVIDIA H100 PCIe', 756e12, 'h100 pcie'),
    ('NVIDIA H200', 989e12, 'h200'),
    ('NVIDIA GH200 480GB', 989e12, 'gh200'),
    ('NVIDIA A100-SXM4-80GB', 312e12, 'a100'),
    ('NVIDIA A10G', 125e12, 'a10g'),
    ('NVIDIA L4', 121e12, 'nvidia l4'),
    ('NVIDIA L40S', 362e12, 'l40s'),
    ('NVIDIA B200', 2.25e15, 'b200'),
    ('Tesla V100-SXM2-16GB', 125e12, 'v100'),
    ('TPU v5 lite', 197e12, 'tpu v5 lite'),
    ('TPU v5', 459e12, 'tpu v5'),
    ('TPU v4', 275e12, 'tpu v4'),
    ('TPU v6 lite', 918e12, 'tpu v6 lite'),
    ('TPU v3', 61.5e12, 'tpu v3'),
])
def test_table_lookup(kind, flops, key):
    platform = 'tpu' if kind.startswith('TPU') else 'gpu'
    assert P.peak_flops(fake_device(kind, platform)) == (flops, f'published peak: {key} bfloat16')


@pytest.mark.parametrize('kind, platform, bf16, fp32', [
    ('TPU v4', 'tpu', 275e12, 275e12),           # float32 runs as one bf16 MXU pass
    ('TPU v5 lite', 'tpu', 197e12, 197e12),
    ('TPU v5p', 'tpu', 459e12, 459e12),
    ('TPU v6e', 'tpu', 918e12, 918e12),
    ('NVIDIA A100-SXM4-40GB', 'gpu', 312e12, 156e12),   # float32 on TF32 tensor cores
    ('NVIDIA H100 80GB HBM3', 'gpu', 989e12, 495e12),
    ('NVIDIA H200', 'gpu', 989e12, 495e12),
    ('NVIDIA B200', 'gpu', 2.25e15, 1.1e15),
])
def test_table_has_both_dtypes_for_the_main_accelerators(kind, platform, bf16, fp32):
    device = fake_device(kind, platform)
    assert P.peak_flops(device, dtype='bfloat16')[0] == bf16
    assert P.peak_flops(device, dtype=jnp.bfloat16)[0] == bf16
    flops, source = P.peak_flops(device, dtype='float32')
    assert flops == fp32 and 'float32' in source and 'no float32' not in source


def test_table_without_the_dtype_says_so():
    flops, source = P.peak_flops(fake_device('NVIDIA L4'), dtype='float32')
    assert flops == 121e12 and 'no float32 entry' in source
    with pytest.raises(ValueError, match='float16'):
        P.peak_flops(fake_device('NVIDIA L4'), dtype='float16')


def test_table_prefers_the_most_specific_key():
    # A key found inside a later kind's key must come after it, or the later one never wins.
    keys = list(P.PEAK_FLOPS)
    for i, key in enumerate(keys):
        for later in keys[i + 1:]:
            assert key not in later, f'{key!r} shadows {later!r}'


def test_override_wins():
    source = 'config metrics.peak_flops_per_device'
    assert P.peak_flops(fake_device('NVIDIA H100 80GB HBM3'), 123.0) == (123.0, source)
    assert P.peak_flops(jax.devices()[0], 5e9) == (5e9, source)
    assert P.total_peak_flops([fake_device('TPU v4', 'tpu')] * 4, 1e12) == (
        4e12, f'{source}, x4 devices')


def test_total_peak_multiplies_accelerators():
    devices = [fake_device('TPU v5 lite', 'tpu')] * 8
    assert P.total_peak_flops(devices) == (
        8 * 197e12, 'published peak: tpu v5 lite bfloat16, x8 devices')


@pytest.fixture
def peak_cache(tmp_path, monkeypatch):
    path = tmp_path / 'cache' / 'peak_flops.json'
    monkeypatch.setenv(P.PEAK_CACHE_ENV, str(path))
    return path


def test_cpu_peak_is_measured_once_and_cached(peak_cache):
    calls = []

    def measure(dtype):
        calls.append(jnp.dtype(dtype).name)
        return 4.2e10 + len(calls)      # a second measurement would differ

    first = P.cached_cpu_peak('float32', measure=measure)
    assert first[0] == 4.2e10 + 1 and 'saved to' in first[1] and str(peak_cache) in first[1]
    again = P.cached_cpu_peak('float32', measure=measure)
    assert again[0] == first[0] and 'cached in' in again[1]
    assert calls == ['float32']
    P.cached_cpu_peak('bfloat16', measure=measure)      # another dtype is another entry
    assert calls == ['float32', 'bfloat16']
    stored = json.load(open(peak_cache))
    assert len(stored) == 2 and all(P.cpu_model() in key for key in stored)
    assert any(key.endswith('| float32') for key in stored)


def test_cpu_peak_cache_survives_a_broken_file(peak_cache):
    peak_cache.parent.mkdir(parents=True)
    peak_cache.write_text('{not json')
    flops, source = P.cached_cpu_peak('float32', measure=lambda d: 3e10)
    assert flops == 3e10 and 'saved to' in source
    assert P.cached_cpu_peak('float32', measure=lambda d: 9e10)[0] == 3e10


def test_cpu_peak_default_location_is_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(P.PEAK_CACHE_ENV, raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert P.peak_cache_path() == os.path.join(str(tmp_path), 'pretrain', 'peak_flops.json')


def test_measured_cpu_peak_is_plausible_and_not_multiplied(peak_cache):
    cpu = jax.devices('cpu')[0]
    flops, source = P.peak_flops(cpu)
    assert 'measured float32 matmul' in source
    assert flops > 1e8
    # Simulated CPU devices share the host's cores: the total is the one measurement.
    assert P.total_peak_flops([cpu] * 8)[0] == flops
    assert P.peak_flops(cpu)[0] == flops   # cached, not re-measured


def test_measure_matmul_flops_small():
    assert P.measure_matmul_flops(n=128, dtype=jnp.float32, repeats=2) > 1e6


def test_mfu():
    assert P.mfu(50e12, 200e12) == pytest.approx(0.25)
    assert P.mfu(1.0, 0.0) == 0.0


# --- Throughput ---------------------------------------------------------------------------

def test_throughput(monkeypatch):
    clock = iter([10.0, 12.0, 13.0, 20.0, 20.5])
    monkeypatch.setattr(M.time, 'perf_counter', lambda: next(clock))
    t = M.Throughput()                       # 10.0
    r = t.update(tokens=4000, flops=8e12)    # 12.0: 2 s
    assert r == {'tokens_per_s': 2000.0, 'flops_per_s': 4e12}
    r = t.update(tokens=500, flops=1e12, steps=2)   # 13.0: 1 s
    assert r == {'tokens_per_s': 500.0, 'flops_per_s': 1e12, 'step_time_s': 0.5}
    t.reset()                                # 20.0: the pause 13..20 is dropped
    r = t.update(tokens=100, flops=0)        # 20.5
    assert r['tokens_per_s'] == pytest.approx(200.0)


# --- Writer -------------------------------------------------------------------------------

def test_jsonl_written_converted_and_appended(tmp_path):
    workdir = str(tmp_path / 'run')
    with M.MetricsWriter(workdir, total_steps=10, tensorboard=False) as w:
        w.write(1, {'loss': jnp.float32(2.5), 'lr': np.float64(1e-3), 'tokens': np.int64(7),
                    'grad_norm': jnp.array([1.25])})
        w.write(2, {'loss': float('nan'), 'gap': -math.inf}, split='eval')
    path = os.path.join(workdir, 'metrics.jsonl')
    lines = open(path).read().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first == {'step': 1, 'split': 'train', 'loss': 2.5, 'lr': 1e-3, 'tokens': 7,
                     'grad_norm': 1.25}
    assert isinstance(first['tokens'], int)
    assert json.loads(lines[1])['loss'] == 'nan'   # strict JSON on disk

    # A resumed run appends, and read_metrics restores non-finite floats.
    with M.MetricsWriter(workdir, tensorboard=False) as w:
        w.write(3, {'loss': 1.0})
    records = M.read_metrics(path)
    assert [r['step'] for r in records] == [1, 2, 3]
    assert math.isnan(records[1]['loss']) and records[1]['gap'] == -math.inf


def test_torn_last_line_is_fenced_off(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1, "split": "train", "loss": 3.0}\n{"step": 2, "spl')
    with M.MetricsWriter(str(tmp_path), tensorboard=False) as w:
        w.write(2, {'loss': 2.0})
    assert [(r['step'], r['loss']) for r in M.read_metrics(str(path))] == [(1, 3.0), (2, 2.0)]


def test_bad_metrics_rejected(tmp_path):
    with M.MetricsWriter(str(tmp_path), tensorboard=False) as w:
        with pytest.raises(TypeError):
            w.write(1, {'x': np.zeros(3)})
        with pytest.raises(ValueError):
            w.write(1, {'step': 1})


def test_inactive_writer_is_a_no_op(tmp_path):
    workdir = tmp_path / 'run'
    stream = io.StringIO()
    with M.MetricsWriter(str(workdir), active=False, stream=stream) as w:
        w.write(1, {'loss': 1.0})
        w.text('hello')
    assert not workdir.exists()
    assert stream.getvalue() == ''


def read_tfrecords(path: str) -> list[bytes]:
    """The records of a TFRecord file, checking both CRCs of each."""
    from tensorboardX.record_writer import masked_crc32c
    records = []
    with open(path, 'rb') as f:
        while header := f.read(8):
            (length,) = struct.unpack('<Q', header)
            (header_crc,) = struct.unpack('<I', f.read(4))
            assert header_crc == masked_crc32c(header)
            data = f.read(length)
            (data_crc,) = struct.unpack('<I', f.read(4))
            assert data_crc == masked_crc32c(data)
            records.append(data)
    return records


def test_tensorboard_scalars_readable(tmp_path):
    with M.MetricsWriter(str(tmp_path)) as w:
        w.write(5, {'loss': 2.0, 'mfu': 0.3})
        w.write(10, {'loss': 1.5}, split='eval')
    files = glob.glob(str(tmp_path / 'tb' / 'events.out.tfevents.*'))
    assert len(files) == 1
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        from tensorboardX.proto.event_pb2 import Event
        scalars = {}
        for data in read_tfrecords(files[0]):
            event = Event.FromString(data)
            for value in event.summary.value:
                scalars[value.tag] = (event.step, value.simple_value)
    else:
        acc = EventAccumulator(files[0])
        acc.Reload()
        scalars = {tag: (acc.Scalars(tag)[-1].step, acc.Scalars(tag)[-1].value)
                   for tag in acc.Tags()['scalars']}
    assert scalars['train/loss'] == (5, 2.0)
    assert scalars['train/mfu'] == (5, pytest.approx(0.3))
    assert scalars['eval/loss'] == (10, 1.5)


def test_plain_log_line(tmp_path, monkeypatch):
    clock = iter([0.0, 5.0, 5.0, 6.0])
    monkeypatch.setattr(M.time, 'perf_counter', lambda: next(clock))
    stream = io.StringIO()
    metrics = {'loss': 2.31412, 'lr': 3e-3, 'tokens_per_s': 3412.4, 'mfu': 0.312,
               'grad_norm': 0.5, 'step_time_s': 0.25, 'flops_per_s': 1e9, 'tokens': 1e5,
               'skipped': 0.0, **{f'lr/{g}': 3e-3 for g in ('embedding', 'hidden', 'readout')},
               **{f'wd/{g}': 3e-4 for g in ('embedding', 'hidden', 'readout')}}
    with M.MetricsWriter(str(tmp_path), total_steps=500, tensorboard=False, stream=stream) as w:
        w.text('compiling the train step ...')
        w.write(120, metrics)
        w.write(120, {'loss': 2.5, 'bits_per_byte': 1.9}, split='eval')
    lines = stream.getvalue().splitlines()
    assert lines[0] == 'compiling the train step ...'
    # Short: no absl prefix, no grad/param norms, one lr for five equal groups, no wd; the ETA
    # comes from the first interval's 0.25 s/step x 380 steps left.
    assert lines[1] == ('step 120/500 | loss 2.314 | 3,412 tok/s | mfu 31.2% | lr 3.0e-03 '
                        '| eta 1m35s | elapsed 5s')
    assert lines[2] == '[eval] step 120/500 | loss 2.5 | bits_per_byte 1.9'
    # Every metric is still in the file.
    record = M.read_metrics(str(tmp_path / 'metrics.jsonl'))[0]
    assert set(metrics) <= set(record)


def test_console_line_shows_groups_only_when_they_differ():
    mup = {'loss': 1.0, 'lr': 1e-2, 'lr/hidden': 2.5e-3, 'lr/embedding': 1e-2,
           'wd/hidden': 1e-4, 'wd/embedding': 1e-4, 'skipped': 2.0}
    line = M.format_metrics(7, mup, total_steps=10)
    assert 'lr hidden 2.5e-03 embedding 1.0e-02' in line
    assert 'wd' not in line                   # equal across groups: only in the files
    assert 'skipped 2' in line
    mup['wd/vector'] = 0.0                    # not decayed by design: still no wd shown
    assert 'wd' not in M.format_metrics(7, mup, total_steps=10)
    mup['wd/embedding'] = 4e-4
    assert 'wd hidden 1.0e-04 embedding 4.0e-04' in M.format_metrics(7, mup, total_steps=10)


def test_format_helpers():
    assert M.format_duration(42) == '42s'
    assert M.format_duration(187) == '3m07s'
    assert M.format_duration(7500) == '2h05m'
    assert M.format_value('flops_per_s', 1.5e12) == '1.5T'
    assert M.format_value('loss', float('nan')) == 'nan'
    assert M.format_metrics(3, {'loss': 1.0}, eta_s=61) == 'step 3 | loss 1 | eta 1m01s'


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_progress_line(tmp_path, monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 10.0, 12.0])
    monkeypatch.setattr(M.time, 'perf_counter', lambda: next(clock))
    monkeypatch.setenv('COLUMNS', '200')   # the line is cut to the terminal width
    stream = FakeTTY()
    with M.MetricsWriter(str(tmp_path), total_steps=100, tensorboard=False, stream=stream) as w:
        w.write(10, {'loss': 2.0, 'tokens_per_s': 1000.0, 'mfu': 0.5, 'step_time_s': 0.5})
        w.write(20, {'loss': 1.5, 'tokens_per_s': 1000.0, 'mfu': 0.5, 'step_time_s': 1.0})
        w.text('note')
    out = stream.getvalue()
    assert out.count('\r') == 3 and out.endswith('\n')
    first, last = out.split('\r\x1b[K')[1:3]
    assert 'eta 45s' in first         # at the first write already: 90 steps x 0.5 s
    assert last.startswith('[####................] 20/100 | loss 1.5 | 1,000 tok/s | mfu 50.0%')
    assert 'eta 1m20s' in last       # 10 steps took 10 s, 80 to go
    assert 'elapsed 10s' in last
    assert '\r\x1b[Knote\n' in out


# --- Resumed runs -------------------------------------------------------------------------

def _log_steps(writer, steps, eval_every=4):
    """What the loop logs: a train row per step, then the eval row at eval steps."""
    for step in steps:
        writer.write(step, {'loss': 10.0 / step})
        if step % eval_every == 0:
            writer.write(step, {'loss': 20.0 / step}, split='eval')


def _rows(path):
    return [(r['split'], r['step'], r['loss']) for r in M.read_metrics(path)]


def test_kills_and_resumes_log_every_row_once(tmp_path):
    straight = tmp_path / 'straight'
    with M.MetricsWriter(str(straight), tensorboard=False, resume_step=0) as w:
        _log_steps(w, range(1, 21))
    expected = _rows(straight / 'metrics.jsonl')

    # (the step a kill lands after, the last checkpoint then): each restart resumes there.
    killed = tmp_path / 'killed'
    resume = 0
    for killed_after, checkpoint in [(3, 0), (7, 4), (13, 12), (13, 12), (18, 16)]:
        w = M.MetricsWriter(str(killed), tensorboard=False, resume_step=resume)
        _log_steps(w, range(resume + 1, killed_after + 1))
        w._file.write('{"step": 99, "split": "tr')   # the kill tears the line being written
        w._file.flush()
        resume = checkpoint
    with M.MetricsWriter(str(killed), tensorboard=False, resume_step=resume) as w:
        _log_steps(w, range(resume + 1, 21))
    path = killed / 'metrics.jsonl'
    assert _rows(path) == expected
    for line in open(path):   # a strict line-by-line reader sees only whole records
        json.loads(line)


def test_resume_keeps_the_rows_of_the_checkpoint_step(tmp_path):
    with M.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=0) as w:
        _log_steps(w, range(1, 10))
    with M.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=8):
        pass
    rows = _rows(tmp_path / 'metrics.jsonl')
    assert rows[-2:] == [('train', 8, 10.0 / 8), ('eval', 8, 20.0 / 8)]
    assert max(step for _, step, _ in rows) == 8
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_resume_step_none_appends_and_a_whole_last_record_is_kept(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1, "split": "train", "loss": 3.0}\n{"step": 2, "split": "train", '
                    '"loss": 2.5}')   # complete, only the newline missing
    with M.MetricsWriter(str(tmp_path), tensorboard=False) as w:
        w.write(3, {'loss': 2.0})
    assert [r['step'] for r in M.read_metrics(str(path))] == [1, 2, 3]


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"step": 1, "split": "train", "loss": 3.0}\n{"step": 2, "spl')
    assert [r['step'] for r in M.read_metrics(str(path))] == [1]


def test_tensorboard_resume_purges_the_logged_again_stretch(tmp_path):
    from tensorboardX.proto.event_pb2 import Event
    with M.MetricsWriter(str(tmp_path), resume_step=0) as w:
        _log_steps(w, range(1, 8))
    first = glob.glob(str(tmp_path / 'tb' / 'events.out.tfevents.*'))
    with M.MetricsWriter(str(tmp_path), resume_step=4) as w:   # same process, same second
        _log_steps(w, range(5, 9))
    files = glob.glob(str(tmp_path / 'tb' / 'events.out.tfevents.*'))
    assert len(first) == 1 and len(files) == 2
    events = [Event.FromString(d) for d in read_tfrecords(first[0])]
    assert sorted({e.step for e in events if e.summary.value}) == list(range(1, 8))
    second = next(f for f in files if f not in first)
    events = [Event.FromString(d) for d in read_tfrecords(second)]
    starts = [e.step for e in events if e.HasField('session_log')]
    # TensorBoard drops every earlier event at a step >= 5 when it reads this start marker.
    assert starts == [5]
    first_scalar = next(i for i, e in enumerate(events) if e.summary.value)
    assert first_scalar > events.index(next(e for e in events if e.HasField('session_log')))
