"""Ablation verdicts on synthetic runs whose gaps are known by construction."""

import json

import numpy as np
import pytest

from pretrain.study import ablation

VARIANTS = {
    'mup': ({'parametrization.name': 'mup'}, [-12, -11, -10]),
    'sp': ({'parametrization.name': 'sp'}, [-18, -17, -16]),
    'fix': ({'parametrization.name': 'mup', 'parametrization.output_mult': 32.0}, [-12, -11, -10]),
    'noop': ({'parametrization.name': 'mup', 'optim.weight_decay': 0.0}, [-12, -11, -10]),
}
# Loss at each variant's best LR (the middle of its grid); SP is 0.03 below µP.
LEVEL = {'mup': 1.43, 'sp': 1.40, 'fix': 1.40, 'noop': 1.43}


def _rows(seeds=(0, 1, 2), noise=0.002):
    rng = np.random.default_rng(0)
    rows = []
    for seed in seeds:
        seed_offset = 0.02 * seed   # shared by every variant: pairing by seed removes it
        for label, (overrides, ks) in VARIANTS.items():
            for k in ks:
                loss = LEVEL[label] + 0.01 * (k - ks[1]) ** 2 + seed_offset + rng.normal(0, noise)
                point = {**overrides, 'model.d_model': 128, 'seed': seed, 'optim.lr': 2.0 ** (k / 2)}
                rows.append({'status': 'done', 'final_loss': loss, 'point': point})
    rows.append({'status': 'done', 'final_loss': 0.0,   # another sweep's point: not a variant
                 'point': {'parametrization.name': 'mup', 'model.d_model': 128, 'seed': 0,
                           'optim.lr': 0.01, 'model.init_std': 0.5}})
    return rows


def test_gap_and_verdicts_by_construction():
    result = ablation.report(_rows(), VARIANTS, ('mup', 'sp'))
    assert result['gap']['mean'] == pytest.approx(-0.03, abs=0.005)
    assert result['gap']['interval'][1] < 0
    by_label = {c['variant']: c for c in result['comparisons']}
    assert by_label['fix']['gap_closed'] == pytest.approx(1.0, abs=0.2)
    assert by_label['fix']['verdict_vs_mup'] == 'better than mup'
    assert by_label['fix']['verdict_vs_sp'] == 'not distinguishable'
    assert by_label['noop']['verdict_vs_mup'] == 'no difference shown'
    assert by_label['noop']['verdict_vs_sp'] == 'still worse than sp'
    assert result['variants']['sp']['lr'] == pytest.approx(2.0 ** -8.5)
    assert not result['variants']['sp']['at_edge']
    assert set(result['variants']) == set(VARIANTS)   # the foreign point matched no variant


def test_one_seed_gives_no_verdict_and_markdown_renders():
    result = ablation.report(_rows(seeds=(0,)), VARIANTS, ('mup', 'sp'))
    assert {c['verdict_vs_mup'] for c in result['comparisons']} == {'not shown'}
    text = ablation.markdown(result)
    assert '| fix |' in text and 'Gap (sp minus mup' in text
    json.loads(ablation.transfer.to_json(result))


def test_missing_reference_reports_no_gap():
    rows = [r for r in _rows() if r['point']['parametrization.name'] != 'sp']
    result = ablation.report(rows, VARIANTS, ('mup', 'sp'))
    assert result['gap'] is None and result['comparisons'] == []


