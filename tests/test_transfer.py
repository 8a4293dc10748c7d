"""µTransfer verdicts on synthetic sweeps whose optimum, drift and gaps are known by construction."""

import math
import os

import numpy as np
import pytest

from pretrain.study import transfer


def _rows(variant_drift: dict[str, float], sizes=(32, 64, 128), seeds=(0, 1, 2), ks=range(-20, -9),
          gap: float = 0.05, noise: float = 0.005, steps: int = 1000):
    """loss = 0.1 * (log2 lr - centre)^2 + 2.0 - gap * log2(size / 32) + seed noise.

    The optimum of `variant` moves by variant_drift[variant] octaves per doubling from 2^-7.
    """
    rng = np.random.default_rng(0)
    rows = []
    for variant, per_doubling in variant_drift.items():
        parametrization, _, optimizer = variant.partition('+')
        name, alpha = ('depth_mup', 1.0) if parametrization == 'completep' else (parametrization, 0.5)
        for size in sizes:
            doublings = math.log2(size / sizes[0])
            centre = -7.0 + per_doubling * doublings
            for seed in seeds:
                offset = rng.normal(0, noise)
                for k in ks:
                    log2_lr = k / 2
                    loss = 0.1 * (log2_lr - centre) ** 2 + 2.0 - gap * doublings + offset
                    rows.append({'status': 'done', 'final_loss': loss, 'name': f'{variant}{size}{seed}{k}',
                                 'point': {'optim.lr': 2.0 ** log2_lr, 'seed': seed},
                                 'config': {'parametrization': {'name': name, 'depth_alpha': alpha},
                                            'model': {'d_model': size, 'n_layers': 2},
                                            'train': {'steps': steps}, 'seed': seed,
                                            'optim': {'lr': 2.0 ** log2_lr,
                                                      'name': optimizer or 'adamw'}}})
    return rows


def test_optimum_is_the_parabola_vertex():
    lrs = [2.0 ** (k / 2) for k in range(-20, -9)]
    loss = np.array([(math.log2(lr) + 7.3) ** 2 for lr in lrs])
    o = transfer.optimum(lrs, loss)
    assert o.log2_lr == pytest.approx(-7.3, abs=1e-9) and o.bracketed and not o.at_edge
    edge = transfer.optimum(lrs, -np.arange(len(lrs), dtype=float))
    assert edge.at_edge and not edge.bracketed and edge.log2_lr == pytest.approx(math.log2(lrs[-1]))


def test_paired_difference_by_hand():
    d = transfer.paired_difference({0: 2.0, 1: 2.1, 2: 2.2}, {0: 1.9, 1: 2.05, 2: 2.05})
    diffs = np.array([-0.1, -0.05, -0.15])
    half = 4.302652729911275 * diffs.std(ddof=1) / math.sqrt(3)   # t(0.975, 2 dof)
    assert d['mean'] == pytest.approx(-0.1) and d['seeds'] == 3
    assert d['interval'] == pytest.approx([-0.1 - half, -0.1 + half])


def test_transfer_met_for_mup_and_sp_drifts():
    result = transfer.report(_rows({'mup': 0.0, 'sp': -1.0}), n_boot=200)
    groups = {g['variant']: g for g in result['groups']}
    assert groups['mup']['drift']['total'] == pytest.approx(0.0, abs=0.05)
    assert groups['sp']['drift']['per_doubling'] == pytest.approx(-1.0, abs=0.05)
    # The interval bounds the drift over the whole range (2 doublings); per doubling it is half.
    low, high = groups['sp']['drift']['interval']
    assert low <= groups['sp']['drift']['total'] <= high
    assert groups['sp']['drift']['interval_per_doubling'] == pytest.approx([low / 2, high / 2])
    verdicts = {(v['variant'], v['criterion'].split()[0]): v['verdict'] for v in result['verdicts']}
    assert verdicts[('mup', 'abs(drift)')] == 'met'
    assert verdicts[('sp', 'drifts')] == 'met'
    assert verdicts[('mup', 'every')] == 'met'   # 0.05 nats per doubling, 0.005 noise
    assert groups['mup']['noise_floor'] == pytest.approx(0.005, rel=1.0)
    assert any(v['criterion'].startswith('mup (transferred LR) <= SP') for v in result['verdicts'])


