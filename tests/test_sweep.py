"""Sweeps: expansion and stable names, checks before compute, skip/resume, executors, results."""

import json
import os
import re
import subprocess
import textwrap

import pytest

from pretrain import config as config_lib
from pretrain import preemption, train
from pretrain.errors import ConfigError
from pretrain.study import executors, fit, laws, results, reuse, runner, sweep
from pretrain.study.sweep import Cooldowns, Run, Sweep, product, zipped

BASE = '''
from tests.helpers import tiny_config

def get_config():
    c = tiny_config()
    c.data.max_files = 20
    c.train.update(eval_every=100, eval_batches=1, log_every=2)
    return c
'''


@pytest.fixture
def base(tmp_path):
    path = tmp_path / 'base.py'
    path.write_text(BASE)
    return str(path)


def widths(point):
    d = point['model.d_model']
    return {'model.d_ff': 2 * d}


def test_product_and_zipped():
    pts = product({'model.d_model': [32, 64]}, zipped({'optim.lr': [1e-3, 3e-3], 'seed': [0, 1]}))
    assert pts == [{'model.d_model': 32, 'optim.lr': 1e-3, 'seed': 0},
                   {'model.d_model': 32, 'optim.lr': 3e-3, 'seed': 1},
                   {'model.d_model': 64, 'optim.lr': 1e-3, 'seed': 0},
                   {'model.d_model': 64, 'optim.lr': 3e-3, 'seed': 1}]
    assert len(product({'a': [1, 2, 3], 'b': [4, 5]})) == 6
    with pytest.raises(ConfigError, match='same length'):
        zipped({'a': [1, 2], 'b': [3]})


def test_names_are_stable_and_unique(base):
    assert sweep.point_name({}) == 'base'
    assert sweep.point_name({'model.d_model': 64, 'optim.lr': 0.003}) == 'd_model=64,lr=0.003'
    # Ambiguous last parts keep the whole key; odd characters become '-'.
    assert sweep.point_name({'optim.eps': 1e-8, 'model.norm_eps': 1e-6, 'data.source': 'a/b'}) == \
        'eps=1e-08,norm_eps=1e-06,source=a-b'
    assert sweep.point_name({'model.init_std': 0.02, 'scaling.init_std': 0.01}) == \
        'model.init_std=0.02,scaling.init_std=0.01'
    small = Sweep(base=base, points=product({'model.d_model': [32]}, {'optim.lr': [1e-3]}))
    big = Sweep(base=base, points=product({'model.d_model': [16, 32]}, {'optim.lr': [1e-3, 3e-3]}))
    # Adding points never renames the runs that were there.
    assert [r.name for r in sweep.expand(small)][0] in [r.name for r in sweep.expand(big)]
    assert sweep.expand(big) == sweep.expand(big)
    with pytest.raises(ConfigError, match="same run name 'lr=0.001'"):
        sweep.expand(Sweep(base=base, points=[{'optim.lr': 1e-3}, {'optim.lr': 0.001}]))


def test_cooldowns_expand_to_a_parent_and_branches(base):
    runs = sweep.expand(Sweep(base=base, points=zipped({'model.d_model': [32]}), derive=widths,
                              fixed={'optim.lr': 1e-3},
                              cooldowns=Cooldowns(budgets=[100, 50, 200], fraction=0.2)))
    parent, *children = runs
    assert parent.name == 'd_model=32.constant' and parent.kind == 'parent'
    assert parent.overrides == {'optim.lr': 1e-3, 'model.d_model': 32, 'model.d_ff': 64,
                                'train.steps': 200, 'schedule.kind': 'constant',
                                'checkpoint.every_steps': 40, 'checkpoint.keep_every': 40}
    assert [(c.name, c.branch_step, c.overrides['schedule.decay_steps']) for c in children] == [
        ('d_model=32.cooldown50', 40, 10), ('d_model=32.cooldown100', 80, 20),
        ('d_model=32.cooldown200', 160, 40)]
    assert all(c.parent == parent.name and c.overrides['schedule.kind'] == 'wsd' for c in children)
    with pytest.raises(ConfigError, match='fraction'):
        sweep.expand(Sweep(base=base, cooldowns=Cooldowns(budgets=[10], fraction=1.5)))


