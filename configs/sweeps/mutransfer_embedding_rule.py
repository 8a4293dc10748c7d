"""µTransfer with two of µP's width rules replaced by SP's: the embedding LR and the hidden init.

    python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_embedding_rule.py \
        --workdir=docs/mutransfer/embedding_rule_sweep --parallel=2 \
        --reuse_from=docs/mutransfer/width_sweep,docs/mutransfer/rebased_sweep
    python -m pretrain.fit --sweep_dir=docs/mutransfer/embedding_rule_sweep --transfer=width

The width-128 ablation (mutransfer_ablation.py) traced µP's loss to tuned SP to two of its
prescriptions acting together: the embedding's width-independent LR and the hidden matrices'
sigma / sqrt(m) init. This sweep tests the parametrization that follows them as SP does and
keeps every other µP rule: the embedding LR times 1 / m and the hidden init times sqrt(m)
(m = width / 32, per-role constants set per width), so at width 32 it is the tuned base model
(its runs are adopted from the width sweep) and at width 128 it is the ablation's
`embedding_lr_and_hidden_init_as_sp` (adopted from the rebased sweep, which ran the same runs).
In this sweep's folder 'mup' means this modified µP. SP is the width sweep's own runs, adopted
unchanged, so the report's comparison with tuned SP uses the same SP grids; so are the base
model's seeds 3-7 (`width_sweep.BASE_SEEDS`, both names: at width 32 this is the base model).

Widths 32-256 (three doublings; 512 costs about 10 minutes a run here), 3 seeds, a 5-point
half-octave grid 2^-7.5 ... 2^-5.5 around the base optimum 2^-5.96 at every width, extended
where the optimum had fewer than two points past it (EXTRA: at 32 the width sweep's runs at
2^-5 and 2^-4.5 are adopted; at 256 the optimum sat at 2^-7.18, near the low edge).
"""

import math

from configs.sweeps import mutransfer_common as common
from configs.sweeps import mutransfer_width as width_sweep
from pretrain.study.sweep import Sweep

WIDTHS = [32, 64, 128, 256]
SEEDS = [0, 1, 2]
MUP_KS = [-15, -14, -13, -12, -11]   # half-octave points: lr = 2^(k/2)
EXTRA = {32: [-10, -9], 256: [-16, -17]}   # added where an optimum lacked two points past it


def mup_point(width: int, seed: int, k: int) -> dict:
    """A µP run of the width study at lr = 2^(k/2)."""
    return {'parametrization.name': 'mup', 'model.d_model': width, 'train.steps': common.STEPS,
            'seed': seed, 'optim.lr': 2.0 ** (k / 2)}


def points() -> list[dict]:
    sp = [p for p in width_sweep.points(WIDTHS, common.STEPS) if p['parametrization.name'] == 'sp']
    mup = []
    for widths in common.cost_groups(WIDTHS, 128):
        for seed in SEEDS:
            mup += [mup_point(width, seed, k)
                    for width in widths for k in MUP_KS + EXTRA.get(width, [])]
    return mup + sp + width_sweep.base_seed_points()   # the base model's extra seeds (adopted)


def derive(point: dict) -> dict:
    out = width_sweep.derive(point)
    if point['parametrization.name'] == 'mup':
        m = point['model.d_model'] / common.BASE_WIDTH
        out['parametrization.role_lr_mult.embedding'] = 1 / m
        out['parametrization.role_init_mult.hidden'] = math.sqrt(m)
    return out


def get_sweep() -> Sweep:
    return Sweep(base='configs/lm_tiny.py', points=points(),
                 fixed=width_sweep.get_sweep().fixed, derive=derive)