def test_larger_not_better_is_not_met_and_unbracketed_is_not_shown():
    flat = transfer.report(_rows({'mup': 0.0}, gap=0.0, noise=0.02), n_boot=100)
    ladder = [v for v in flat['verdicts'] if v['criterion'].startswith('every')][0]
    assert ladder['verdict'] == 'not met'
    edge = transfer.report(_rows({'mup': 0.0}, ks=range(-14, -9)), n_boot=100)   # optimum 2^-7 at k=-14
    assert [v['verdict'] for v in edge['verdicts'] if v['criterion'].startswith('abs(drift)')] == ['not shown']


def _grid_follows(rows, keep):
    """The rows whose (size, log2 LR) `keep` accepts: a grid that differs per size."""
    return [r for r in rows if keep(r['config']['model']['d_model'], math.log2(r['point']['optim.lr']))]


def test_a_step_whose_sizes_did_not_both_run_the_transferred_lr_is_reported_not_run():
    """SP's grids follow its optimum down (1 octave per doubling here, 7 half-octave points
    around it), so width 256 shares no LR near the base's optimum (2^-7) with the base."""
    sizes = (32, 64, 128, 256)
    sp = _grid_follows(_rows({'sp': -1.0}, sizes=sizes, ks=range(-24, -9)),
                       lambda size, x: abs(x - (-7 - math.log2(size / 32))) <= 1.5)
    result = transfer.report(sp, n_boot=50)
    group = result['groups'][0]
    # 2^-7 is run at 32 and 64, 2^-7.5 (half an octave away) also at 128: the latter is chosen.
    assert group['transferred_lr'] == 2.0 ** -7.5
    assert [(x['from'], x['to'], x['seeds']) for x in group['larger_is_better']] == [
        (32, 64, 3), (64, 128, 3), (128, 256, 0)]
    ladder = [v for v in result['verdicts'] if v['criterion'].startswith('every')][0]
    assert ladder['verdict'] == 'not met'      # 64 -> 128 is 0.15 worse: one failing step decides
    assert '| sp | 1000 | 128 -> 256 | not run at both widths | n/a | 0 |' in transfer.markdown(result)
    # Every measured step better but one not run: undecided.
    mup = _grid_follows(_rows({'mup': 0.0}, sizes=sizes), lambda size, x: size < 256 or x <= -8)
    ladder = [v for v in transfer.report(mup, n_boot=50)['verdicts'] if v['criterion'].startswith('every')][0]
    assert ladder['verdict'] == 'not shown'
    assert ladder['differences'][-1][:2] == [128, 256] and math.isnan(ladder['differences'][-1][2])


def test_completep_is_its_own_variant_and_markdown_renders(tmp_path):
    rows = _rows({'completep': 0.1, 'depth_mup': 0.0})
    result = transfer.report(rows, n_boot=50)
    assert {g['variant'] for g in result['groups']} == {'completep', 'depth_mup'}
    text = transfer.markdown(result)
    assert '| completep | 1000 |' in text and '**met**' in text
    transfer.plot(rows, result, str(tmp_path / 'transfer.png'))
    assert (tmp_path / 'transfer.png').stat().st_size > 1000


def test_an_optimizer_other_than_adamw_is_its_own_variant_with_its_own_sp_baseline():
    result = transfer.report(_rows({'mup+muon': 0.0, 'sp+muon': -1.0, 'mup': 0.5}), n_boot=100)
    assert {g['variant'] for g in result['groups']} == {'mup+muon', 'sp+muon', 'mup'}
    verdicts = {(v['variant'], v['criterion'].split()[0]): v['verdict'] for v in result['verdicts']}
    assert verdicts[('mup+muon', 'abs(drift)')] == 'met'
    assert verdicts[('mup', 'abs(drift)')] == 'not met'
    against_sp = [v for v in result['verdicts'] if 'SP tuned' in v['criterion']]
    assert [v['variant'] for v in against_sp] == ['mup+muon']   # AdamW µP has no AdamW SP here


def test_choose_and_write_base(tmp_path):
    rows = [{'status': 'done', 'final_loss': 2.3, 'name': 'a', 'point': {'optim.lr': 0.01, 'seed': 0}},
            {'status': 'done', 'final_loss': 2.1, 'name': 'b',
             'point': {'optim.lr': 0.003, 'parametrization.output_mult': 4.0, 'seed': 0}},
            {'status': 'diverged', 'final_loss': None, 'name': 'c', 'point': {'optim.lr': 1.0}}]
    point, row = transfer.choose_base(rows)
    assert row['name'] == 'b'
    path = tmp_path / 'tuned.py'
    transfer.write_base(str(path), point, row, 'runs/base')
    namespace: dict = {}
    exec(path.read_text(), namespace)
    assert namespace['TUNED'] == {'optim.lr': 0.003, 'parametrization.output_mult': 4.0}
    with pytest.raises(ValueError, match='no finished run'):
        transfer.choose_base(rows[2:])


