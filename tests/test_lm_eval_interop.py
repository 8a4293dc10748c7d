"""An exported run scored by lm-evaluation-harness (needs the `interop` extra:
pip install -e '.[interop]'; run with pytest -m interop).

The harness loads the HF export the way it loads any checkpoint (`HFLM`: transformers' model and
tokenizer from the folder) and its log-likelihoods must equal the ones the run's own model gives
for the same ids. Nothing is downloaded: the tokenizer is trained on a few strings here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('lm_eval')

from pretrain import checkpoint as checkpoint_lib
from pretrain import export
from pretrain.data import make_tokenizer
from tests.helpers import model_logits, tiny_config, trained_run
from tests.test_tokenizer_export import train_byte_level_bpe

pytestmark = pytest.mark.interop


def _log_likelihood(c, params, context_ids: list[int], continuation_ids: list[int]) -> float:
    """Sum of log p(continuation | context) under the run's own model, float32."""
    tokens = context_ids + continuation_ids
    with jax.default_matmul_precision('highest'):
        logits_LV = model_logits(c, params, jnp.asarray([tokens[:-1]], jnp.int32))[0]
    log_probs_LV = np.asarray(jax.nn.log_softmax(logits_LV.astype(jnp.float32), axis=-1))
    start = len(context_ids) - 1   # the position that predicts the first continuation token
    return float(sum(log_probs_LV[start + i, t] for i, t in enumerate(continuation_ids)))


def test_lm_eval_harness_scores_the_export_like_the_run(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    c = tiny_config()
    c.model.vocab_size = 300
    c.data.update(tokenizer='hf',
                  tokenizer_path=train_byte_level_bpe(str(tmp_path / 'tokenizer.json')))
    run, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
    trained_run(run, c)
    export.export_hf(run, out)
    params, _, _ = checkpoint_lib.restore_params(run)
    ours = make_tokenizer(c.data)

    lm = HFLM(pretrained=out, device='cpu', dtype='float32', batch_size=1)
    assert lm.max_length == c.data.seq_len   # read from the export's config
    pairs = [('def f(x):\n', '    return x + 1\n'), ('import numpy', ' as np\n'),
             ('hello', ' world, hello tokens')]
    requests = [Instance('loglikelihood', {}, pair, i) for i, pair in enumerate(pairs)]
    theirs = lm.loglikelihood(requests)
    for (context, continuation), (score, _greedy) in zip(pairs, theirs):
        # The harness moves the context's trailing whitespace to the continuation, encodes
        # context + continuation as one text and takes what follows as many ids as the context
        # alone has (merges may cross the border) as the continuation, after the context's ids.
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        whole = ours.encode(context + continuation).tolist()
        context_ids = ours.encode(context).tolist()
        expected = _log_likelihood(c, params, context_ids, whole[len(context_ids):])
        assert score == pytest.approx(expected, rel=1e-5, abs=1e-4), (context, continuation)

    # Perplexity-style scoring (loglikelihood_rolling): the whole text after the prefix token.
    text = 'class Model:\n    pass\n'
    (rolling,) = lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, (text,), 0)])
    expected = _log_likelihood(c, params, [lm.prefix_token_id], ours.encode(text).tolist())
    assert rolling == pytest.approx(expected, rel=1e-5, abs=1e-4)
