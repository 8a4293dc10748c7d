"""VAR: resize matrices, residual quantizer, mask, cached sampling, both stages through the trainer."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_zoo import attention, var, var_sample, var_tokenizer
from pretrain.data import resize
from pretrain import train
from pretrain.errors import ConfigError
from tests.helpers import losses, tiny_config, with_mesh


def tok_config(steps: int = 12):
    """8x8 digits -> 4x4 latent (one halving), scales 1,2,3,4, 32 codes."""
    c = tiny_config(steps=steps)
    c.model.family = 'var_tokenizer'
    c.model.var.update(patch_nums=(1, 2, 3, 4), codebook_size=32, latent_channels=8,
                       base_channels=8, channel_mult=(1, 2), n_phi=2)
    c.data.image.update(source='digits', image_size=8)
    c.optim.update(lr=3e-3, weight_decay=0.0)
    c.checkpoint.update(every_steps=100)
    return c


def var_config(tokenizer_dir: str, steps: int = 12):
    c = tok_config(steps)
    c.model.family = 'var'
    c.model.update(**var.depth_rule(2))
    c.model.var.update(num_classes=10, cond_dropout=0.1, mlp_ratio=2.0)
    c.data.image.tokenizer_dir = tokenizer_dir
    return c


# ----------------------------------------------------------------------------- resize

def _area_direct(x: np.ndarray, out: int) -> np.ndarray:
    """Adaptive average pooling written pixel by pixel in 2D (independent of the matrices)."""
    n = x.shape[0]
    y = np.zeros((out, out))
    for i in range(out):
        for j in range(out):
            r0, r1 = math.floor(i * n / out), math.ceil((i + 1) * n / out)
            c0, c1 = math.floor(j * n / out), math.ceil((j + 1) * n / out)
            y[i, j] = x[r0:r1, c0:c1].mean()
    return y


def _bicubic_direct(x: np.ndarray, out: int) -> np.ndarray:
    """PyTorch's bicubic (a=-0.75, align_corners=False) as a 4x4 tap sum per output pixel."""
    n = x.shape[0]

    def w(d):
        d, a = abs(d), -0.75
        return ((a + 2) * d ** 3 - (a + 3) * d ** 2 + 1 if d <= 1
                else a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a if d < 2 else 0.0)

    def taps(i):
        s = (i + 0.5) * n / out - 0.5
        f = math.floor(s)
        return [(min(max(f + k, 0), n - 1), w(s - (f + k))) for k in (-1, 0, 1, 2)]

    y = np.zeros((out, out))
    for i in range(out):
        for j in range(out):
            y[i, j] = sum(wr * wc * x[r, c] for r, wr in taps(i) for c, wc in taps(j))
    return y


@pytest.mark.parametrize('n_in, n_out', [(4, 1), (4, 2), (4, 3), (3, 4), (1, 4), (7, 5), (2, 5)])
def test_resize_matrices_match_direct_computation(n_in, n_out):
    x = np.random.default_rng(n_in * 10 + n_out).normal(size=(n_in, n_in))
    batch = jnp.asarray(x, jnp.float32)[None, :, :, None]
    for mode, direct in (('area', _area_direct), ('bicubic', _bicubic_direct)):
        got = np.asarray(resize.resize(batch, n_out, mode))[0, :, :, 0]
        np.testing.assert_allclose(got, direct(x, n_out), rtol=1e-5, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(resize.matrix(mode, n_in, n_out).sum(1), 1.0, atol=1e-12)
    # Known values: area of an exact 2x2 block grid is the block mean; 1x1 -> n is constant.
    np.testing.assert_allclose(resize.area_matrix(4, 2), [[.5, .5, 0, 0], [0, 0, .5, .5]])
    np.testing.assert_allclose(resize.bicubic_matrix(1, 3), np.ones((3, 1)))


# ----------------------------------------------------------------------------- stage 1 pieces

@pytest.fixture(scope='module')
def random_tokenizer():
    c = tok_config()
    return var_tokenizer.VQVAE(c, nnx.Rngs(0)), c


def test_scales_sum_to_the_reconstructed_feature(random_tokenizer):
    model, c = random_tokenizer
    images = jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8, 3), minval=-1, maxval=1)
    f = model.encoder(images)
    f_hat, codes, _, _ = model.quantizer(f)
    assert [x.shape for x in codes] == [(3, p * p) for p in c.model.var.patch_nums]
    hs = [model.quantizer.scale_feature(idx, k) for k, idx in enumerate(codes)]
    np.testing.assert_allclose(sum(hs), f_hat, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.codes_to_features(codes)[-1], f_hat, rtol=1e-5, atol=1e-5)
    # The residual shrinks: more scales, closer to f.
    errs = [float(jnp.mean((f - s) ** 2)) for s in model.codes_to_features(codes)]
    assert errs[-1] < errs[0]
    # Teacher-forcing inputs: scale k+1's input is area(f_hat after scale k, pn_{k+1}).
    inputs = model.teacher_inputs(codes)
    assert inputs.shape == (3, 2 * 2 + 3 * 3 + 4 * 4, c.model.var.latent_channels)
    np.testing.assert_allclose(inputs[:, :4], resize.resize(hs[0], 2, 'area').reshape(3, 4, -1),
                               rtol=1e-5, atol=1e-6)
    usage = var_tokenizer.usage_metrics(codes, c.model.var.codebook_size)
    assert 1.0 <= float(usage['perplexity']) <= c.model.var.codebook_size
    assert 0 <= float(usage['dead_codes']) < c.model.var.codebook_size


