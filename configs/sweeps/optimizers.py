"""Muon vs AdamW under µP: each optimizer's LR swept at three widths, equal tokens.

    python -m pretrain.sweep --sweep=configs/sweeps/optimizers.py \
        --workdir=docs/optimizers/sweep --parallel=1
    python -m pretrain.study.transfer --sweep_dir=docs/optimizers/sweep --axis=width \
        --out=docs/optimizers

The µTransfer protocol (configs/sweeps/mutransfer_common.py: 2 layers, 1,000 steps of 1,024
tokens, WSD, decay independent of the LR, held-out loss over 16 fixed batches) with the tuned
base multipliers, widths 32, 64 and 128 (a width-128 run costs about 2 minutes on a 2-core CPU;
256 would quadruple the sweep). Both optimizers use µP: AdamW with its 1/m LR rule, Muon with
the spectral scale (pretrain.parametrization.spectral_scale) for its matrices and AdamW's µP rules
for embeddings, readout and vectors. Muon's matrices are matched to AdamW's update RMS at the
base shape, so one LR grid (half-octave, 8 points around the tuned AdamW LR) serves both; a grid
that does not bracket an optimum gets points added through EXTRA (adding renames no run).
Runs are ordered seed by seed, so a partial sweep already covers every width and optimizer.
"""

import math

from configs.sweeps import mutransfer_common as common
from configs.sweeps.mutransfer_tuned import TUNED
from pretrain.study.sweep import Sweep

WIDTHS = [32, 64, 128]
OPTIMIZERS = ['adamw', 'muon']
SEEDS = [0, 1, 2]
EXTRA = {}   # {(optimizer, width): [k, ...]} half-octave points added where a grid missed its optimum


def points() -> list[dict]:
    centre = round(2 * math.log2(TUNED['optim.lr']))
    out = []
    for seed in SEEDS:
        for width in WIDTHS:
            for optimizer in OPTIMIZERS:
                ks = sorted(set(range(centre - 3, centre + 5)) | set(EXTRA.get((optimizer, width), [])))
                out += [{'optim.name': optimizer, 'model.d_model': width, 'seed': seed,
                         'optim.lr': 2.0 ** (k / 2)} for k in ks]
    return out


def get_sweep() -> Sweep:
    tuned = {k: v for k, v in TUNED.items() if k != 'optim.lr'}
    return Sweep(base='configs/lm_tiny.py', points=points(),
                 fixed={**common.fixed(), **tuned, 'parametrization.name': 'mup'},
                 derive=common.shape)
