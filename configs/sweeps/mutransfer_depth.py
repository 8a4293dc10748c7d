"""Step 3 of µTransfer: the tuned base model deepened 2 -> 16 layers under SP, depth-µP (alpha
1/2) and CompleteP (alpha 1), 3 seeds, LR swept.

    python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_depth.py \
        --workdir=docs/depth_transfer/depth_sweep --parallel=2
    python -m pretrain.fit --sweep_dir=docs/depth_transfer/depth_sweep --transfer=depth

At the base width (32), so only the depth rules act; the base depth is 2 (where all three are
the same model). The grid is half-octave, 7 points centred on the tuned LR. SP's grid was first
centred half an octave lower per doubling of depth, where its optimum was expected; at depths
2-8 (3 seeds) it did not fall (2^-5.73, 2^-6.73, and at 8 the top edge, 2^-5.5), so it is now
centred on the tuned LR like the others: at depths 4 and 8 that added the points above the old
grid; the old runs below the new grid stay in the folder but are no sweep points, so the fit
does not use them. Runs are ordered by
cost: every seed of depths 2-8 first, then 5 more seeds of the base depth (`BASE_SEEDS`), then
depth 16 seed by seed (a depth-16 run costs about 8 depth-2 runs), so a partial sweep has all
seeds where runs are cheap.
"""

import math

from configs.sweeps import mutransfer_common as common
from configs.sweeps.mutransfer_width import TUNED
from pretrain.study.sweep import Sweep

DEPTHS = [2, 4, 8, 16]
SEEDS = [0, 1, 2]
VARIANTS = {'sp': {'parametrization.name': 'sp'},
            'depth_mup': {'parametrization.name': 'depth_mup', 'parametrization.depth_alpha': 0.5},
            'completep': {'parametrization.name': 'depth_mup', 'parametrization.depth_alpha': 1.0}}
# {(variant, depth): [k, ...]} points added where a grid missed its optimum: depth-µP's at 16
# sat at the top edge (2^-4.5) with 3 seeds.
EXTRA = {('depth_mup', 16): [-8, -7]}
# More seeds of the base depth (seconds a run): with 3 its per-seed optima spread over 1.6
# octaves (2^-7.05 ... 2^-5.43) and its interval was most of every drift's, as in the width
# study (configs/sweeps/mutransfer_hidden_init_rule.py). After depths 2-8, before depth 16.
BASE_SEEDS = [3, 4, 5, 6, 7]


def _centre() -> int:
    return round(2 * math.log2(TUNED['optim.lr']))   # every variant, every depth (docstring)


def _grid(variant: str, depth: int) -> list[int]:
    centre = _centre()
    return sorted(set(range(centre - 3, centre + 4)) | set(EXTRA.get((variant, depth), [])))


def _points(depth: int, seed: int) -> list[dict]:
    """Every variant's grid at one depth and seed."""
    return [{**values, 'model.n_layers': depth, 'seed': seed, 'optim.lr': 2.0 ** (k / 2)}
            for variant, values in VARIANTS.items() for k in _grid(variant, depth)]


def points() -> list[dict]:
    out = []
    for group_index, group in enumerate(common.cost_groups(DEPTHS, 8)):
        out += [p for seed in SEEDS for depth in group for p in _points(depth, seed)]
        if group_index == 0:   # the cheap depths: the base's extra seeds come with them
            out += [p for seed in BASE_SEEDS for p in _points(common.BASE_DEPTH, seed)]
    return out


def get_sweep() -> Sweep:
    tuned = {k: v for k, v in TUNED.items() if k != 'optim.lr'}
    return Sweep(base='configs/lm_tiny.py', points=points(),
                 fixed={**common.fixed(), **tuned}, derive=common.shape)