def test_one_seed_shows_no_verdict():
    """With a single seed no interval exists: nothing is met or not met, only 'not shown'."""
    result = transfer.report(_rows({'mup': 0.0, 'sp': -1.0}, seeds=(0,)), n_boot=50)
    assert {v['verdict'] for v in result['verdicts']} == {'not shown'}


def test_a_size_still_filling_its_grid_is_left_out():
    rows = _rows({'mup': 0.0}, sizes=(32, 64, 128))
    rows = [r for r in rows if not (r['config']['model']['d_model'] == 128
                                    and r['config']['optim']['lr'] > 2.0 ** -9)]   # 3 LRs so far
    result = transfer.report(rows, n_boot=50)
    assert result['in_progress'] == [{'variant': 'mup', 'steps': 1000, 'size': 128, 'seeds_run': 3,
                                      'lrs_run': 3}]
    assert result['groups'][0]['sizes'] == [32, 64]
    assert 'In progress' in transfer.markdown(result)


def test_a_base_with_extra_seeds_keeps_every_size_in_the_fit():
    """More seeds at the (cheap) base than elsewhere is a design, not a sweep in progress: every
    size stays in, the base's optimum uses all its seeds, the paired steps the shared ones."""
    rows = _rows({'mup': 0.0}, sizes=(32, 64, 128))
    extra = _rows({'mup': 0.0}, sizes=(32,), seeds=(3, 4))
    result = transfer.report(rows + extra, n_boot=50)
    assert result['in_progress'] == []
    group = result['groups'][0]
    assert group['sizes'] == [32, 64, 128]
    assert group['drift']['seeds'] == {32: 5, 64: 3, 128: 3}
    assert [step['seeds'] for step in group['larger_is_better']] == [3, 3]


def test_two_sizes_with_extra_base_seeds_keep_both_and_compare_with_sp_above_the_base():
    """With two sizes, a base of 8 seeds must not make the other size's 3 look unfinished (a
    median over both would), and µP vs tuned SP is never scored at the base, where they are the
    same model."""
    rows = _rows({'mup': 0.0, 'sp': -1.0}, sizes=(32, 64))
    extra = _rows({'mup': 0.0, 'sp': -1.0}, sizes=(32,), seeds=(3, 4, 5, 6, 7))
    result = transfer.report(rows + extra, n_boot=50)
    assert result['in_progress'] == []
    assert all(g['sizes'] == [32, 64] for g in result['groups'])
    against = [v for v in result['verdicts'] if 'difference' in v]
    assert [v['size'] for v in against] == [64]
    only_base = transfer.report([r for r in rows + extra if r['config']['model']['d_model'] == 32],
                                n_boot=50)
    assert not [v for v in only_base['verdicts'] if 'difference' in v]


def test_max_size_fits_a_sub_range_and_names_the_sizes_when_it_keeps_none():
    rows = _rows({'mup': 0.0, 'sp': -1.0}, sizes=(32, 64, 128))
    result = transfer.report(transfer.up_to(rows, 'width', 64), n_boot=50)
    assert all(g['sizes'] == [32, 64] for g in result['groups'])
    with pytest.raises(transfer.ConfigError, match=r'--max_size=16 keeps no run.*\[32, 64, 128\]'):
        transfer.up_to(rows, 'width', 16)


def test_a_size_with_fewer_seeds_or_lrs_some_seeds_lack_is_left_out():
    """The widest size with one seed so far waits for the others; an LR run by one seed only is
    not compared with means over three (it would look better or worse by its seed alone)."""
    rows = _rows({'mup': 0.0}, sizes=(32, 64, 128))
    rows = [r for r in rows if not (r['config']['model']['d_model'] == 128 and r['config']['seed'] > 0)]
    lucky = {'status': 'done', 'final_loss': 0.0, 'name': 'lucky', 'point': {},
             'config': {**rows[0]['config'], 'optim': {'lr': 2.0 ** -3, 'name': 'adamw'}}}
    result = transfer.report(rows + [lucky], n_boot=50)
    assert result['in_progress'] == [{'variant': 'mup', 'steps': 1000, 'size': 128, 'seeds_run': 1,
                                      'lrs_run': 11}]
    group = result['groups'][0]
    assert group['sizes'] == [32, 64]
    assert group['drift']['optima'][32]['log2_lr'] == pytest.approx(-7.0, abs=0.1)   # not 2^-3