def test_bad_runs_fail_before_any_training(base, tmp_path):
    workdir = str(tmp_path / 'sw')
    typo = Sweep(base=base, points=[{'optim.lrr': 1e-3}])
    with pytest.raises(ConfigError, match="run 'lrr=0.001'.*optim.lrr|lrr"):
        sweep.check(typo, sweep.expand(typo), workdir, num_devices=8)
    bad = Sweep(base=base, points=zipped({'model.n_heads': [3]}))
    with pytest.raises(ConfigError, match="run 'n_heads=3'.*d_model=32.*n_heads=3"):
        sweep.check(bad, sweep.expand(bad), workdir, num_devices=8)
    with pytest.raises(ConfigError, match="Sweep.base='nope.py'"):
        sweep.check(Sweep(base='nope.py'), [Run('base', {}, {})], workdir, num_devices=8)
    assert not os.path.exists(workdir)
    # A run that exists with other overrides is refused, not mixed in.
    ok = Sweep(base=base, points=[{'optim.lr': 1e-3}])
    run = sweep.expand(ok)[0]
    os.makedirs(sweep.run_dir(workdir, run.name))
    changed = Run(run.name, run.point, {**run.overrides, 'train.steps': 7})
    with open(os.path.join(sweep.run_dir(workdir, run.name), sweep.SPEC), 'w') as f:
        json.dump(changed.spec(), f)
    with pytest.raises(ConfigError, match='started with other overrides'):
        sweep.check(ok, [run], workdir, num_devices=8)


def test_shards_keep_families_together(base):
    runs = sweep.expand(Sweep(base=base, points=zipped({'model.d_model': [16, 32, 48]}),
                              cooldowns=Cooldowns(budgets=[4, 8], fraction=0.25)))
    shards = [sweep.shard(runs, i, 2) for i in range(2)]
    assert sorted(r.name for s in shards for r in s) == sorted(r.name for r in runs)
    for s in shards:
        names = {r.name for r in s}
        assert all(r.parent in names for r in s if r.parent)


def test_only_narrows_by_name_and_keeps_a_cooldowns_parent(base):
    runs = sweep.expand(Sweep(base=base, points=zipped({'model.d_model': [16, 32, 48]}),
                              cooldowns=Cooldowns(budgets=[4, 8], fraction=0.25)))
    assert [r.name for r in sweep.only(runs, 'd_model=(16|48)')] == [
        r.name for r in runs if 'd_model=16' in r.name or 'd_model=48' in r.name]
    cooldown = next(r for r in runs if r.parent)
    picked = sweep.only(runs, f'^{re.escape(cooldown.name)}$')
    assert [r.name for r in picked] == [cooldown.parent, cooldown.name]   # sweep order
    with pytest.raises(ConfigError, match=r"--only='d_model=\(' is not a regular expression"):
        sweep.only(runs, 'd_model=(')
    with pytest.raises(ConfigError, match="--only='d_model=99' matches no run"):
        sweep.only(runs, 'd_model=99')


