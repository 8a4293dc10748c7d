"""The optional Weights & Biases writer (metrics.wandb_project, metrics.wandb_mode)."""

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from pretrain import train
from pretrain.errors import ConfigError
from pretrain.metrics import read_metrics, wandb_run_id
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RUN_WITHOUT_WANDB = """
import sys
from pretrain import train
from tests.helpers import tiny_config
train.run(tiny_config(steps=3), sys.argv[1])
print('wandb imported:', 'wandb' in sys.modules)
"""


def test_wandb_is_not_imported_when_off(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, '-c', _RUN_WITHOUT_WANDB, str(tmp_path / 'run')],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'wandb imported: False' in out.stdout
    assert not os.path.exists(tmp_path / 'run' / 'wandb')


def test_bad_wandb_settings_are_config_errors(tmp_path, monkeypatch):
    c = tiny_config()
    c.metrics.wandb_mode = 'offlne'
    with pytest.raises(ConfigError, match=r"metrics.wandb_mode='offlne'.*'offline'"):
        train.run(c, str(tmp_path / 'a'))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *rest: None if name == 'wandb' else find_spec(name, *rest))
    c = tiny_config()
    c.metrics.wandb_project = 'pretrain-test'
    with pytest.raises(ConfigError, match=r"metrics.wandb_project='pretrain-test' needs the wandb"):
        train.run(c, str(tmp_path / 'b'))
    assert not os.listdir(tmp_path)


def _log_records(path: str):
    """The records of a W&B transaction log (.wandb): LevelDB-style 32 KiB blocks of chunks
    (crc32, length, kind: 1 whole, 2 first, 3 middle, 4 last) after a 7-byte file header."""
    with open(path, 'rb') as f:
        data = f.read()
    assert data[:4] == b':W&B'
    position, block, pending = 7, 32768, b''
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:   # a block's tail too short for a chunk header is zero padding
            position += left
            continue
        _, length, kind = struct.unpack('<IHB', data[position:position + 7])
        payload = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload


def _wandb_history(run_dir: str) -> tuple[dict[int, dict], dict]:
    """({step: {name: value}}, config) logged in one offline run directory."""
    from wandb.proto import wandb_internal_pb2

    history, config = {}, {}
    for payload in _log_records(glob.glob(os.path.join(run_dir, 'run-*.wandb'))[0]):
        record = wandb_internal_pb2.Record.FromString(payload)
        kind = record.WhichOneof('record_type')
        if kind == 'history':
            row = history.setdefault(record.history.step.num, {})
            for item in record.history.item:
                row[item.key or '/'.join(item.nested_key)] = json.loads(item.value_json)
        elif kind == 'run':
            for item in record.run.config.update:
                config[item.key or '/'.join(item.nested_key)] = json.loads(item.value_json)
    return history, config


def test_wandb_offline_run_holds_the_metrics_rows_and_resumes(tmp_path):
    pytest.importorskip('wandb')
    workdir = str(tmp_path / 'run')
    c = tiny_config(steps=2, eval_every=2)
    c.checkpoint.every_steps = 2
    c.schedule.total_steps = 6   # the same schedule in both attempts, so the resume is allowed
    c.metrics.update(wandb_project='pretrain-test', wandb_mode='offline')
    train.run(c, workdir)
    c.train.steps = 3   # resumed from step 2: the same W&B run id continues
    train.run(c, workdir)

    run_dirs = sorted(glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*')))
    assert len(run_dirs) == 2
    assert all(d.endswith(wandb_run_id(workdir)) for d in run_dirs)
    history, config = {}, {}
    for run_dir in run_dirs:
        part, config = _wandb_history(run_dir)
        for step, row in part.items():
            history.setdefault(step, {}).update(row)
    assert config['model']['d_model'] == 32 and config['metrics']['wandb_mode'] == 'offline'
    rows = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
    assert {r['split'] for r in rows} == {'train', 'eval'}
    assert sorted(history) == sorted({r['step'] for r in rows}) == [1, 2, 3]
    for row in rows:
        logged = history[row['step']]
        for name, value in row.items():
            if name not in ('step', 'split'):
                assert logged[f'{row["split"]}/{name}'] == pytest.approx(value), (row, name)
