"""Every command the README shows is run here at tiny sizes, so the documentation cannot drift.

`readme_commands` collects the commands: each line of a ```bash block (backslash continuations
joined, trailing comments dropped) and each inline code span that starts with `python -m ` or
`bash launch/`. `CHECKS` says, per command, how it is checked: run with tiny-size flags that
replace the README's own values of the same flag (or are appended), checked against the file it
stands for, or imported. A README command missing from `CHECKS` (or an entry the README no
longer shows) fails `test_every_readme_command_has_a_check`: nobody can add an untested command.

Commands run in a temporary folder holding links to `configs/` and `launch/`, so the README's
relative paths (`runs/...`, `configs/...`) work as written and nothing lands in the repository.
Commands that build on each other (VAR stage 2 on stage 1, a branch on its parent, fit on a
sweep) run in order as one scenario. Each subprocess gets its own session and is killed with its
whole process group if it outlives its time limit; nothing else is signalled.
"""

import dataclasses
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
SHELL_LANGUAGES = {'bash', 'sh', 'shell'}

# A transformer small enough to compile in seconds; 4 steps, eval and checkpoint at the end.
TINY_LM = ('--config.model.d_model=32', '--config.model.n_layers=1', '--config.model.n_heads=2',
           '--config.model.n_kv_heads=1', '--config.model.d_ff=64', '--config.data.seq_len=32',
           '--config.data.max_files=40', '--config.train.global_batch_size=8',
           '--config.train.steps=4', '--config.train.log_every=2', '--config.train.eval_every=4',
           '--config.train.eval_batches=1', '--config.metrics.tensorboard=False')
TINY_SSM = TINY_LM + ('--config.model.ssm.d_state=4',)
TINY_VAR = ('--config.train.steps=4', '--config.train.global_batch_size=8',
            '--config.train.log_every=2', '--config.train.eval_every=4',
            '--config.train.eval_batches=1', '--config.checkpoint.every_steps=4',
            '--config.metrics.tensorboard=False')
# The branching pair at 1/250 of the README's lengths: an 8-step constant parent, a branch at
# step 4 that decays over its last 2 of 6 steps. Every checkpoint is kept as a branch point.
TINY_PARENT = TINY_LM + ('--config.train.steps=8', '--config.schedule.warmup_steps=2',
                         '--config.checkpoint.every_steps=2', '--config.checkpoint.keep_every=2')
TINY_BRANCH = TINY_LM + ('--config.schedule.branch_from=runs/constant@4',
                         '--config.schedule.warmup_steps=2', '--config.train.steps=6',
                         '--config.schedule.decay_steps=2', '--config.checkpoint.every_steps=2',
                         '--config.checkpoint.keep_every=2')
TINY_DRY_RUN = ('--config.model.d_model=32', '--config.model.n_layers=1',
                '--config.model.d_ff=64', '--config.data.seq_len=32',
                '--config.train.global_batch_size=16')
TRAIN_TINY = 'python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/tiny'
TINY_LLAMA = ('--config.model.n_heads=2', '--config.model.n_kv_heads=1',
              '--config.model.vocab_size=320', '--config.train.global_batch_size=8')
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
NO_LIBTPU = "needs libtpu, which is not installed: pip install -e '.[tpu]'"


@dataclasses.dataclass(frozen=True)
class Check:
    """How one README command is checked.

    kind: 'run' runs it (`flags` replace the README's flag of the same name, or are appended;
    `replace` edits the text first, e.g. a placeholder); 'same_as' runs `command` instead, after
    checking that `script` contains `script_line`, the line the README's command executes;
    'script' checks a launcher that needs a cluster (`bash -n`, or that a file exists);
    'module' imports a long experiment's module (it trains for hours and rewrites committed
    results under docs/). Checks of one `scenario` run in table order in one folder.
    """
    kind: str
    scenario: str
    flags: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    command: str = ''
    script: str = ''
    script_line: str = ''
    expect: tuple[str, ...] = ()         # paths (relative to the folder) that must exist after
    output: str = ''                     # text the command's output must contain
    timeout_s: int = 600
    devices: int = 8                     # simulated CPU devices the command sees
    without_libtpu: str = ''             # without libtpu the command must fail with this text


