"""Ahead-of-time compilation for TPU topologies (pretrain/tpu.py, --dry_run_topology, tpu_fit).

The first tests need no libtpu (names, messages, the estimate's arithmetic). The ones marked
`tpu` compile the real train step of every family with the TPU compiler; they need the tpu extra
(pip install -e '.[tpu]') and run with `pytest -m tpu`; without libtpu they are skipped.
"""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

import model_zoo
from configs import ssm_tiny
from experiments import tpu_fit as tpu_fit_experiment
from pretrain import setup as setup_lib
from pretrain import tpu, tpu_fit
from pretrain.errors import ConfigError
from tests.helpers import tiny_config, with_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")


def _cli(module, *args, timeout=900):
    return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.mark.parametrize('name', ['v5e', 'v9:2x2', 'v5e:2x', 'v5e:0x2', 'v5e:2x2x2x2'])
def test_a_bad_topology_name_says_what_is_allowed(name):
    with pytest.raises(tpu.TopologyError, match=r"expected CHIP:AxB\[xC\]|must be >= 1"):
        tpu.parse(name)


def test_topology_names_parse():
    chip, grid = tpu.parse('v5p:4x4x8')
    assert chip.name == 'v5p' and grid == (4, 4, 8)
    assert tpu.parse('v6e:16x16')[0].hbm_bytes == 32 * tpu.GIB


def test_missing_or_mismatched_libtpu_is_a_clear_error(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, 'version', missing)
    with pytest.raises(tpu.TopologyError, match=r"libtpu, which is not installed: pip install -e '\.\[tpu\]'"):
        tpu.check_libtpu()
    monkeypatch.setattr(importlib.metadata, 'version', lambda name: '0.0.1')
    monkeypatch.setattr(tpu, 'libtpu_requirement', lambda: 'libtpu==0.0.42.*')
    with pytest.raises(tpu.TopologyError, match=r'libtpu 0\.0\.1 is installed but jax .* expects libtpu==0\.0\.42\.\*'):
        tpu.check_libtpu()
    monkeypatch.setattr(importlib.metadata, 'version', lambda name: '0.0.42.1')
    assert tpu.check_libtpu() == '0.0.42.1'


def test_the_roofline_estimate_by_hand():
    chip = tpu.CHIPS['v5e']
    result = {'xla_flops_per_device': 197e12 * 0.010, 'xla_bytes_accessed_per_device': 819e9 * 0.004,
              'flops_per_step': 4 * 197e12 * 0.008, 'total_bytes': 17 * tpu.GIB}
    e = tpu.estimate(result, chip, num_devices=4)
    assert e['step_s'] == pytest.approx(0.010) and e['bound'] == 'compute'
    assert e['mfu'] == pytest.approx(0.8) and not e['fits']
    assert e['headroom_bytes'] == -tpu.GIB
    assert 'DOES NOT FIT: over by 1.00 GiB' in tpu.describe(e, 'v5e:2x2', 1)
    # XLA does not count FLOPs inside custom calls (the splash kernel): the model's own count
    # bounds the step from below, so the estimated MFU never exceeds 100%.
    hidden = dict(result, xla_flops_per_device=197e12 * 0.002)
    e = tpu.estimate(hidden, chip, num_devices=4)
    assert e['step_s'] == pytest.approx(0.008) and e['mfu'] == pytest.approx(1.0)
    # With micro-batches the step is a scan and XLA counts its body once: the counts are per
    # micro-batch and the estimate multiplies them by the trip count.
    looped = dict(result, grad_accum_steps=4, xla_flops_per_device=197e12 * 0.0025,
                  xla_bytes_accessed_per_device=819e9 * 0.003)
    e = tpu.estimate(looped, chip, num_devices=4)
    assert e['hbm_s'] == pytest.approx(0.012) and e['compute_s'] == pytest.approx(0.010)
    assert e['bound'] == 'memory' and e['mfu'] == pytest.approx(0.008 / 0.012)


