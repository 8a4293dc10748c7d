"""Bad input to the trainer's command line: every case fails cleanly.

Each case runs `python -m pretrain.train` as a user would and must: exit non-zero, print at most
a few lines on stderr, name the key, flag or file at fault, and write nothing (no workdir). Add a
row whenever a key or an input is added. The cases run two at a time (each is one process start,
a few seconds of imports; validation fails before JAX compiles anything).
"""

import os
import random
import subprocess
import sys

import pytest

from tests.test_fault_tolerance import ROOT, _env

MAX_STDERR_LINES = 5

# name: (arguments after --config=... --workdir=..., words stderr must contain)
# In arguments, {tmp} is a per-case folder and {config} replaces the --config value.
CASES = {
    # mistyped flags and config files
    'mistyped key train.step': (['--config.train.step=40'], ['train.step', 'train.steps']),
    'mistyped key optim.lrr': (['--config.optim.lrr=1e-3'], ['optim.lrr', 'optim.lr']),
    'mistyped section': (['--config.optimm.lr=1e-3'], ['optimm.lr', 'optim.lr']),
    'value of the wrong type': (['--config.train.steps=abc'], ['train.steps', 'abc']),
    'missing config file': (['{config}={tmp}/missing.py'], ['missing.py', 'no such file']),
    'config file with a syntax error': (['{config}={tmp}/syntax.py'],
                                        ['syntax.py', 'syntax error at line 3']),
    'config file that raises': (['{config}={tmp}/raises.py'],
                                ['raises.py', 'NameError', 'line 5']),
    # NaN and inf in float keys
    'optim.eps=nan': (['--config.optim.eps=nan'], ['optim.eps=nan']),
    'optim.weight_decay=nan': (['--config.optim.weight_decay=nan'], ['optim.weight_decay=nan']),
    'optim.grad_clip=nan': (['--config.optim.grad_clip=nan'], ['optim.grad_clip=nan']),
    'optim.lr=inf': (['--config.optim.lr=inf'], ['optim.lr=inf']),
    'model.init_std=-inf': (['--config.model.init_std=-inf'], ['model.init_std=-inf']),
    'checkpoint.every_minutes=nan': (['--config.checkpoint.every_minutes=nan'],
                                     ['checkpoint.every_minutes=nan']),
    # values out of range
    'model.d_model=0': (['--config.model.d_model=0'], ['model.d_model=0']),
    'model.n_layers=0': (['--config.model.n_layers=0'], ['model.n_layers=0']),
    'seed=-1': (['--config.seed=-1'], ['seed=-1']),
    'train.max_consecutive_skips=0': (['--config.train.max_consecutive_skips=0'],
                                      ['train.max_consecutive_skips=0']),
    'train.nonfinite_policy=skp': (['--config.train.nonfinite_policy=skp'],
                                   ['train.nonfinite_policy', 'skip']),
    'schedule.total_steps < train.steps': (['--config.schedule.total_steps=300'],
                                           ['schedule.total_steps=300', 'train.steps=600']),
    # files and folders
    'workdir is a file': (['--workdir={tmp}/a_file'], ['a_file', 'is a file']),
    'workdir under a file': (['--workdir={tmp}/a_file/run'], ['a_file', 'cannot be created']),
    'text folder of random bytes': (['--config.data.source=text_files',
                                     '--config.data.text_dir={tmp}/random_bytes'],
                                    ['data.text_dir', 'random_bytes', 'not UTF-8']),
    'text folder that does not exist': (['--config.data.source=text_files',
                                         '--config.data.text_dir={tmp}/nowhere'],
                                        ['data.text_dir', 'nowhere']),
}

_SYNTAX_ERROR = 'from configs import lm_tiny\n\ndef get_config(:\n    return lm_tiny.get_config()\n'
_RAISES = ('from configs import lm_tiny\n\n\ndef get_config():\n'
           '    c = lm_tiny.get_config(); c.optim.lr = learning_rate\n    return c\n')


def _prepare(tmp: str) -> None:
    """The files the cases refer to."""
    os.makedirs(tmp)
    with open(os.path.join(tmp, 'syntax.py'), 'w') as f:
        f.write(_SYNTAX_ERROR)
    with open(os.path.join(tmp, 'raises.py'), 'w') as f:
        f.write(_RAISES)
    with open(os.path.join(tmp, 'a_file'), 'w') as f:
        f.write('not a folder\n')
    folder = os.path.join(tmp, 'random_bytes')
    os.makedirs(folder)
    rng = random.Random(0)
    for i in range(4):
        with open(os.path.join(folder, f'part{i}.txt'), 'wb') as f:
            f.write(bytes(rng.randrange(256) for _ in range(4096)))


