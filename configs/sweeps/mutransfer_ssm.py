"""Step 4 of µTransfer: the Mamba family (Mamba-2, SSD scan) widened 32 -> 128 under SP and µP.

    python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_ssm.py \
        --workdir=docs/mutransfer/ssm_sweep --parallel=2
    python -m pretrain.fit --sweep_dir=docs/mutransfer/ssm_sweep --transfer=width

Three widths, three seeds, the protocol of mutransfer_common.py with 2 Mamba-2 blocks (d_state
16, head dim 16: the head count grows with width), default multipliers (the transformer's tuned
ones are not this family's), and a 9-point half-octave LR grid around 2^-8.5 for both
parametrizations for seed 0; seeds 1 and 2 run the 7 points of that grid around seed 0's
optimum, 8 for SP at 64 and 128 (the SSM scan makes each run several times a transformer's on a
CPU).
"""

from configs.sweeps import mutransfer_common as common
from pretrain.study.sweep import Sweep

WIDTHS = [32, 64, 128]
SEEDS = [0, 1, 2]
CENTRE = -17   # half-octaves: 2^-8.5 = 2.8e-3, the tiny configs' LR
# {(variant, width): [k, ...]}: half-octave points added where the grid missed its optimum: the
# first pass put it at the top edge (2^-6.5) at width 32 and for SP at every width.
EXTRA = {**{('sp', w): [-12, -11, -10] for w in WIDTHS}, ('mup', 32): [-12, -11, -10]}
# Seeds after the first: 7 points of seed 0's grid around its fitted optimum (half-octaves -13.2,
# -15.2, -14.9 for µP at widths 32, 64, 128; -13.2, -11.1, -12.8 for SP), shifted down where the
# grid ends. The fit uses only the LRs every seed of a width ran. SP at 64 and 128 got 2^-8.5 as
# well: with seeds 0-1 (128) and 0-2 (64) their optima (2^-7.54, 2^-7.59) had only one point of
# these 7 below them.
NARROW = {('mup', 32): range(-16, -9), ('mup', 64): range(-19, -12), ('mup', 128): range(-19, -12),
          ('sp', 32): range(-16, -9), ('sp', 64): range(-17, -9), ('sp', 128): range(-17, -9)}


def points() -> list[dict]:
    out = []
    for seed in SEEDS:
        for width in WIDTHS:
            for variant in ('mup', 'sp'):
                ks = (NARROW[variant, width] if seed != SEEDS[0] else
                      sorted(set(range(CENTRE - 4, CENTRE + 5)) | set(EXTRA.get((variant, width), []))))
                for k in ks:
                    out.append({'parametrization.name': variant, 'model.d_model': width, 'seed': seed,
                                'optim.lr': 2.0 ** (k / 2)})
    return out


def get_sweep() -> Sweep:
    return Sweep(base='configs/ssm_tiny.py', points=points(),
                 fixed={**common.fixed(), 'model.ssm.version': 2, 'model.ssm.d_state': 16,
                        'model.ssm.headdim': 16, 'model.ssm.chunk_size': 32},
                 derive=lambda p: {'model.d_model': p['model.d_model']})