def test_fit_table_says_why_nothing_fits():
    """A (config, slice) with no fit names the smallest need the compiler reported and the
    micro-batch counts the config refused, instead of a bare 'nothing fits'."""
    oom = ('compiler: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required '
           'for HLO temporaries ({}G) exceeds available HBM (15.75G).')
    candidates = [
        {'remat': 'none', 'grad_accum': 1, 'fits': False, 'error': oom.format('28.73')},
        {'remat': 'none', 'grad_accum': 2, 'fits': False,
         'error': 'config: train.global_batch_size=256 / grad_accum_steps=2 = 128 sequences ...'},
        {'remat': 'full', 'grad_accum': 1, 'fits': False, 'error': oom.format('18.67')}]
    why = tpu_fit.nothing_fits(candidates)
    assert '18.67G of temporaries (remat full, accum 1) against 15.75G free' in why
    candidates.append({'remat': 'full', 'grad_accum': 4, 'tensor': 4, 'fits': False,
                       'error': oom.format('16.20')})
    assert '16.20G of temporaries (tensor 4, remat full, accum 4)' in tpu_fit.nothing_fits(candidates)
    assert '; 1 micro-batch counts refused' in why
    assert tpu_fit.nothing_fits([]) == 'nothing tried fits'


def test_layouts_are_tried_in_order_until_one_fits(monkeypatch):
    """The config's mesh first; a tensor-parallel layout only while nothing fits; the search
    stops at the first layout with a fit (the roofline cannot rank layouts)."""
    compiled = []

    def fake_compile(config, devices, remat, grad_accum, tensor, families):
        compiled.append((tensor, remat, grad_accum))
        candidate = tpu_fit.Candidate(remat, grad_accum, tensor)
        if tensor == 4 and remat == 'full':
            candidate.result = {'tpu': {'fits': True, 'step_s': 1.0 / grad_accum}}
        else:
            candidate.error = 'compiler: RESOURCE_EXHAUSTED'
        return candidate

    monkeypatch.setattr(tpu, 'devices', lambda topology, slices: list(range(16)))
    monkeypatch.setattr(tpu_fit, '_compile', fake_compile)
    monkeypatch.setattr(tpu_fit, '_line', lambda candidate: '')
    advice = tpu_fit.advise(None, 'v5e:4x4', remats=('none', 'full'), grad_accums=(1, 2),
                            layouts=(None, 4, 8))
    assert compiled == [(None, 'none', 1), (None, 'none', 2), (None, 'full', 1),
                        (None, 'full', 2), (4, 'none', 1), (4, 'none', 2), (4, 'full', 1)]
    assert advice['best']['tensor'] == 4 and advice['best']['remat'] == 'full'
    assert 'mesh.ici.tensor=4, remat=full' in tpu_fit.summary(
        {**advice, 'best': {**advice['best'], 'dry_run': {'tpu': {
            'step_s': 1.0, 'mfu': 0.5, 'headroom_bytes': 0}}}})
    # An interrupted search resumes from the rows it recorded: nothing is compiled again.
    recorded = []
    compiled.clear()
    tpu_fit.advise(None, 'v5e:4x4', remats=('none', 'full'), grad_accums=(1, 2),
                   layouts=(None, 4), record=recorded.append)
    # Each compile is recorded before it starts (as died) and after: 7 of each.
    assert [rows[-1]['error'].startswith(tpu_fit.DIED) for rows in recorded] == [True, False] * 7
    recorded = recorded[1::2]
    assert len(recorded) == 7 and len(recorded[-1]) == 7 and len(recorded[0]) == 1
    compiled.clear()
    again = tpu_fit.advise(None, 'v5e:4x4', remats=('none', 'full'), grad_accums=(1, 2),
                           layouts=(None, 4), done=recorded[3])
    assert compiled == [(4, 'none', 1), (4, 'none', 2), (4, 'full', 1)]
    assert again['best'] == advice['best']
    with pytest.raises(ConfigError, match='--tensor: 3 must be a positive divisor of the 16'):
        tpu_fit.advise(None, 'v5e:4x4', layouts=(None, 3))
    # A saved search goes on only with the layouts it lacks, and only while nothing fits.
    saved = {'best': None, 'candidates': [{'remat': 'full', 'grad_accum': 1}]}   # no 'tensor' key
    assert tpu_fit.layouts_left(saved, (None, 4, 8)) == [4, 8]
    assert tpu_fit.layouts_left({**saved, 'best': advice['best']}, (None, 4, 8)) == []
    assert tpu_fit.layouts_left({**saved, 'error': 'config: ...'}, (None, 4, 8)) == []


