"""Numerical proof against transformers' LlamaForCausalLM (needs the `interop` extra:
pip install -e '.[interop]'; run with pytest -m interop)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from pretrain import checkpoint as checkpoint_lib
from pretrain import export, import_hf, train
from tests.helpers import model_logits, tiny_config, trained_run

pytestmark = pytest.mark.interop


def _config(kind: str):
    c = tiny_config()   # GQA: 4 query heads share 2 kv heads
    c.model.rope_theta = 5000.0
    c.model.norm_eps = 1e-5
    if kind == 'tied':
        c.model.tie_embeddings = True
    if kind == 'mup':   # every multiplier differs from 1 and is folded into the weights
        c.parametrization.update(name='depth_mup', base_width=16, base_depth=1, input_mult=1.5,
                                 output_mult=3.0)
    return c


@pytest.mark.parametrize('kind', ['untied', 'tied', 'mup'])
def test_transformers_logits_match_and_import_resumes(tmp_path, kind):
    check_round_trip(tmp_path, lambda: _config(kind), transformers.LlamaForCausalLM,
                     folded=kind == 'mup')


def check_round_trip(tmp_path, make_config, model_class, *, folded: bool) -> None:
    """Export a trained tiny run, compare its logits with `model_class` loaded from the export
    (float32, 24 tokens), import it back (parameters equal: exactly, or up to rounding where
    multipliers were folded) and train 2 steps from the imported checkpoint."""
    run, out, imported = (str(tmp_path / name) for name in ('run', 'hf', 'imported'))
    trained_run(run, make_config())
    export.export_hf(run, out)
    params, _, _ = checkpoint_lib.restore_params(run)

    # 24 tokens: for Mamba, three SSD / scan chunks of 8, so the chunk-to-chunk state is exercised.
    tokens_BL = np.random.default_rng(0).integers(0, 264, size=(2, 24), dtype=np.int32)
    with jax.default_matmul_precision('highest'):
        ours_BLV = np.asarray(model_logits(make_config(), params, jnp.asarray(tokens_BL)))
    model = model_class.from_pretrained(out, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        ref_BLV = model(torch.from_numpy(tokens_BL.astype(np.int64))).logits.numpy()
    error = float(np.max(np.abs(ours_BLV - ref_BLV)))
    assert error <= 1e-5 * max(1.0, float(np.max(np.abs(ref_BLV)))), error

    continued = make_config()   # the imported run trains 2 steps under its own schedule
    continued.train.steps = 2
    continued.checkpoint.every_steps = 2
    continued.schedule.update(warmup_steps=1, decay_steps=1)
    import_hf.import_hf(out, continued, imported)
    back, _, _ = checkpoint_lib.restore_params(imported)
    for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree.leaves(back), strict=True):
        if folded:   # unfolding divides by the multipliers: equal up to rounding
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0,
                                       err_msg=str(path))
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))

    result = train.run(continued, imported)
    assert [h['step'] for h in result['history']] == [1, 2]
    assert all(np.isfinite(h['loss']) for h in result['history'])
    assert os.path.isdir(os.path.join(imported, 'checkpoints', '2'))