def test_sp_tuned_with_its_lr_held_out_is_scored_per_seed_on_the_others_choice():
    g = transfer.Grid(seeds=(0, 1, 2), lrs=(0.001, 0.002, 0.004),
                      loss_SL=np.array([[1.0, 2.0, 3.0],    # seed 0 alone prefers the first LR
                                        [3.0, 1.0, 2.0],
                                        [3.0, 1.0, 2.0]]))
    # Seed 0 is scored at the LR the others prefer (0.002); seeds 1 and 2 at the mean of the
    # other two, where 0.002 still wins (1.5 vs 2.0).
    assert transfer._held_out_best(g) == {0: 2.0, 1: 1.0, 2: 1.0}
    result = transfer.report(_rows({'mup': 0.0, 'sp': -1.0}), n_boot=50)
    against = [v for v in result['verdicts'] if 'difference' in v][0]
    assert against['difference_sp_held_out']['seeds'] == 3
    assert 'LR held out' in transfer.markdown(result)


def test_a_sweep_with_no_size_past_its_lr_floor_reports_and_plots_without_failing(tmp_path):
    rows = _rows({'mup': 0.0}, ks=range(-15, -12))   # 3 LRs per size: every size in progress
    paths = transfer.write_report(rows, str(tmp_path), 'width', n_boot=10)
    assert 'In progress' in open(paths[1]).read()
    assert os.path.getsize(paths[2]) > 0


def test_each_size_gets_its_own_optimum_interval_from_its_seeds():
    """A size whose seeds disagree on the optimum gets a wide interval, one whose seeds agree a
    point: the table says which size widens the drift's interval."""
    ks = range(-20, -7)
    def grid(centres):
        return transfer.grid_from_cells({(seed, 2.0 ** (k / 2)): 0.1 * (k / 2 - c) ** 2
                                         for seed, c in enumerate(centres) for k in ks})
    d = transfer.drift({32: grid([-7.0, -6.0, -8.0]), 64: grid([-7.0, -7.0, -7.0])}, n_boot=300)
    low, high = d['optima_interval'][32]
    assert low < -7.5 and high > -6.5   # resampling reaches the seeds' -8 and -6
    assert d['optima_interval'][64] == pytest.approx([-7.0, -7.0])
    text = transfer.markdown({'axis': 'width', 'groups': [{
        'variant': 'mup', 'steps': 1000, 'drift': d, 'transferred_lr': None, 'noise_floor': math.nan,
        'larger_is_better': []}], 'verdicts': []})
    assert '| mup | 1000 | 64 | 3 | 2^-7.00 = 0.00781 | [-7.000, -7.000] |' in text


def test_each_ordering_is_compared_across_lengths_on_the_sizes_every_length_ran():
    """Long runs at the two smallest sizes only: the short runs' verdicts are recomputed on
    those sizes, so a verdict that changes with length is a change, not a different range."""
    short = _rows({'mup': 0.0, 'sp': -1.0}, sizes=(32, 64, 128))
    long_same = _rows({'mup': 0.0, 'sp': -1.0}, sizes=(32, 64), steps=4000)
    result = transfer.report(short + long_same, n_boot=100)
    rows = {(x['variant'], x['criterion'].split()[0]): x for x in result['across_lengths']}
    assert all(x['sizes'] == [32, 64] for x in rows.values())
    assert rows[('mup', 'every')]['holds'] == 'yes'
    assert list(rows[('mup', 'every')]['by_steps']) == [1000, 4000]
    assert rows[('mup', 'every')]['by_steps'][1000]['numbers'].startswith('32 -> 64 -0.05')
    assert rows[('sp', 'drifts')]['holds'] == 'yes'
    # At 4x the length the width no longer helps: that ordering does not hold.
    long_flat = _rows({'mup': 0.0, 'sp': -1.0}, sizes=(32, 64), steps=4000, gap=-0.05)
    changed = transfer.report(short + long_flat, n_boot=100)['across_lengths']
    ladder = next(x for x in changed if x['variant'] == 'mup' and x['criterion'].startswith('every'))
    assert ladder['holds'] == 'no' and ladder['by_steps'][4000]['verdict'] == 'not met'
    assert 'Across training lengths' in transfer.markdown({**result, 'across_lengths': changed})
    assert transfer.report(short, n_boot=50)['across_lengths'] == []   # one length: nothing to compare