CHECKS: dict[str, Check] = {
    # ---- quick start: the script's own command lines, run directly (not the whole test suite
    # recursively, nor a fresh .venv install).
    'bash launch/quickstart.sh train': Check(
        'same_as', 'quickstart', command=TRAIN_TINY, flags=TINY_LM, script='launch/quickstart.sh',
        script_line='.venv/bin/python -m pretrain.train --config=configs/lm_tiny.py '
                    '--workdir=runs/tiny "$@"',
        expect=('runs/tiny/checkpoints/4', 'runs/tiny/metrics.jsonl')),
    'bash launch/quickstart.sh train --config.train.steps=100': Check(
        'same_as', 'quickstart_short',
        command=TRAIN_TINY + ' --config.train.steps=100',
        flags=tuple(f for f in TINY_LM if not f.startswith('--config.train.steps=')) +
        ('--config.train.log_every=50', '--config.train.eval_every=100'),
        script='launch/quickstart.sh',
        script_line='.venv/bin/python -m pretrain.train --config=configs/lm_tiny.py '
                    '--workdir=runs/tiny "$@"',
        expect=('runs/tiny/checkpoints/100',)),
    'bash launch/quickstart.sh test': Check(
        'script', 'static', script='launch/quickstart.sh',
        script_line='.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"'),
    'bash launch/quickstart.sh test -m slow': Check(
        'script', 'static', script='launch/quickstart.sh',
        script_line='.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"'),
    # ---- the trainer; a second identical start of a finished run only says so.
    TRAIN_TINY: Check('run', 'train', flags=TINY_LM,
                      expect=('runs/tiny/checkpoints/4', 'runs/tiny/config.json')),
    'python -m pretrain.train --config=configs/lm_tiny.py --dry_run --dry_run_devices=16 '
    '--config.mesh.ici.fsdp=4 --config.mesh.ici.tensor=2': Check(
        'run', 'dry_run', flags=TINY_DRY_RUN, output="'fsdp': 4, 'tensor': 2"),
    # ---- TPU topologies: with libtpu the TPU compiler runs; without it, the message says how
    # to install it (and nothing else happens).
    'python -m pretrain.train --config=configs/llama_1b.py --dry_run --dry_run_topology=v5e:4x4': Check(
        'run', 'tpu', flags=TINY_DRY_RUN + TINY_LLAMA, replace=(('v5e:4x4', 'v5e:2x2'),),
        output='HBM per chip: fits', without_libtpu=NO_LIBTPU),
    'python -m pretrain.train --config=configs/lm_tiny.py --dry_run --dry_run_topology=v5e:2x2 '
    '--dry_run_slices=2 --config.mesh.ici.data=1 --config.mesh.ici.fsdp=4 --config.mesh.dcn.data=2': Check(
        'run', 'tpu', flags=TINY_DRY_RUN, output="'data': 2, 'fsdp': 4", without_libtpu=NO_LIBTPU),
    'python -m pretrain.tpu_fit --config=configs/llama_1b.py --topology=v5e:4x4': Check(
        'run', 'tpu', flags=TINY_DRY_RUN + TINY_LLAMA + ('--remat=none', '--grad_accum=1'),
        replace=(('v5e:4x4', 'v5e:2x2'),), output='best on v5e:2x2: remat=none',
        without_libtpu=NO_LIBTPU),
    'python -m experiments.tpu_fit': Check('module', 'static'),
    # ---- Hugging Face: export the finished tiny run, import it as step 0, train on from it.
    'python -m pretrain.export --workdir=runs/tiny --format=hf --out=exported/tiny': Check(
        'run', 'train', expect=('exported/tiny/config.json', 'exported/tiny/model.safetensors')),
    'python -m pretrain.import_hf --hf_dir=exported/tiny --config=configs/lm_tiny.py '
    '--workdir=runs/more': Check('run', 'train', flags=TINY_LM, expect=('runs/more/checkpoints/0',)),
    'python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/more': Check(
        'run', 'train', flags=TINY_LM, expect=('runs/more/checkpoints/4',)),
    'python -m pretrain.train --config=configs/ssm_tiny.py --workdir=runs/ssm': Check(
        'run', 'ssm', flags=TINY_SSM, expect=('runs/ssm/checkpoints/4',)),
    # ---- VAR: stage 1, stage 2 on it, sampling from stage 2.
    'python -m pretrain.train --config=configs/var_tokenizer_tiny.py --workdir=runs/var_tok': Check(
        'run', 'var', flags=TINY_VAR, expect=('runs/var_tok/checkpoints/4',)),
    'python -m pretrain.train --config=configs/var_tiny.py --workdir=runs/var '
    '--config.data.image.tokenizer_dir=runs/var_tok': Check(
        'run', 'var', flags=TINY_VAR, expect=('runs/var/checkpoints/4',)),
    'python -m model_zoo.var_sample --workdir=runs/var --cfg_scale=2 --top_k=20': Check(
        'run', 'var', flags=('--per_class=1',), expect=('runs/var/samples.png',)),
    # ---- branching a cooldown.
    'python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/constant '
    '--config.schedule.kind=constant --config.train.steps=2000 --config.schedule.warmup_steps=100': Check(
        'run', 'branching', flags=TINY_PARENT, expect=('runs/constant/checkpoints/4',)),
    'python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/cool1000 '
    '--config.schedule.branch_from=runs/constant@1000 --config.schedule.warmup_steps=100 '
    '--config.train.steps=1200 --config.schedule.decay_steps=200': Check(
        'run', 'branching', flags=TINY_BRANCH, expect=('runs/cool1000/checkpoints/6',)),
    # ---- scaling-study tools.
    'python -m pretrain.study.coord_check --config=configs/lm_tiny.py --widths=64,128,256,512 '
    '--steps=5 --out=runs/coord': Check(
        'run', 'coord_check',
        flags=('--widths=16,32', '--steps=2', '--config.model.n_layers=1', '--config.model.n_heads=2',
               '--config.model.n_kv_heads=1', '--config.data.seq_len=32',
               '--config.data.max_files=40', '--config.train.global_batch_size=8'),
        expect=('runs/coord/coord_check.json', 'runs/coord/coord_check.png')),
    'python -m pretrain.sweep --sweep=configs/sweeps/tiny_lr.py --workdir=runs/sweeps/tiny_lr '
    '--dry_run': Check('run', 'sweep_dry_run', output='d_model=64,lr=0.003'),
    # The sweep file is already tiny (4 runs of 8 steps); fit reads what it wrote.
    'python -m pretrain.sweep --sweep=configs/sweeps/tiny_lr.py --workdir=runs/sweeps/tiny_lr '
    '--parallel=2': Check('run', 'sweep', expect=('runs/sweeps/tiny_lr/results.jsonl',)),
    'python -m pretrain.fit --sweep_dir=runs/sweeps/tiny_lr': Check(
        'run', 'sweep', flags=('--bootstrap=0',), expect=('runs/sweeps/tiny_lr/fits.json',)),
    'python -m pretrain.fit --sweep_dir=DIR': Check(
        'run', 'sweep', replace=(('DIR', 'runs/sweeps/tiny_lr'),), flags=('--bootstrap=0',),
        expect=('runs/sweeps/tiny_lr/fit_summary.md',)),
    # ---- the µTransfer workflow: the sweeps listed (hours of training), the base chosen and the
    # verdicts computed from the committed results, written into the scenario folder. The
    # sweeps pin one device per run (runs go side by side on a CPU), so they are listed on one.
    'python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_base.py '
    '--workdir=docs/mutransfer/base_sweep --parallel=2': Check(
        'run', 'mutransfer', flags=('--dry_run',), devices=1,
        replace=(('docs/mutransfer/base_sweep', 'runs/base_sweep'),), output='64 runs'),
    'python -m pretrain.study.transfer --sweep_dir=docs/mutransfer/base_sweep '
    '--choose_base=configs/sweeps/mutransfer_tuned.py': Check(
        'run', 'mutransfer', flags=('--out=runs',),
        replace=(('configs/sweeps/mutransfer_tuned.py', 'runs/tuned.py'),),
        expect=('runs/tuned.py', 'runs/base_ranking.md')),
    'python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_width.py '
    '--workdir=docs/mutransfer/width_sweep --parallel=2 '
    '--reuse_from=docs/mutransfer/hidden_init_rule_sweep,docs/depth_transfer/depth_sweep': Check(
        'run', 'mutransfer', flags=('--dry_run',), devices=1,
        replace=(('docs/mutransfer/width_sweep', 'runs/width_sweep'),), output='409 runs'),
    'python -m pretrain.fit --sweep_dir=docs/mutransfer/width_sweep --transfer=width': Check(
        'run', 'mutransfer', flags=('--out=runs/transfer', '--bootstrap=1'),
        expect=('runs/transfer/transfer.md', 'runs/transfer/transfer.png')),
    'python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_ablation.py '
    '--workdir=docs/mutransfer/ablation_sweep --parallel=2 --reuse_from=docs/mutransfer/width_sweep': Check(
        'run', 'mutransfer', flags=('--dry_run',), devices=1,
        replace=(('docs/mutransfer/ablation_sweep', 'runs/ablation_sweep'),), output='118 runs'),
    'python -m pretrain.study.ablation --sweep=configs/sweeps/mutransfer_ablation.py '
    '--sweep_dir=docs/mutransfer/ablation_sweep': Check(
        'run', 'mutransfer', flags=('--out=runs/ablation',), expect=('runs/ablation/ablation.md',)),
    # ---- Muon vs AdamW: the sweep listed, the verdicts computed from the committed results.
    'python -m pretrain.sweep --sweep=configs/sweeps/optimizers.py '
    '--workdir=docs/optimizers/sweep --parallel=1': Check(
        'run', 'optimizers', flags=('--dry_run',), devices=1,
        replace=(('docs/optimizers/sweep', 'runs/opt_sweep'),), output='144 runs'),
    'python -m experiments.optimizers': Check(
        'run', 'optimizers', flags=('--out=runs',), expect=('runs/optimizers.md', 'runs/optimizers.png')),
    # ---- one machine, two processes.
    'python -m launch.local --num_processes=2 --devices_per_process=4 --timeout_s=600 -- '
    'python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/mp': Check(
        'run', 'launch_local', flags=TINY_LM, expect=('runs/mp/checkpoints/4',)),
    # ---- launchers for clusters this machine does not have: their scripts parse.
    'sbatch --nodes=4 launch/slurm.sbatch --config=configs/lm_tiny.py '
    '--workdir=/shared/runs/NAME': Check('script', 'static', script='launch/slurm.sbatch'),
    'bash launch/tpu_vm.sh TPU_NAME ZONE [PROJECT] -- --config=configs/lm_tiny.py '
    '--workdir=gs://BUCKET/runs/NAME': Check('script', 'static', script='launch/tpu_vm.sh'),
    'kubectl apply -f launch/k8s_job.yaml': Check(
        'script', 'static', script='launch/k8s_job.yaml', script_line='name: pretrain'),
    'kubectl logs -f job/pretrain': Check(
        'script', 'static', script='launch/k8s_job.yaml', script_line='kind: Job'),
    # ---- experiments and benchmarks: hours of training that rewrite committed docs/ results.
    'python -m experiments.var_tiny': Check('module', 'static'),
    'python -m experiments.mutransfer': Check('module', 'static'),
    'python -m experiments.wsd_vs_cosine': Check('module', 'static'),
    'python -m experiments.scaling_study': Check('module', 'static'),
    'python -m benchmarks.ssm_vs_attention': Check('module', 'static'),
    # ---- needs the official VAR files, which nothing here downloads; the conversion itself
    # is checked on files in the official layout by tests/test_var_official_interop.py.
    'python -m pretrain.var_official --vae=VAE.pth --var=var_d16.pth --config=configs/var_d16.py '
    '--workdir=runs/var_d16_official': Check('module', 'static'),
}

