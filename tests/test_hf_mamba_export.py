"""Export of the mamba family to the Hugging Face Mamba / Mamba2 layouts and import back, without
PyTorch (safetensors only). The numerical proof is tests/test_hf_mamba_interop.py."""

import json
import math
import os

import jax
import numpy as np
import pytest
from safetensors import safe_open

import model_zoo
from pretrain import export, hf_mamba, import_hf
from pretrain import parametrization as parametrization_lib
from pretrain import state as state_lib
from pretrain.errors import ConfigError
from tests.helpers import tiny_config, trained_run


def _config(version: int, **ssm):
    c = tiny_config()
    c.model.family = 'mamba'
    c.model.ssm.update(version=version, headdim=16, chunk_size=8, d_state=8)
    c.model.ssm.update(**ssm)
    return c


def _shapes(c) -> dict[tuple[str, ...], tuple[int, ...]]:
    definition = state_lib.model_def(model_zoo.FAMILIES.get('mamba').build, c,
                                     parametrization_lib.from_config(c))
    flat = jax.tree_util.tree_flatten_with_path(definition.shapes)[0]
    return {tuple(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


def test_mamba2_export_writes_the_hf_layout_and_import_checks_the_config(tmp_path):
    c = _config(2)   # d_model 32, d_inner 64, 4 heads of 16, one group, state 8, conv 4
    run, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
    trained_run(run, c)
    result = export.export_hf(run, out)
    assert result['files'] == [export.SINGLE_FILE]
    with open(os.path.join(out, 'config.json')) as f:
        config = json.load(f)
    assert config['architectures'] == ['Mamba2ForCausalLM'] and config['model_type'] == 'mamba2'
    assert (config['num_heads'], config['head_dim'], config['n_groups']) == (4, 16, 1)
    assert config['tie_word_embeddings'] is False and config['state_size'] == 8
    with safe_open(os.path.join(out, export.SINGLE_FILE), framework='np') as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    E, N, H, K, D, V = 64, 8, 4, 4, 32, 264
    layer = {'norm.weight': (D,), 'mixer.dt_bias': (H,), 'mixer.A_log': (H,), 'mixer.D': (H,),
             'mixer.conv1d.weight': (E + 2 * N, 1, K), 'mixer.conv1d.bias': (E + 2 * N,),
             'mixer.in_proj.weight': (2 * E + 2 * N + H, D), 'mixer.norm.weight': (E,),
             'mixer.out_proj.weight': (D, E)}
    want = {'backbone.embeddings.weight': (V, D), 'backbone.norm_f.weight': (D,),
            'lm_head.weight': (V, D)}
    want.update({f'backbone.layers.{i}.{name}': shape
                 for i in range(2) for name, shape in layer.items()})
    assert shapes == want

    wrong = _config(2, d_state=16)
    with pytest.raises(ConfigError, match=r'state_size=8 vs model.ssm.d_state=16'):
        import_hf.import_hf(out, wrong, str(tmp_path / 'wrong'))
    with pytest.raises(ConfigError, match=r"model_type='mamba2'; .*model_type='mamba'"):
        import_hf.import_hf(out, _config(1), str(tmp_path / 'wrong'))
    assert not os.path.exists(str(tmp_path / 'wrong' / 'checkpoints'))


@pytest.mark.parametrize('version', [1, 2])
def test_layout_round_trip_and_mamba1_names(version):
    c = _config(version)
    c.model.tie_embeddings = True
    shapes = _shapes(c)
    layout = hf_mamba.Layout(c, shapes)
    rng = np.random.default_rng(0)
    ours = {path: rng.standard_normal(shape).astype(np.float32) for path, shape in shapes.items()}
    hf = {t.name: layout.to_hf(t, [ours[p] for p in t.sources]) for t in layout.tensors}
    assert 'lm_head.weight' not in hf   # tied: HF ties lm_head to the embeddings
    for tensor in layout.tensors:
        assert hf[tensor.name].shape == tensor.shape, tensor.name
    for path, value in ours.items():
        back = layout.from_hf(path, hf[layout.hf_name(path)], value.shape)
        np.testing.assert_array_equal(back, value, err_msg='/'.join(path))
    if version == 1:   # d_inner 64, dt rank ceil(32/16) = 2, state 8, conv 4
        assert hf['backbone.layers.0.mixer.in_proj.weight'].shape == (128, 32)
        assert hf['backbone.layers.0.mixer.x_proj.weight'].shape == (2 + 2 * 8, 64)
        assert hf['backbone.layers.1.mixer.dt_proj.weight'].shape == (64, 2)
        assert hf['backbone.layers.1.mixer.A_log'].shape == (64, 8)
        assert hf['backbone.layers.1.mixer.conv1d.weight'].shape == (64, 1, 4)
        # the conv's tap k is our conv_w[k]: torch's [channels, 1, K] holds the same order
        np.testing.assert_array_equal(hf['backbone.layers.0.mixer.conv1d.weight'][:, 0, :],
                                      ours[('blocks', '0', 'mixer', 'conv_w')].T)
        np.testing.assert_array_equal(hf['backbone.layers.0.mixer.in_proj.weight'][64:],
                                      ours[('blocks', '0', 'mixer', 'w_z')].T)


def test_multipliers_are_folded():
    c = _config(2)
    c.parametrization.update(name='depth_mup', base_width=16, base_depth=1, input_mult=1.5,
                             output_mult=3.0)
    f = hf_mamba.folds(c)
    assert f.residual == pytest.approx(2 ** -0.5) and f.readout == pytest.approx(1.5)
    assert f.embedding == 1.5 and not f.identity
    shapes = _shapes(c)
    layout = hf_mamba.Layout(c, shapes)
    ours = {path: np.ones(shape, np.float32) for path, shape in shapes.items()}
    hf = {t.name: layout.to_hf(t, [ours[p] for p in t.sources]) for t in layout.tensors}
    np.testing.assert_allclose(hf['backbone.layers.1.mixer.out_proj.weight'], 2 ** -0.5)
    np.testing.assert_allclose(hf['backbone.norm_f.weight'], 1.5)
    np.testing.assert_allclose(hf['backbone.embeddings.weight'], 1.5)
    np.testing.assert_array_equal(hf['lm_head.weight'], 1.0)
    for path, value in ours.items():
        back = layout.from_hf(path, hf[layout.hf_name(path)], value.shape)
        np.testing.assert_allclose(back, value, rtol=1e-6, err_msg='/'.join(path))
    assert hf_mamba.folds(_config(1)).identity


def test_refusals_name_the_key():
    with pytest.raises(ConfigError, match=r'model.ssm.attn_every=2: hybrid attention'):
        hf_mamba.folds(_config(2, attn_every=2))
    with pytest.raises(ConfigError, match=r'model.ssm.n_groups=2: .*only n_groups=1'):
        hf_mamba.hf_config(_config(2, n_groups=2), 'float32')
    tied = _config(1)
    tied.model.tie_embeddings = True
    tied.parametrization.input_mult = 2.0
    with pytest.raises(ConfigError, match=r'parametrization.input_mult=2.0 with '
                                          r'model.tie_embeddings'):
        hf_mamba.Layout(tied, _shapes(_config(1)))
    with pytest.raises(ConfigError, match=r"model.family='transformer'"):
        hf_mamba.check_exportable(tiny_config())

    hf = hf_mamba.hf_config(_config(1), 'float32')
    hf.update(time_step_rank='auto', use_bias=True, expand=4)
    with pytest.raises(ConfigError, match=r'expand=4 vs model.ssm.expand=2; use_bias=True'):
        hf_mamba.check_hf_config(hf, _config(1))
    hf = hf_mamba.hf_config(_config(2), 'float32')
    hf['time_step_limit'] = [0.0, 0.1]
    with pytest.raises(ConfigError, match=r'time_step_limit=\[0.0, 0.1\]'):
        hf_mamba.check_hf_config(hf, _config(2))
    hf['time_step_limit'] = [0.0, math.inf]   # what transformers writes: the identity clamp
    hf_mamba.check_hf_config(hf, _config(2))
    hf.pop('n_groups')   # Mamba2Config's default is 8
    with pytest.raises(ConfigError, match=r'n_groups=8 vs model.ssm.n_groups=1'):
        hf_mamba.check_hf_config(hf, _config(2))