def test_a_compile_that_ended_the_process_is_an_answer_on_resume(monkeypatch):
    """The out-of-memory killer leaves no exception: the row saved before the compile stays,
    and a resumed search reports it instead of dying on it again; an interrupt leaves no row."""
    compiled, saved = [], []

    def killed_compile(config, devices, remat, grad_accum, tensor, families):
        compiled.append((remat, grad_accum))
        if (remat, grad_accum) == ('full', 2):
            raise SystemExit(137)   # stands in for the process ending mid-compile
        return tpu_fit.Candidate(remat, grad_accum, tensor, error='compiler: RESOURCE_EXHAUSTED')

    monkeypatch.setattr(tpu, 'devices', lambda topology, slices: list(range(16)))
    monkeypatch.setattr(tpu_fit, '_compile', killed_compile)
    monkeypatch.setattr(tpu_fit, '_line', lambda candidate: '')
    search = dict(remats=('full',), grad_accums=(1, 2, 4), record=saved.append)
    with pytest.raises(SystemExit):
        tpu_fit.advise(None, 'v5e:4x4', **search)
    assert saved[-1][-1]['grad_accum'] == 2 and saved[-1][-1]['error'] == tpu_fit.DIED_TEXT
    compiled.clear()
    advice = tpu_fit.advise(None, 'v5e:4x4', done=saved[-1], **search)
    assert compiled == [('full', 4)]
    assert [c['error'][:8] for c in advice['candidates']] == ['compiler', 'died: th', 'compiler']
    assert 'ended the compiling process' in tpu_fit_experiment._row({**advice, 'config': 'c'})

    def interrupted_compile(config, devices, remat, grad_accum, tensor, families):
        raise KeyboardInterrupt

    saved.clear()
    monkeypatch.setattr(tpu_fit, '_compile', interrupted_compile)
    with pytest.raises(KeyboardInterrupt):
        tpu_fit.advise(None, 'v5e:4x4', **search)
    assert saved[-1] == []   # nothing to resume from: the candidate is compiled again


def test_micro_batch_counts_that_cannot_fit_are_not_compiled(monkeypatch):
    """A refusal at a micro-batches asking T bounds every count a' > a from below by T a / a'
    (only activations shrink; halved for the compiler's scheduling): the counts whose bound
    fits are compiled, the rest skipped."""
    compiled = []
    oom = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
           'temporaries ({:.2f}G) exceeds available HBM (15.75G).')

    def fake_compile(config, devices, remat, grad_accum, tensor, families):
        compiled.append((remat, grad_accum))
        candidate = tpu_fit.Candidate(remat, grad_accum, tensor)
        asked = 2.0 + 188.0 / grad_accum   # 190G at one micro-batch, 25.5G at 8, 13.75G at 16
        if asked > 15.75:
            candidate.error = 'compiler: ' + oom.format(asked)
        else:
            candidate.result = {'tpu': {'fits': True, 'step_s': 1.0}}
        return candidate

    monkeypatch.setattr(tpu, 'devices', lambda topology, slices: list(range(16)))
    monkeypatch.setattr(tpu_fit, '_compile', fake_compile)
    monkeypatch.setattr(tpu_fit, '_line', lambda candidate: '')
    advice = tpu_fit.advise(None, 'v5e:4x4', remats=('none',), grad_accums=(1, 2, 4, 8, 16))
    # Halved bounds from 190G: 47.5, 23.75 (skipped), 11.9 at 8 (compiled: refused at 25.5G),
    # then from 25.5G at 8: 6.4 at 16 (compiled, fits).
    assert compiled == [('none', 1), ('none', 8), ('none', 16)]
    skipped = [c for c in advice['candidates'] if c['error'].startswith(tpu_fit.SKIPPED)]
    assert [c['grad_accum'] for c in skipped] == [2, 4]
    assert 'more than 23.75G of temporaries against 15.75G free' in skipped[-1]['error']
    assert advice['best']['grad_accum'] == 16
    compiled.clear()   # --all compiles every count
    tpu_fit.advise(None, 'v5e:4x4', remats=('none',), grad_accums=(1, 2, 4, 8, 16),
                   exhaustive=True)
    assert compiled == [('none', 1), ('none', 2), ('none', 4), ('none', 8), ('none', 16)]
    compiled.clear()   # a resumed search bounds from a refusal it recorded before and decides
    done = advice['candidates'][:3]   # its skips afresh (the 1 compiled row, 2 skipped)
    tpu_fit.advise(None, 'v5e:4x4', remats=('none',), grad_accums=(1, 2, 4, 8, 16), done=done)
    assert compiled == [('none', 8), ('none', 16)]


