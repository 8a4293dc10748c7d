"""The width test again from a base with SP's embedding LR and hidden init at width 128 built in.

    python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_rebased.py \
        --workdir=docs/mutransfer/rebased_sweep --parallel=2 \
        --reuse_from=docs/mutransfer/ablation_sweep
    python -m pretrain.fit --sweep_dir=docs/mutransfer/rebased_sweep --transfer=width

The ablation at width 128 (mutransfer_ablation.py) put most of µP's loss to tuned SP on two
ingredients together: the embedding's LR and the hidden matrices' init. As per-role constants
at the base (role_lr_mult.embedding = 1/4, role_init_mult.hidden = 2), µP reproduces at width 128
exactly the ablation's `embedding_lr_and_hidden_init_as_sp` runs (adopted with --reuse_from),
and at width 32 they are a new base model. Two questions: (1) at the base width, is this base
better than the tuned one (then the random search missed these constants, which it could not
set apart: init_std is shared by the embedding and the hidden matrices, and the embedding LR had
no knob of its own)? (2) at width 128, is µP with this base <= SP given the same constants (the
comparison stays fair)? 3 seeds, 5-point half-octave LR grids, the width sweep's protocol.
"""

import math

from configs.sweeps import mutransfer_common as common
from configs.sweeps import mutransfer_width as width_sweep
from pretrain.study.sweep import Sweep

WIDTHS = [32, 128]
SEEDS = [0, 1, 2]
CONSTANTS = {'parametrization.role_lr_mult.embedding': 0.25, 'parametrization.role_init_mult.hidden': 2.0}
# Half-octave LR points k (lr = 2^(k/2)) per (variant, width).
# The first pass ran the last three of each list; every best LR but one sat at the low edge (and
# at 32 the lowest two were tied), so two lower points were added to each: 5 points per grid is
# what `pretrain.fit` needs for a drift and a width-transfer verdict from this base.
GRID = {('mup', 32): [-14, -13, -12, -11, -10], ('sp', 32): [-14, -13, -12, -11, -10],
        ('mup', 128): [-15, -14, -13, -12, -11], ('sp', 128): [-20, -19, -18, -17, -16]}


def points() -> list[dict]:
    return [{'parametrization.name': variant, 'model.d_model': width, 'seed': seed,
             'optim.lr': 2.0 ** (k / 2)}
            for width in WIDTHS for seed in SEEDS for variant in ('mup', 'sp')
            for k in GRID[(variant, width)]]


def get_sweep() -> Sweep:
    tuned = {k: v for k, v in width_sweep.TUNED.items() if k != 'optim.lr'}
    m = 128 / common.BASE_WIDTH   # at width 128 these are the ablation's µP runs, bit for bit
    assert math.isclose(CONSTANTS['parametrization.role_lr_mult.embedding'], 1 / m)
    assert math.isclose(CONSTANTS['parametrization.role_init_mult.hidden'], math.sqrt(m))
    return Sweep(base='configs/lm_tiny.py', points=points(),
                 fixed={**common.fixed(), **tuned, **CONSTANTS}, derive=common.shape)
