"""The benchmark scripts run end to end at tiny sizes (structure of their output, not timings)."""

import json

import pytest

from benchmarks import attention_speed, gpu_mfu


def test_gpu_mfu_tiny_path(tmp_path):
    out = tmp_path / 'mfu.json'
    result = gpu_mfu.main(['--tiny', '--steps=2', '--warmup=1', f'--out={out}'])
    assert result['tiny'] and result['peak_flops'] > 0
    assert [r['impl'] for r in result['rows']] == ['dot_product', 'blockwise']
    for row in result['rows']:
        assert row['tokens_per_s'] > 0 and row['timed_steps'] >= 2
        assert 0 < row['mfu'] and row['params'] > 0
        assert row['loss_first'] > 0 and row['loss_last'] > 0
    assert json.loads(out.read_text())['rows'][0]['impl'] == 'dot_product'
    # The kernel check: each kernel against xla, two masks, two dtypes; all within tolerance.
    checks = result['checks']
    assert {(c['impl'], c['mask'], c['dtype']) for c in checks} == {
        (i, m, d) for i in ('dot_product', 'blockwise') for m in ('causal', 'block_causal')
        for d in ('float32', 'bfloat16')}
    assert all(c['ok'] and set(c['relative_error']) == {'loss', 'dq', 'dk', 'dv'} for c in checks)
    assert result['measured_matmul_flops'] > 0


@pytest.mark.slow   # minutes of compiling on 2 cores; the kernels themselves: test_attention.py
def test_attention_speed_tiny(tmp_path):
    prefix = tmp_path / 'attention'
    # One speed length (reference vs trainer xla); two long lengths for the memory fit, with
    # the batch-1 speed row reused as the first long cell.
    result = attention_speed.main([
        '--lengths=32:1', '--impls=xla', '--d_model=64', '--layers=1', '--long_layers=1',
        '--long_lengths=32,64', '--long_models=xla', '--rounds=1', '--long_repeats=1',
        f'--out={prefix}'])
    (row,) = result['speed']
    assert set(row['cases']) == {'reference', 'xla'}
    case = row['cases']['xla']
    assert case['ratio_wall'] > 0 and case['ratio_cpu'] > 0 and len(case['wall_s']) == 1
    assert case['memory_bytes'] > 0 and case['compile_s'] > 0
    assert result['long']['xla']['32']['source'].startswith('speed part')
    assert result['long']['xla']['64']['tokens_per_s'] > 0
    verdicts = {g['goal']: g['met'] for g in result['goals']}
    assert all(v in (True, False, None) for v in verdicts.values())
    assert any(goal.startswith('trainer (xla)') for goal in verdicts)
    for ext in ('.json', '.md', '.png'):
        assert (tmp_path / f'attention{ext}').stat().st_size > 0
    assert '## Goals' in (tmp_path / 'attention.md').read_text()