SLOW_SCENARIOS = {'quickstart', 'quickstart_short', 'train', 'ssm', 'var', 'branching',
                  'coord_check', 'sweep', 'launch_local', 'mutransfer', 'optimizers'}


def readme_commands(text: str) -> list[str]:
    """The shell commands `text` (Markdown) shows, whitespace-normalised, in order."""
    commands = []
    fence = re.compile(r'^([ \t]*)```(\w*)[ \t]*\n(.*?)^\1```', re.M | re.S)
    for match in fence.finditer(text):
        if match.group(2) not in SHELL_LANGUAGES:
            continue
        for line in match.group(3).replace('\\\n', ' ').splitlines():
            line = re.sub(r'(^|\s)#.*$', '', line)   # a trailing comment
            if line.strip():
                commands.append(' '.join(line.split()))
    prose = fence.sub('', text)
    for span in re.findall(r'`([^`]+)`', prose):
        span = ' '.join(span.split())
        if span.startswith(('python -m ', 'bash launch/')):
            commands.append(span)
    return commands


def with_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` with each `--name=value` of `flags` replacing the same `--name=` (or appended)."""
    argv = list(argv)
    for flag in flags:
        name = flag.split('=', 1)[0] + '='
        places = [i for i, arg in enumerate(argv) if arg.startswith(name)]
        if places:
            argv[places[-1]] = flag
        else:
            argv.append(flag)
    return argv


def tiny_argv(command: str, check: Check) -> list[str]:
    for old, new in check.replace:
        command = command.replace(old, new)
    argv = with_flags(shlex.split(command), check.flags)
    return [sys.executable if arg == 'python' else arg for arg in argv]


def run_command(argv: list[str], cwd: str, timeout_s: int,
                devices: int = 8) -> subprocess.CompletedProcess:
    """Runs `argv` in its own session; on timeout kills that session's process group only."""
    python_path = os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))
    env = dict(os.environ, PYTHONPATH=python_path, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    if 'launch.local' not in argv:   # multi-process CPU runs must not share a compilation cache
        env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, '.jax_cache'),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f'{" ".join(argv)} ran past {timeout_s}s:\n{out[-3000:]}')
    finally:
        if proc.poll() is None:   # an error in this test: leave nothing running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out)


def run_checked(command: str, check: Check, folder: str) -> str:
    if check.kind == 'same_as':
        with open(os.path.join(ROOT, check.script)) as f:
            assert check.script_line in f.read(), f'{check.script} no longer runs {check.script_line}'
        command = check.command
    result = run_command(tiny_argv(command, check), folder, check.timeout_s, check.devices)
    if check.without_libtpu and not HAS_LIBTPU:
        assert result.returncode != 0 and check.without_libtpu in result.stdout, (
            f'{command} without libtpu:\n{result.stdout[-2000:]}')
        return result.stdout
    assert result.returncode == 0, f'README command failed: {command}\n{result.stdout[-4000:]}'
    for path in check.expect:
        assert os.path.exists(os.path.join(folder, path)), f'{command}: no {path}\n{result.stdout[-2000:]}'
    assert check.output in result.stdout, f'{command}: no {check.output!r}\n{result.stdout[-2000:]}'
    return result.stdout


def scenario_folder(tmp_path) -> str:
    for name in ('configs', 'launch', 'docs'):   # docs/: committed sweep results, read only
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    return str(tmp_path)


def scenario_commands(scenario: str) -> list[tuple[str, Check]]:
    return [(command, check) for command, check in CHECKS.items() if check.scenario == scenario]


# ----------------------------------------------------------------------------- the table

def test_every_readme_command_has_a_check():
    with open(README) as f:
        shown = set(readme_commands(f.read()))
    untested = sorted(shown - set(CHECKS))
    assert not untested, ('README commands without a check in tests/test_readme.py CHECKS (add one '
                          'with its tiny sizes): ' + '; '.join(untested))
    stale = sorted(set(CHECKS) - shown)
    assert not stale, 'CHECKS entries the README no longer shows: ' + '; '.join(stale)
    scenarios = {check.scenario for check in CHECKS.values()} - {'static'}
    assert SLOW_SCENARIOS <= scenarios


def test_command_extraction_and_flag_replacement():
    text = ('Run `python -m a.b --x=1\n  --y=2` or\n\n  ```bash\n  python -m c \\\n'
            '      --z=3   # note\n  bash launch/d.sh\n  ```\n\n```\nnot a command\n```\n')
    assert readme_commands(text) == ['python -m c --z=3', 'bash launch/d.sh',
                                     'python -m a.b --x=1 --y=2']
    assert with_flags(['p', '--a=1', '--b=2'], ('--b=5', '--c=3')) == ['p', '--a=1', '--b=5', '--c=3']