def test_command_line_on_the_real_sweep_file(tmp_path):
    import subprocess
    import sys
    from configs.sweeps import mutransfer_ablation
    rows = []
    for label, (overrides, ks) in mutransfer_ablation.VARIANTS.items():
        for seed in (0, 1):
            for k in ks:
                rows.append({'status': 'done', 'final_loss': 1.4 + 0.001 * k * k + 0.01 * seed,
                             'point': {**overrides, 'model.d_model': 128, 'seed': seed,
                                       'optim.lr': 2.0 ** (k / 2)}})
    (tmp_path / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    done = subprocess.run([sys.executable, '-m', 'pretrain.study.ablation',
                           '--sweep=configs/sweeps/mutransfer_ablation.py', f'--sweep_dir={tmp_path}'],
                          capture_output=True, text=True, cwd=ablation.sweep_lib.ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / 'ablation.md').read_text()
    assert all(f'| {label} |' in text for label in mutransfer_ablation.VARIANTS)


def test_base_check_compares_at_the_best_shared_lr_paired_by_seed():
    from experiments import mutransfer_base_check as base_check
    from pretrain.study.transfer import Grid
    tuned = Grid((0, 1, 2), (0.01, 0.02, 0.04), np.array([[1.60, 1.58, 1.61],
                                                          [1.62, 1.60, 1.63],
                                                          [1.61, 1.59, 1.62]]))
    rebased = Grid((0, 1, 2), (0.02, 0.04, 0.08), np.array([[1.57, 1.56, 1.70],
                                                            [1.59, 1.58, 1.70],
                                                            [1.58, 1.57, 1.70]]))
    result = base_check.compare(tuned, rebased)
    assert result['shared_lrs'] == [0.02, 0.04]    # 0.08 was not run by the tuned base
    assert result['best']['tuned']['lr'] == 0.02 and result['best']['rebased']['lr'] == 0.04
    assert result['difference']['mean'] == pytest.approx(-0.02)
    assert result['verdict'] == 'rebased better'
    assert 'rebased better' in base_check.markdown(result, 'title')


def _parabola_grid(centre_log2: float, ks, seeds=(0, 1, 2), noise=0.001):
    from pretrain.study.transfer import Grid
    rng = np.random.default_rng(int(10 * abs(centre_log2)) + len(ks))
    lrs = tuple(2.0 ** (k / 2) for k in ks)
    loss = np.array([[1.5 + 0.05 * (k / 2 - centre_log2) ** 2 + 0.01 * s + rng.normal(0, noise)
                      for k in ks] for s in seeds])
    return Grid(tuple(seeds), lrs, loss)


def test_drift_cause_verdicts_by_construction():
    from experiments import mutransfer_drift_cause as cause
    base = _parabola_grid(-6.0, range(-16, -7))
    results = cause.report(base, {
        'stays': _parabola_grid(-6.1, range(-16, -7)),
        'rises': _parabola_grid(-4.0, range(-13, -4)),
        'edge': _parabola_grid(-8.0, range(-13, -9)),      # optimum below the grid
        'one_seed': _parabola_grid(-6.0, range(-16, -7), seeds=(0,))})
    assert results['stays']['verdict'] == 'inside'
    assert results['stays']['total'] == pytest.approx(-0.1, abs=0.05)
    assert results['rises']['verdict'] == 'rises'
    assert results['edge']['verdict'].startswith('at most')
    assert results['one_seed']['verdict'] == 'not shown'
    assert '| rises | 3 |' in cause.markdown(results)


def test_single_rule_width_sweeps_are_the_ablation_variants_at_width_128():
    """The width sweeps of µP with some of SP's rules must be the ablation's variants at width 128
    (else their width-128 runs are trained again instead of adopted) and the base model at 32."""
    from configs.sweeps import (mutransfer_ablation, mutransfer_embedding_rule,
                                mutransfer_hidden_init_rule)
    for module, label in ((mutransfer_hidden_init_rule, 'hidden_init_as_sp'),
                          (mutransfer_embedding_rule, 'embedding_lr_and_hidden_init_as_sp')):
        overrides, _ = mutransfer_ablation.VARIANTS[label]
        for width, expected in ((128, {k: v for k, v in overrides.items() if '.role_' in k}),
                                (32, None)):
            point = {'parametrization.name': 'mup', 'model.d_model': width, 'train.steps': 1000,
                     'seed': 0, 'optim.lr': 2.0 ** -6}
            roles = {k: v for k, v in module.derive(point).items() if '.role_' in k}
            if expected is None:
                assert roles and all(v == 1.0 for v in roles.values()), (label, roles)
            else:
                assert roles == expected, (label, roles)