def test_tiny_sweep_end_to_end_with_resume(base, tmp_path, monkeypatch, capsys):
    """2 widths x 2 LRs; the last run is preempted, the re-run skips 3 and resumes it; fits."""
    sw = Sweep(base=base, points=product({'model.d_model': [16, 32]}, {'optim.lr': [1e-3, 3e-3]}),
               derive=widths, fixed={'model.n_heads': 2, 'model.n_kv_heads': 2})
    runs = sweep.expand(sw)
    workdir = str(tmp_path / 'sw')
    sweep.check(sw, runs, workdir, num_devices=8)
    last = runs[-1].name
    outcome = {r.name: executors.run_one(sw, r, workdir) for r in runs[:-1]}
    real = preemption.Watcher.should_stop
    monkeypatch.setattr(preemption.Watcher, 'should_stop', lambda self, step: step >= 3)
    outcome[last] = executors.run_one(sw, runs[-1], workdir)   # as if SIGTERM came at step 3
    assert outcome == {**{r.name: 'done' for r in runs[:-1]}, last: 'preempted'}
    assert executors.collect(runs, workdir) == 3
    monkeypatch.setattr(preemption.Watcher, 'should_stop', real)
    stamps = {r.name: os.path.getmtime(os.path.join(sweep.run_dir(workdir, r.name), results.RESULT))
              for r in runs[:-1]}
    trained = []
    real_run = train.run
    monkeypatch.setattr(train, 'run', lambda *a, **k: trained.append(real_run(*a, **k)) or trained[-1])
    # As with --only: the unfinished run alone is selected; results.jsonl keeps the others' rows.
    outcome = executors.run_local(sw, runs[-1:], workdir, 'unused.py', parallel=0, every=runs)
    assert outcome == {last: 'done'}
    assert executors.run_local(sw, runs, workdir, 'unused.py', parallel=0) == {
        r.name: 'skipped' for r in runs}
    assert stamps == {n: os.path.getmtime(os.path.join(sweep.run_dir(workdir, n), results.RESULT))
                      for n in stamps}
    (resumed,) = trained   # only the unfinished run trained, from its step-3 checkpoint
    assert [h['step'] for h in resumed['history']] == [4, 6]
    with open(os.path.join(workdir, 'results.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    assert [r['name'] for r in rows] == [r.name for r in runs]
    row = rows[-1]
    assert row['width'] == 32 and row['lr'] == 3e-3 and row['steps'] == 6
    assert row['tokens'] == 6 * 8 * 32 and row['flops'] > 6 * row['params'] * row['tokens']
    assert [c[0] for c in row['curve']] == [2, 4, 6]   # the resumed steps logged once
    assert row['final_loss_source'] == 'eval' and row['evals'][-1]['step'] == 6
    assert row['config']['model']['d_ff'] == 64 and row['config']['optim']['lr'] == 3e-3
    assert rows[0]['params'] < rows[2]['params']
    fits = fit.run(workdir, n_boot=0)
    assert 'power_law' in fits and 'lr_optima' in fits['skipped']
    assert os.path.exists(os.path.join(workdir, 'power_law.png'))
    assert os.path.exists(os.path.join(workdir, 'fit_summary.md'))
    # The command line lists the runs and their state without training.
    sweep_file = tmp_path / 'sweep_def.py'
    sweep_file.write_text(textwrap.dedent(f'''
        from pretrain.study.sweep import Sweep, product
        def get_sweep():
            return Sweep(base={base!r}, points=product({{'model.d_model': [16, 32]}},
                                                        {{'optim.lr': [1e-3, 3e-3]}}),
                         derive=lambda p: {{'model.d_ff': 2 * p['model.d_model']}},
                         fixed={{'model.n_heads': 2, 'model.n_kv_heads': 2}})
    '''))
    capsys.readouterr()
    assert runner.run_sweep(runner.SweepOptions(str(sweep_file), workdir, dry_run=True)) == 0
    out = capsys.readouterr().out
    assert 'finished run      d_model=16,lr=0.001' in out and '4 runs, 4 finished' in out
    bad = tmp_path / 'bad.py'
    bad.write_text(sweep_file.read_text().replace("'optim.lr'", "'optim.lrr'"))
    assert runner.run_sweep(runner.SweepOptions(str(bad), f'{tmp_path}/bad', parallel=0)) == 2
    assert 'optim.lrr' in capsys.readouterr().err and not os.path.exists(f'{tmp_path}/bad/runs')



def test_cooldown_family_branches_and_feeds_the_fits(base, tmp_path):
    sw = Sweep(base=base, points=zipped({'model.d_model': [16]}), derive=widths,
               fixed={'model.n_heads': 2, 'model.n_kv_heads': 2},
               cooldowns=Cooldowns(budgets=[4], fraction=0.5))
    workdir = str(tmp_path / 'sw')
    runs = sweep.expand(sw)
    assert executors.run_local(sw, runs, workdir, 'unused.py', parallel=0) == {
        r.name: 'done' for r in runs}
    rows = {r['name']: r for r in results.load_results(workdir)}
    parent, child = rows['d_model=16.constant'], rows['d_model=16.cooldown4']
    assert child['branch_step'] == 2 and child['kind'] == 'cooldown' and parent['kind'] == 'parent'
    # The cooldown's curve is the parent's up to the branch, then its own decaying LR.
    assert child['curve'][0] == parent['curve'][0] and child['curve'][0][0] == 2
    assert child['curve'][-1][0] == 4 and child['curve'][-1][2] < 0.5 * parent['curve'][-1][2]
    assert child['final_loss'] != parent['final_loss']


def test_fits_skip_parents_and_predict_heldout_runs(tmp_path):
    law = laws.Chinchilla(E=1.5, A=400.0, B=2000.0, alpha=0.35, beta=0.4)
    rows = []
    for n in (1e5, 2e5, 4e5, 8e5):
        for d in (1e6, 3e6, 1e7):
            rows.append({'name': f'{n:g}-{d:g}', 'params': n, 'tokens': d,
                         'flops': 6 * n * d, 'final_loss': float(law(n, d)), 'kind': 'cooldown'})
        # Parents' last losses are far off the law: they must not move the fit.
        rows.append({'name': f'{n:g}-parent', 'params': n, 'tokens': 1e7, 'flops': 6e7 * n,
                     'final_loss': 9.0, 'kind': 'parent'})
    rows.append({'name': 'big', 'params': 3.2e6, 'tokens': 1e7, 'flops': 6 * 3.2e7,
                 'final_loss': float(law(3.2e6, 1e7)), 'heldout': True, 'kind': 'cooldown'})
    with open(tmp_path / 'results.jsonl', 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in rows))
    fits = fit.run(str(tmp_path), n_boot=0)
    assert fits['n_runs'] == 16
    assert abs(fits['chinchilla']['alpha'] - 0.35) < 0.02
    (held,) = fits['heldout']
    assert held['name'] == 'big' and abs(held['chinchilla'] - held['measured']) < 0.01
    assert 'Held-out runs' in (tmp_path / 'fit_summary.md').read_text()


def test_slurm_and_tpu_job_files(base, tmp_path):
    sw = Sweep(base=base, points=zipped({'model.d_model': [16, 32]}),
               cooldowns=Cooldowns(budgets=[4, 8], fraction=0.25))
    runs = sweep.expand(sw)
    workdir = str(tmp_path / 'sw')
    files = executors.write_slurm(runs, workdir, 'configs/sweeps/x.py', max_parallel=3)
    stage0, stage1, submit = files
    with open(stage0) as f:
        assert f.read().split() == [r.name for r in runs if not r.parent]
    with open(stage1) as f:
        assert f.read().split() == [r.name for r in runs if r.parent]
    text = open(submit).read()
    # The array template lives in launch/; the cooldowns wait for every parent.
    assert os.path.exists(os.path.join(sweep.ROOT, executors.SLURM_TEMPLATE))
    assert f'--array=0-1%3 --output={workdir}/slurm/%A_%a.out launch/sweep_array.sbatch' in text
    assert '--dependency=afterok:"$stage0"' in text and '--array=0-3%3' in text
    assert '--sweep=configs/sweeps/x.py' in text and '#SBATCH' not in text
    (launch,) = executors.write_tpu(workdir, 'configs/sweeps/x.py', ['vm-a', 'vm-b'], 'zone-1')
    text = open(launch).read()
    assert '--shard=0/2' in text and '--shard=1/2' in text and 'vm-b' in text
    assert 'MODULE=pretrain.sweep bash launch/tpu_vm.sh vm-a' in text and 'gcloud' not in text
    (launch,) = executors.write_tpu(workdir, 'configs/sweeps/x.py', ['vm-a'], 'zone-1',
                                    only='steps=4000')
    assert '--parallel=1 --only=steps=4000 >' in open(launch).read()
    for f in [submit, launch, os.path.join(sweep.ROOT, executors.SLURM_TEMPLATE)]:
        subprocess.run(['bash', '-n', f], check=True)


@pytest.mark.slow   # two JAX start-ups and a cold compile: ~20 s
def test_local_executor_runs_subprocesses(base, tmp_path):
    """The default executor: each run in its own process; exit codes become outcomes."""
    sweep_file = tmp_path / 'one.py'
    sweep_file.write_text(textwrap.dedent(f'''
        from pretrain.study.sweep import Sweep
        def get_sweep():
            return Sweep(base={base!r}, points=[{{'optim.lr': 1e-3}}],
                         fixed={{'train.steps': 3, 'model.d_model': 16, 'model.n_heads': 2,
                                 'model.n_kv_heads': 2, 'model.d_ff': 32}})
    '''))
    workdir = str(tmp_path / 'sw')
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    cmd = ['python', '-m', 'pretrain.sweep', f'--sweep={sweep_file}', f'--workdir={workdir}']
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([os.path.join(os.path.dirname(os.sys.executable), 'python')] + cmd[1:],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '1 trained, 0 already finished, 0 not finished; 1 rows' in out.stdout
    assert os.path.exists(os.path.join(sweep.run_dir(workdir, 'lr=0.001'), 'log.txt'))


def test_a_preempted_run_stops_the_sweep(base, tmp_path, monkeypatch):
    sw = Sweep(base=base, points=zipped({'optim.lr': [1e-3, 2e-3, 3e-3]}))
    runs = sweep.expand(sw)
    calls = []
    monkeypatch.setattr(executors, 'run_one', lambda s, r, w: calls.append(r.name) or 'preempted')
    outcome = executors.run_local(sw, runs, str(tmp_path / 'sw'), 'unused.py', parallel=0)
    assert calls == ['lr=0.001']
    assert outcome == {'lr=0.001': 'preempted', 'lr=0.002': 'not started: the sweep was preempted',
                       'lr=0.003': 'not started: the sweep was preempted'}


def test_several_cooldown_families_share_one_parent(base):
    runs = sweep.expand(Sweep(base=base, points=zipped({'model.d_model': [32]}), cooldowns=[
        Cooldowns(budgets=[100], fraction=0.2, shape='linear'),
        Cooldowns(budgets=[100], fraction=0.1, shape='linear', heldout=True),
        Cooldowns(budgets=[100], fraction=0.2, shape='1-sqrt', heldout=True)]))
    parent, *children = runs
    # Checkpoints every gcd(80, 90) = 10 steps serve both branch steps.
    assert parent.overrides['train.steps'] == 100 and parent.overrides['checkpoint.every_steps'] == 10
    assert not parent.heldout
    assert [(c.name, c.branch_step, c.overrides['schedule.decay_steps'],
             c.overrides['schedule.decay_shape'], c.heldout) for c in children] == [
        ('d_model=32.cooldown100-linear-0.2', 80, 20, 'linear', False),
        ('d_model=32.cooldown100-linear-0.1', 90, 10, 'linear', True),
        ('d_model=32.cooldown100-1-sqrt-0.2', 80, 20, '1-sqrt', True)]


def test_preemption_exit_code_is_the_trainers(tmp_path):
    code = preemption.EXIT_PREEMPTED
    assert executors._outcome(code, str(tmp_path), 'a') == 'preempted'
    assert executors._outcome(1, str(tmp_path), 'a').startswith('failed (exit code 1')
    assert runner.report({'a': 'done', 'b': 'preempted'}, 1, str(tmp_path)) == code
    assert runner.report({'a': 'done', 'b': 'skipped'}, 2, str(tmp_path)) == 0


def test_run_once_records_then_reuses(base, tmp_path, monkeypatch):
    """The experiments' path: train once, write result.json, return it again without training."""
    tiny = {'train.steps': 4, 'model.d_model': 16, 'model.n_heads': 2, 'model.n_kv_heads': 2,
            'model.d_ff': 32}
    cfg = sweep.run_config(Sweep(base=base), Run('x', {}, tiny), str(tmp_path))
    path = str(tmp_path / 'x')
    row = results.run_once(cfg, path)
    assert row['status'] == 'done' and row['steps'] == 4 and row['final_loss_source'] == 'eval'
    assert row['final_loss'] == row['evals'][-1]['loss'] and row['curve'][-1][0] == 4
    assert re.fullmatch(r'[0-9a-f]{40}(\+modified)?|unknown', row['code_version'])
    assert not os.path.exists(os.path.join(path, 'checkpoints'))   # not kept unless asked
    monkeypatch.setattr(train, 'run', lambda *a, **k: pytest.fail('trained again'))
    assert results.run_once(cfg, path) == results.read_result(path)


def test_a_warmup_given_as_a_fraction_is_pinned_to_the_parents_steps(base):
    """Cooldowns are shorter than their parent: a warmup that follows each run's length would
    differ and the branch would be refused, so the sweep gives both the parent's warmup steps."""
    runs = sweep.expand(Sweep(base=base, points=zipped({'model.d_model': [32]}), derive=widths,
                              fixed={'optim.lr': 1e-3, 'schedule.warmup_steps': -1,
                                     'schedule.warmup_fraction': 0.05},
                              cooldowns=Cooldowns(budgets=[100, 200], fraction=0.2)))
    assert {(r.overrides['schedule.warmup_steps'], r.overrides['schedule.warmup_fraction'])
            for r in runs} == {(10, -1.0)}


def test_reuse_adopts_finished_runs_of_another_sweep_with_the_same_config(base, tmp_path, capsys):
    """--reuse_from: equal resolved configs are adopted (an option added to the code since,
    holding its base value, does not count); any other difference trains anew."""
    sweep_file = tmp_path / 'sweep_b.py'
    sweep_file.write_text(textwrap.dedent(f'''
        from pretrain.study.sweep import Sweep, product
        def get_sweep():
            return Sweep(base={base!r}, points=product({{'optim.lr': [1e-3, 3e-3, 1e-2]}}),
                         fixed={{'model.n_heads': 2, 'model.n_kv_heads': 2}})
    '''))
    sw = sweep.load(str(sweep_file))
    runs = {r.point['optim.lr']: r for r in sweep.expand(sw)}
    other = tmp_path / 'other'

    def finished(name, lr, edit):
        cfg = config_lib.finalize(sweep.run_config(sw, runs[lr], str(other))).to_dict()
        edit(cfg)
        path = other / 'runs' / name
        path.mkdir(parents=True)
        results.write_json(str(path / 'result.json'), {
            'name': name, 'status': 'done', 'final_loss': 2.5, 'config': cfg})
        (path / 'metrics.jsonl').write_text('{"step": 1}\n')

    finished('older_code', 1e-3, lambda c: c['optim'].pop('muon'))      # option added later
    finished('other_width', 3e-3, lambda c: c['model'].update(d_ff=999))
    finished('future_option', 1e-2, lambda c: c['model'].update(future_option=7))
    workdir = str(tmp_path / 'b')
    opts = runner.SweepOptions(str(sweep_file), workdir, dry_run=True, reuse_from=(str(other),))
    assert runner.run_sweep(opts) == 0          # a dry run adopts nothing
    assert not os.path.exists(os.path.join(workdir, 'runs'))
    said = []
    adopted = reuse.adopt(sw, list(runs.values()), workdir, [str(other)], say=said.append)
    assert adopted == [runs[1e-3].name]
    # It trained before runs recorded their code version: the adoption says so.
    assert 'trained at code unknown' in said[0] and results.code_version() in said[0]
    row = results.read_result(sweep.run_dir(workdir, runs[1e-3].name))
    assert row['name'] == runs[1e-3].name and row['final_loss'] == 2.5
    assert row['point'] == {'optim.lr': 1e-3} and row['reused_from'].endswith('older_code')
    assert os.path.exists(os.path.join(sweep.run_dir(workdir, runs[1e-3].name), 'metrics.jsonl'))
    assert not results.is_done(sweep.run_dir(workdir, runs[3e-3].name))
    # A folder that is not a sweep's workdir is named in the error.
    with pytest.raises(ConfigError, match='nowhere'):
        reuse.adopt(sw, list(runs.values()), workdir, [str(tmp_path / 'nowhere')])