# ----------------------------------------------------------------------------- the commands

def test_static_checks():
    """Launchers for clusters parse (`bash -n`) and name what the README says; experiment
    modules exist and import."""
    for command, check in scenario_commands('static'):
        if check.kind == 'module':
            module = command.split()[2]
            assert importlib.util.find_spec(module) is not None, command
            result = run_command([sys.executable, '-c', f'import {module}; assert {module}.main'],
                                 ROOT, 300)
            assert result.returncode == 0, f'{command}:\n{result.stdout[-2000:]}'
            continue
        path = os.path.join(ROOT, check.script)
        assert os.path.exists(path), f'{command}: {check.script} is missing'
        with open(path) as f:
            assert check.script_line in f.read(), f'{check.script} lacks {check.script_line!r}'
        if path.endswith(('.sh', '.sbatch')):
            result = run_command(['bash', '-n', path], ROOT, 60)
            assert result.returncode == 0, f'{check.script}: {result.stdout}'


@pytest.mark.parametrize('scenario', ['dry_run', 'sweep_dry_run', 'tpu'])
def test_cheap_readme_commands(scenario, tmp_path):
    folder = scenario_folder(tmp_path)
    for command, check in scenario_commands(scenario):
        run_checked(command, check, folder)
    assert not os.path.exists(tmp_path / 'runs' / 'tiny')   # a dry run writes nothing


@pytest.mark.slow
@pytest.mark.parametrize('scenario', sorted(SLOW_SCENARIOS))
def test_readme_commands(scenario, tmp_path):
    folder = scenario_folder(tmp_path)
    for command, check in scenario_commands(scenario):
        run_checked(command, check, folder)
    if scenario == 'train':   # the same command again on the finished run: one line, exit 0
        again = run_command(tiny_argv(TRAIN_TINY, CHECKS[TRAIN_TINY]), folder, 300)
        assert again.returncode == 0, again.stdout[-3000:]
        assert 'runs/tiny is already finished' in again.stdout and 'step 4' in again.stdout
        assert 'compiling' not in again.stdout