def test_cli_flag_misuse_is_a_usage_error():
    out = _cli('pretrain.train', '--config=configs/lm_tiny.py', '--workdir=unused',
               '--dry_run_topology=v5e:2x2')
    assert out.returncode != 0 and 'need --dry_run' in out.stderr
    out = _cli('pretrain.train', '--config=configs/lm_tiny.py', '--dry_run',
               '--dry_run_topology=v5e:2x2', '--dry_run_devices=4')
    assert out.returncode != 0 and 'not both' in out.stderr
    out = _cli('pretrain.train', '--config=configs/lm_tiny.py', '--dry_run',
               '--dry_run_topology=tpu9:2x2')
    assert out.returncode != 0 and "--dry_run_topology='tpu9:2x2'" in out.stderr
    out = _cli('pretrain.tpu_fit', '--config=configs/lm_tiny.py', '--topology=v5e:2x2',
               '--tensor=four')
    assert out.returncode != 0 and '--tensor=four must be integers' in out.stderr


# --- with libtpu: the TPU compiler itself -------------------------------------------------------

def _tpu_report(c, topology='v5e:2x2', num_slices=1):
    from pretrain import dry_run
    setup = setup_lib.build(c, tpu.devices(topology, num_slices), families=model_zoo.FAMILIES,
                            check_data=False)
    return dry_run.report(setup, topology, num_slices, quiet=True)


def _ssm(version, **ssm):
    c = ssm_tiny.get_config()
    c.model.update(d_model=32, n_layers=2, vocab_size=264)
    c.model.ssm.update(version=version, d_state=8, chunk_size=8, headdim=16, **ssm)
    c.data.seq_len = 32
    c.train.global_batch_size = 8
    return with_mesh(c, data=2, fsdp=2)


def _var(stage: str):
    from configs import var_tiny, var_tokenizer_tiny
    c = (var_tiny if stage == 'var' else var_tokenizer_tiny).get_config()
    c.train.global_batch_size = 8
    return with_mesh(c, data=2, fsdp=2)


FAMILY_CONFIGS = {
    'transformer': lambda: with_mesh(tiny_config(), data=2, tensor=2),
    'transformer_sequence': lambda: with_mesh(tiny_config(), fsdp=2, sequence=2),
    'mamba1_sequential': lambda: _ssm(1, scan='sequential'),
    'mamba1_associative': lambda: _ssm(1, scan='associative'),
    'mamba1_chunked': lambda: _ssm(1, scan='chunked'),
    'mamba2': lambda: _ssm(2),
    'hybrid': lambda: _ssm(2, attn_every=2),
    'var_tokenizer': lambda: _var('tokenizer'),
    'var': lambda: _var('var'),
}


@pytest.mark.tpu
@needs_libtpu
@pytest.mark.parametrize('name', sorted(FAMILY_CONFIGS))
def test_every_family_compiles_for_a_tpu_topology(name):
    result = _tpu_report(FAMILY_CONFIGS[name]())
    t = result['tpu']
    assert t['chip'] == 'v5e' and t['fits'] and result['total_bytes'] > 0
    assert result['xla_flops_per_device'] > 0 and 0 < t['mfu'] <= 1


@pytest.mark.tpu
@needs_libtpu
def test_tpu_memory_sees_remat_where_the_cpu_compiler_does_not():
    def cfg(remat):
        c = with_mesh(tiny_config(), data=4)
        c.model.update(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768, remat=remat)
        c.data.seq_len = 512
        c.train.global_batch_size = 16
        return c

    none, full = _tpu_report(cfg('none')), _tpu_report(cfg('full'))
    assert full['temp_bytes'] < 0.7 * none['temp_bytes']
    assert full['xla_flops_per_device'] > none['xla_flops_per_device']   # the recomputation


