"""Export to the Hugging Face Llama layout and import back, without PyTorch (safetensors only)."""

import json
import os

import jax
import numpy as np
import pytest

from pretrain import checkpoint as checkpoint_lib
from pretrain import export, hf_llama, import_hf
from pretrain.errors import ConfigError
from tests.helpers import tiny_config, trained_run


def _leaves(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
            for path, leaf in flat}


def test_export_import_round_trip_is_bit_identical(tmp_path):
    c = tiny_config()   # GQA (4 query heads, 2 kv heads), untied readout
    run = str(tmp_path / 'run')
    trained_run(run, c)
    out = str(tmp_path / 'hf')
    # A shard limit below the model size: several files and an index.
    result = export.export_hf(run, out, max_shard_bytes=20_000)
    assert len(result['files']) > 1
    with open(os.path.join(out, export.INDEX_FILE)) as f:
        index = json.load(f)
    assert set(index['weight_map'].values()) == set(result['files'])
    with open(os.path.join(out, 'config.json')) as f:
        config = json.load(f)
    assert config['num_key_value_heads'] == 2 and config['architectures'] == ['LlamaForCausalLM']
    assert config['tie_word_embeddings'] is False and 'lm_head.weight' in index['weight_map']

    imported = str(tmp_path / 'imported')
    record = import_hf.import_hf(out, tiny_config(), imported)
    assert record['lineage'] == [{'source': 'hf', 'path': os.path.abspath(out)}]
    original, _, step = checkpoint_lib.restore_params(run)
    assert step == 2
    back, saved_record, back_step = checkpoint_lib.restore_params(imported)
    assert back_step == 0 and saved_record['lineage'] == record['lineage']
    want, got = _leaves(original), _leaves(back)
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with pytest.raises(ConfigError, match='already has checkpoints'):
        import_hf.import_hf(out, tiny_config(), imported)


def test_folds_round_trip_and_values():
    c = tiny_config()
    c.parametrization.update(name='depth_mup', base_width=16, base_depth=1, input_mult=1.5,
                             output_mult=2.0)
    f = hf_llama.folds(c)
    assert f.residual == pytest.approx(2 ** -0.5) and f.readout == pytest.approx(1.0)
    assert f.embedding == 1.5 and f.query == pytest.approx(2 ** -0.5)
    rng = np.random.default_rng(0)
    for path, shape in [(('blocks', '0', 'attn', 'wq'), (32, 4, 8)),
                        (('blocks', '1', 'attn', 'wo'), (4, 8, 32)),
                        (('blocks', '0', 'mlp', 'w_down'), (64, 32)),
                        (('embed', 'table'), (264, 32)), (('head',), (32, 264))]:
        x = rng.standard_normal(shape).astype(np.float32)
        name, hf = hf_llama.to_hf(path, x, f)
        back = hf_llama.from_hf(path, hf, shape, f)
        np.testing.assert_allclose(back, x, rtol=1e-6, err_msg=name)
    sp = hf_llama.folds(tiny_config())
    assert sp.identity


def test_refusals():
    tied = tiny_config()
    tied.model.tie_embeddings = True
    tied.parametrization.input_mult = 2.0
    with pytest.raises(ConfigError, match=r'parametrization.input_mult=2.0 with model.tie_embeddings'):
        hf_llama.folds(tied)
    ssm = tiny_config()
    ssm.model.family = 'mamba'
    with pytest.raises(ConfigError, match="model.family='mamba'"):
        hf_llama.check_exportable(ssm)
    hf = hf_llama.llama_config(tiny_config(), 'float32')
    hf.update(intermediate_size=128, rope_theta=500000.0)
    with pytest.raises(ConfigError, match=r'intermediate_size=128 vs model.d_ff=64; '
                                          r'rope_theta=500000.0 vs model.rope_theta=10000.0'):
        hf_llama.check_hf_config(hf, tiny_config())
    hf = hf_llama.llama_config(tiny_config(), 'float32')
    hf['hidden_act'] = 'gelu'
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        hf_llama.check_hf_config(hf, tiny_config())


def test_export_refuses_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        export.export_hf(str(tmp_path / 'none'), str(tmp_path / 'out'))
    busy = tmp_path / 'busy'
    busy.mkdir()
    (busy / 'x').write_text('x')
    with pytest.raises(ConfigError, match='not an empty folder'):
        export.export_hf(str(tmp_path / 'none'), str(busy))