def test_block_causal_mask_structure():
    pns = (1, 2, 3)
    order = var.levels(pns)   # what VAR hands its attention: the mask is attention.visible's
    mask = np.asarray(attention.visible(order, order))
    assert mask.shape == (14, 14)
    bounds = var.scale_bounds(pns)
    assert bounds == [(0, 1), (1, 5), (5, 14)]
    for k, (b, e) in enumerate(bounds):
        assert mask[b:e, b:e].all()            # full within a scale
        assert mask[b:e, :b].all()             # sees every coarser scale
        assert not mask[b:e, e:].any()         # never a finer one
    assert mask.sum() == 1 * 1 + 4 * 5 + 9 * 14


# ----------------------------------------------------------------------------- trained stages

@pytest.fixture(scope='module')
def tokenizer_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('var_tok'))
    return workdir, train.run(tok_config(), workdir, devices=jax.devices()[:1])


@pytest.fixture(scope='module')
def var_run(tokenizer_run, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('var'))
    return workdir, train.run(var_config(tokenizer_run[0]), workdir, devices=jax.devices()[:1])


def _falls(result) -> None:
    first, last = losses(result)[:3], losses(result)[-3:]
    assert np.mean(last) < np.mean(first) - 0.05, losses(result)


def test_tokenizer_loss_falls_and_reports_codebook_usage(tokenizer_run):
    _, result = tokenizer_run
    _falls(result)
    last = result['history'][-1]
    assert {'rec_loss', 'vq_loss', 'perplexity', 'dead_codes', 'code_pull'} <= set(last)


def test_stage_one_encoding_works_inside_the_trainers_mesh(tokenizer_run):
    """Eval batches are prepared inside the trainer's 8-device mesh context, while the frozen
    tokenizer sits on one device (the README's stage 2 failed at its first eval)."""
    from pretrain import mesh as mesh_lib
    prepare = var.make_prepare(var_config(tokenizer_run[0]))
    images = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    batch = {'images': images, 'labels': np.arange(4, dtype=np.int32),
             'u': np.zeros(4, np.float32)}
    outside = prepare(batch)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8, 1, 1, 1), mesh_lib.AXES)
    with mesh_lib.activate(mesh):
        inside = prepare(batch)
    np.testing.assert_array_equal(inside['codes'], outside['codes'])
    np.testing.assert_array_equal(inside['inputs'], outside['inputs'])


def test_var_loss_falls_with_per_scale_losses(var_run):
    _, result = var_run
    _falls(result)
    last = result['history'][-1]
    assert {f'loss_{p}x{p}' for p in (1, 2, 3, 4)} <= set(last)
    # The total is the token-weighted mean of the per-scale losses.
    total = sum(last[f'loss_{p}x{p}'] * p * p for p in (1, 2, 3, 4)) / 30
    assert total == pytest.approx(last['loss'], rel=1e-4)


