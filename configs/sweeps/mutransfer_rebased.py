"""The width test again with the base's hidden init doubled: was µP's loss to SP a base-tuning miss?

    python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_rebased.py \
        --workdir=docs/mutransfer/rebased_sweep --parallel=2 \
        --reuse_from=docs/mutransfer/ablation_sweep
    python -m pretrain.fit --sweep_dir=docs/mutransfer/rebased_sweep --transfer=width

The ablation at width 128 (mutransfer_ablation.py) found that µP with SP's hidden-matrix init
(sigma instead of sigma / sqrt(m), i.e. twice µP's at m = 4) closes most of its gap to tuned SP.
Under µP that init is the base's hidden init times 2 at every width, so the question is whether
the tuned base (one seed per draw, init_std shared by the embedding and the hidden matrices) had
too small a hidden init. This sweep gives both parametrizations the tuned base with
parametrization.role_init_mult.hidden = 2 (SP gets it too, so the comparison stays fair) at the
base width 32 and at 128, 3 seeds, 5-point half-octave LR grids, the width sweep's protocol.
Compare its width-32 optimum with the width sweep's (the base itself) and re-read the verdicts.
The µP runs at 128 are the ablation's `hidden_init_as_sp` runs, adopted with --reuse_from.
"""

import math

from configs.sweeps import mutransfer_common as common
from configs.sweeps import mutransfer_width as width_sweep
from pretrain.study.sweep import Sweep

WIDTHS = [32, 128]
SEEDS = [0, 1, 2]
HIDDEN_INIT = 2.0
# Half-octave LR points k (lr = 2^(k/2)) per (variant, width): around the width sweep's optima
# (both 2^-6 at 32; SP 2^-8.5 at 128) and the ablation's µP optimum at 128 (2^-5.5).
GRID = {('mup', 32): range(-14, -9), ('sp', 32): range(-14, -9),
        ('mup', 128): range(-13, -8), ('sp', 128): range(-19, -14)}


def points() -> list[dict]:
    return [{'parametrization.name': variant, 'model.d_model': width, 'seed': seed,
             'optim.lr': 2.0 ** (k / 2)}
            for width in WIDTHS for seed in SEEDS for variant in ('mup', 'sp')
            for k in GRID[(variant, width)]]


def get_sweep() -> Sweep:
    tuned = {k: v for k, v in width_sweep.TUNED.items() if k != 'optim.lr'}
    assert math.isclose(HIDDEN_INIT, math.sqrt(128 / common.BASE_WIDTH))   # = the ablation's runs
    return Sweep(base='configs/lm_tiny.py', points=points(),
                 fixed={**common.fixed(), **tuned,
                        'parametrization.role_init_mult.hidden': HIDDEN_INIT},
                 derive=common.shape)