def _run_case(name: str, tmp: str) -> tuple[subprocess.CompletedProcess, str, list[str]]:
    args, _ = CASES[name]
    args = [a.format(tmp=tmp, config='--config') for a in args]
    workdir = os.path.join(tmp, 'run')
    base = ['--config=configs/lm_tiny.py', f'--workdir={workdir}']
    if any(a.startswith('--config=') for a in args):
        base = base[1:]
    if any(a.startswith('--workdir=') for a in args):
        base = [b for b in base if not b.startswith('--workdir=')]
    before = sorted(os.listdir(tmp))
    out = subprocess.run([sys.executable, '-m', 'pretrain.train', *base, *args], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=180)
    return out, workdir, before


# One case per kind of mistake runs by default; the whole table with -m slow.
DEFAULT_CASES = ('mistyped key train.step', 'missing config file', 'config file with a syntax error',
                 'optim.grad_clip=nan', 'model.d_model=0', 'seed=-1', 'workdir is a file',
                 'text folder of random bytes', 'schedule.total_steps < train.steps')


@pytest.mark.parametrize('name', [
    pytest.param(name, marks=() if name in DEFAULT_CASES else pytest.mark.slow) for name in CASES])
def test_bad_input_fails_cleanly(name, tmp_path):
    tmp = str(tmp_path / 'case')
    _prepare(tmp)
    out, workdir, before = _run_case(name, tmp)
    stderr = out.stderr.strip()
    lines = stderr.splitlines()
    assert out.returncode != 0, stderr[-2000:]
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert len(lines) <= MAX_STDERR_LINES, stderr[-3000:]
    for word in CASES[name][1]:
        assert word in stderr, stderr
    assert not os.path.exists(workdir) or name.startswith('workdir')
    assert sorted(os.listdir(tmp)) == before   # nothing written beside it either
    assert not os.path.exists(os.path.join(ROOT, 'run'))


# The study tools: (module and arguments, words stderr must contain). {tmp} as above.
STUDY_CASES = {
    'sweep file with a syntax error': (['pretrain.sweep', '--sweep={tmp}/syntax.py',
                                        '--workdir={tmp}/sweep'], ['syntax.py', 'line 3']),
    'sweep file missing': (['pretrain.sweep', '--sweep={tmp}/missing.py', '--workdir={tmp}/sweep'],
                           ['missing.py', 'no such file']),
    'fit on a missing folder': (['pretrain.fit', '--sweep_dir={tmp}/nowhere'],
                                ['nowhere', 'no results.jsonl']),
    'fit on a garbled results.jsonl': (['pretrain.fit', '--sweep_dir={tmp}/garbled'],
                                       ['results.jsonl:2', 'not a JSON row']),
    'fit on an empty results.jsonl': (['pretrain.fit', '--sweep_dir={tmp}/empty'],
                                      ['results.jsonl', 'empty']),
    'fit --max_size below every size': (['pretrain.fit', '--sweep_dir=docs/mutransfer/ssm_sweep',
                                         '--transfer=width', '--max_size=16', '--out={tmp}/sweep'],
                                        ['--max_size=16', 'widths are [32, 64, 128]']),
    'fit --max_size without --transfer': (['pretrain.fit', '--sweep_dir={tmp}/garbled',
                                           '--max_size=64'], ['--max_size=64', '--transfer']),
    'trainer without --config': (['pretrain.train', '--workdir={tmp}/sweep'],
                                 ['--config=FILE', '--workdir=DIR']),
}


@pytest.mark.parametrize('name', [
    pytest.param(name, marks=() if name == 'fit on a garbled results.jsonl' else pytest.mark.slow)
    for name in STUDY_CASES])
def test_study_tools_fail_cleanly_on_bad_input(name, tmp_path):
    tmp = str(tmp_path / 'case')
    _prepare(tmp)
    for folder, text in (('garbled', '{"name": "a"}\n{garbled\n'), ('empty', '')):
        os.makedirs(os.path.join(tmp, folder, 'runs'))
        with open(os.path.join(tmp, folder, 'results.jsonl'), 'w') as f:
            f.write(text)
    before = {folder: sorted(os.listdir(os.path.join(tmp, folder))) for folder in ('garbled', 'empty')}
    module, *args = STUDY_CASES[name][0]
    out = subprocess.run([sys.executable, '-m', module, *[a.format(tmp=tmp) for a in args]],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    stderr = out.stderr.strip()
    assert out.returncode != 0, stderr[-2000:]
    assert 'Traceback' not in stderr and len(stderr.splitlines()) <= MAX_STDERR_LINES, stderr[-3000:]
    for word in STUDY_CASES[name][1]:
        assert word in stderr, stderr
    assert not os.path.exists(os.path.join(tmp, 'sweep'))
    assert before == {f: sorted(os.listdir(os.path.join(tmp, f))) for f in ('garbled', 'empty')}