def test_sharded_training_matches_one_device(tokenizer_run, var_run, tmp_path):
    c = with_mesh(var_config(tokenizer_run[0], steps=4), data=2, fsdp=2, tensor=2)
    c.schedule.total_steps = 12   # the 12-step runs' learning rates
    np.testing.assert_allclose(losses(train.run(c, str(tmp_path / 'var'))),
                               losses(var_run[1])[:4], rtol=2e-5, atol=2e-5)


@pytest.mark.slow   # ~30 s of compiling; the tokenizer is only data-parallel
def test_sharded_tokenizer_training_matches_one_device(tokenizer_run, tmp_path):
    c = with_mesh(tok_config(steps=4), data=8)
    c.schedule.total_steps = 12
    np.testing.assert_allclose(losses(train.run(c, str(tmp_path / 'tok'))),
                               losses(tokenizer_run[1])[:4], rtol=2e-5, atol=2e-5)


def test_teacher_forced_logits_equal_cached_scale_by_scale_logits(tokenizer_run, var_run):
    c = var_config(tokenizer_run[0])
    tokenizer, _ = var.load_tokenizer(c)
    model, _, _ = var.restore_model(var_run[0])
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    codes = tokenizer.encode(images)
    labels = jnp.array([3, 10], jnp.int32)      # a class and the unconditional index
    forced = model(tokenizer.teacher_inputs(codes), labels)
    _, chosen, cached = var_sample.decode_scales(model, tokenizer, labels, lambda k, _: codes[k])
    np.testing.assert_allclose(jnp.concatenate(cached, axis=1), forced, rtol=1e-4, atol=1e-4)
    assert all((a == b).all() for a, b in zip(chosen, codes))


def test_sampling_with_guidance_top_k_top_p(tokenizer_run, var_run, tmp_path):
    c = var_config(tokenizer_run[0])
    tokenizer, _ = var.load_tokenizer(c)
    model, _, _ = var.restore_model(var_run[0])
    labels = jnp.arange(4, dtype=jnp.int32)
    a, codes = var_sample.sample(model, tokenizer, labels, jax.random.PRNGKey(0),
                                 cfg_scale=2.0, top_k=5, top_p=0.9)
    b, _ = var_sample.sample(model, tokenizer, labels, jax.random.PRNGKey(0),
                             cfg_scale=2.0, top_k=5, top_p=0.9)
    assert a.shape == (4, 8, 8, 3) and float(jnp.abs(a).max()) <= 1.0
    np.testing.assert_array_equal(a, b)          # a pure function of the key
    assert [x.shape for x in codes] == [(4, p * p) for p in (1, 2, 3, 4)]
    var_sample.save_grid(a, str(tmp_path / 'grid.png'), ncol=2)
    assert os.path.getsize(tmp_path / 'grid.png') > 0
    assert var_sample.sampling_steps((1, 2, 3, 4)) == {'next_scale': 4, 'raster': 30}
    assert var_sample.describe_steps((1, 2, 3, 4)) == (
        '4 model calls per image (one per scale); a raster-order model of the same 30 tokens '
        'would need 30')


