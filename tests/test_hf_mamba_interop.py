"""Numerical proof against transformers' MambaForCausalLM and Mamba2ForCausalLM, on their pure
PyTorch paths (needs the `interop` extra: pip install -e '.[interop]'; run with pytest -m interop)."""

import pytest

transformers = pytest.importorskip('transformers')

from tests.helpers import tiny_config
from tests.test_hf_interop import check_round_trip

pytestmark = pytest.mark.interop

CASES = {   # name: (model.ssm.version, tied, folded multipliers)
    'mamba1_tied': (1, True, False),
    'mamba2_untied': (2, False, False),
    'mamba2_mup': (2, False, True),
}


def _config(case: str):
    version, tied, mup = CASES[case]
    c = tiny_config()
    c.model.family = 'mamba'
    c.model.norm_eps = 1e-5
    c.model.tie_embeddings = tied
    c.model.ssm.update(version=version, headdim=16, chunk_size=8, d_state=8)
    if mup:   # every multiplier differs from 1 and is folded into the weights
        c.parametrization.update(name='depth_mup', base_width=16, base_depth=1, input_mult=1.5,
                                 output_mult=3.0)
    return c


@pytest.mark.parametrize('case', list(CASES))
def test_transformers_logits_match_and_import_resumes(tmp_path, case):
    model_class = (transformers.MambaForCausalLM if CASES[case][0] == 1
                   else transformers.Mamba2ForCausalLM)
    check_round_trip(tmp_path, lambda: _config(case), model_class, folded=CASES[case][2])