@pytest.mark.tpu
@needs_libtpu
def test_micro_batches_are_counted_once_by_xla_and_scaled_by_the_estimate():
    """The TPU compiler's cost analysis counts the micro-batch scan's body once; without the
    scaling, more micro-batches would look cheaper and the advisor would prefer them."""
    def cfg(accum):
        c = with_mesh(tiny_config(), data=4)
        c.train.global_batch_size = 16
        c.train.grad_accum_steps = accum
        return c

    one, four = _tpu_report(cfg(1)), _tpu_report(cfg(4))
    assert four['grad_accum_steps'] == 4
    assert four['xla_flops_per_device'] < 0.4 * one['xla_flops_per_device']
    assert four['tpu']['compute_s'] == pytest.approx(one['tpu']['compute_s'], rel=0.2)
    assert four['tpu']['hbm_s'] > 0.8 * one['tpu']['hbm_s']


@pytest.mark.tpu
@needs_libtpu
def test_multislice_mesh_spreads_data_over_slices():
    c = with_mesh(tiny_config(), fsdp=4)
    c.mesh.dcn.update(data=2)
    result = _tpu_report(c, 'v5e:2x2', num_slices=2)
    assert result['mesh']['data'] == 2 and result['mesh']['fsdp'] == 4


@pytest.mark.tpu
@needs_libtpu
def test_the_cli_prints_the_fit_and_the_advisor_picks_the_fastest_fit(tmp_path):
    tiny = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.n_layers=1',
            '--config.data.seq_len=32', '--config.train.global_batch_size=16']
    out = _cli('pretrain.train', '--config=configs/lm_tiny.py', '--dry_run',
               '--dry_run_topology=v5e:2x2', *tiny)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'of 16 GiB HBM per chip: fits' in out.stdout and 'roofline estimate' in out.stdout
    advice = tpu_fit.advise(tiny_config(), 'v5e:2x2', remats=('full', 'none'), grad_accums=(1, 2),
                            exhaustive=True, say=lambda line: None)
    assert len(advice['candidates']) == 4 and all(c['fits'] for c in advice['candidates'])
    fastest = min(advice['candidates'], key=lambda c: c['dry_run']['tpu']['step_s'])
    assert advice['best'] == fastest
    # Without --all: no remat fits with one micro-batch, so neither more micro-batches nor
    # more recompute is compiled.
    first_fit = tpu_fit.advise(tiny_config(), 'v5e:2x2', remats=('none', 'full'),
                               grad_accums=(1, 2), say=lambda line: None)
    assert [(c['remat'], c['grad_accum']) for c in first_fit['candidates']] == [('none', 1)]
    tensor = tpu_fit.advise(tiny_config(), 'v5e:2x2', remats=('none',), grad_accums=(1,),
                            layouts=(2,), say=lambda line: None)
    assert tensor['best']['tensor'] == 2 and tensor['best']['dry_run']['mesh']['tensor'] == 2


@pytest.mark.tpu
@needs_libtpu
def test_a_step_that_does_not_fit_is_an_answer_not_a_traceback():
    # 4096 sequences of 4096 tokens on 4 chips: the attention scores alone are terabytes.
    big = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.n_layers=1',
           '--config.data.seq_len=4096', '--config.train.global_batch_size=4096']
    out = _cli('pretrain.train', '--config=configs/lm_tiny.py', '--dry_run',
               '--dry_run_topology=v5e:2x2', *big)
    assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert 'the train step does not fit v5e:2x2: RESOURCE_EXHAUSTED' in out.stderr
    assert "model.remat='none'" in out.stderr and 'pretrain.tpu_fit' in out.stderr


@pytest.mark.tpu
@needs_libtpu
@pytest.mark.parametrize('family', ['transformer', 'var'])
def test_splash_attention_compiles_to_the_tpu_kernel_forward_and_backward(family):
    c = FAMILY_CONFIGS[family]()
    c.model.attention_impl = 'splash'
    setup = setup_lib.build(c, tpu.devices('v5e:2x2'), families=model_zoo.FAMILIES, check_data=False)
    with setup.activate():
        compiled = setup.train_step.lower(setup.restore_target(), setup.abstract_batch()).compile()
    # The Mosaic kernel itself (not Pallas's interpreter): one call forward, more for dq, dk/dv.
    assert compiled.as_text().count('tpu_custom_call') >= 2