def _sample_cli(*args):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=root)
    return subprocess.run([sys.executable, '-m', 'model_zoo.var_sample', *args], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_sample_cli_writes_into_the_run_folder_and_says_what_it_did(var_run):
    workdir = var_run[0]
    out = _sample_cli(f'--workdir={workdir}', '--per_class=1')
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.getsize(os.path.join(workdir, 'samples.png')) > 0
    assert out.stdout.strip().splitlines() == [
        f'wrote {workdir}/samples.png: 10 classes x 1 samples from step 12; 4 model calls per '
        'image (one per scale); a raster-order model of the same 30 tokens would need 30']
    assert 'read only' not in out.stderr and 'read_only' not in out.stderr   # orbax chatter


def test_sample_cli_without_a_checkpoint_prints_one_line(tmp_path):
    out = _sample_cli(f'--workdir={tmp_path}/nothing')
    assert out.returncode == 1
    assert 'Traceback' not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"var_sample: --workdir='{tmp_path}/nothing' has no checkpoints ({tmp_path}/nothing/"
        'checkpoints does not exist); train a var (stage 2) run there first']


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[[0.5, 0.3, 0.15, 0.05]]]))
    kept = lambda x: (np.asarray(x) > -1e30).astype(int).tolist()[0][0]  # noqa: E731
    assert kept(var_sample.filter_logits(logits, top_k=2)) == [1, 1, 0, 0]
    assert kept(var_sample.filter_logits(logits, top_p=0.7)) == [1, 1, 0, 0]
    assert kept(var_sample.filter_logits(logits, top_p=0.85)) == [1, 1, 1, 0]
    assert kept(var_sample.filter_logits(logits, top_p=0.1)) == [1, 0, 0, 0]


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('change, message', [
    (lambda c: c.model.var.update(patch_nums=(1, 2, 3)), r'patch_nums=\(1, 2, 3\) must end at the latent size 4'),
    (lambda c: c.model.var.update(patch_nums=(1, 3, 2, 4)), 'strictly increasing'),
    (lambda c: c.data.image.update(image_size=9), 'image_size=9 cannot be downsampled'),
    (lambda c: c.data.image.update(source='digitz'), "Did you mean 'digits'"),
])
def test_bad_tokenizer_config_fails_with_a_clear_message(change, message, tmp_path):
    c = tok_config(steps=3)
    change(c)
    with pytest.raises(ConfigError, match=message):
        train.run(c, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_missing_or_mismatched_tokenizer_checkpoint(tokenizer_run, tmp_path):
    missing = str(tmp_path / 'nowhere')
    with pytest.raises(ConfigError, match='tokenizer_dir=.*nowhere.*no tokenizer checkpoint'):
        train.run(var_config(missing, steps=3), str(tmp_path / 'run'))
    c = var_config(tokenizer_run[0], steps=3)
    c.model.var.codebook_size = 64
    with pytest.raises(ConfigError, match='codebook_size: tokenizer 32 vs config 64'):
        train.run(c, str(tmp_path / 'run'))
    assert not os.path.exists(tmp_path / 'run')


def test_a_dry_run_of_stage_2_needs_no_tokenizer_checkpoint(tmp_path):
    # A dry run reads no data, so it checks a stage-2 layout before stage 1 exists.
    result = train.run(var_config(str(tmp_path / 'nowhere'), steps=3), '', dry_run=True)
    assert result['params'] > 0 and result['total_bytes'] > 0
    assert not os.path.exists(tmp_path / 'nowhere')


def test_smooth_embedding_is_the_code_when_one_logit_dominates_and_a_mix_otherwise():
    codebook = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    logits = jnp.full((1, 2, 6), -50.0).at[0, 0, 4].set(50.0).at[0, 1, 1].set(50.0)
    e = var_sample.smooth_embedding(logits, codebook, jax.random.PRNGKey(0), k=3, n_scales=4)
    np.testing.assert_allclose(e[0], codebook[jnp.array([4, 1])], rtol=1e-6, atol=1e-6)
    flat = var_sample.smooth_embedding(jnp.zeros((1, 2, 6)), codebook, jax.random.PRNGKey(0), 0, 4)
    assert np.abs(np.asarray(flat[0, 0]) - np.asarray(codebook)).max(axis=1).min() > 1e-3  # a mix
    assert var_sample.smooth_tau(0, 10) == pytest.approx(0.27)
    assert var_sample.smooth_tau(9, 10) == pytest.approx(0.27 * 0.05)


def test_more_smooth_keeps_the_first_scale_codes_and_changes_the_image(tokenizer_run, var_run):
    c = var_config(tokenizer_run[0])
    tokenizer, _ = var.load_tokenizer(c)
    model, _, _ = var.restore_model(var_run[0])
    labels = jnp.arange(4, dtype=jnp.int32)
    hard, hard_codes = var_sample.sample(model, tokenizer, labels, jax.random.PRNGKey(0))
    smooth, smooth_codes = var_sample.sample(model, tokenizer, labels, jax.random.PRNGKey(0),
                                             more_smooth=True)
    np.testing.assert_array_equal(hard_codes[0], smooth_codes[0])   # same keys for the codes
    assert smooth.shape == hard.shape and float(jnp.abs(smooth).max()) <= 1.0
    assert not np.allclose(smooth, hard)
