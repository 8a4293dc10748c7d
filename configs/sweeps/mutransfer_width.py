"""Step 2 of µTransfer: the tuned base model widened 32 -> 512 under SP and µP, 3 seeds, LR swept.

    python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_width.py \
        --workdir=docs/mutransfer/width_sweep --parallel=2 \
        --reuse_from=docs/mutransfer/hidden_init_rule_sweep,docs/depth_transfer/depth_sweep
    python -m pretrain.fit --sweep_dir=docs/mutransfer/width_sweep --transfer=width

Both parametrizations get the tuned multipliers of configs/sweeps/mutransfer_tuned.py (so the
comparison is fair; at width 32 they are the same model, bit for bit). Widths 32-512 are four
doublings: width 512 costs about 10 minutes a run on a 2-core CPU, so 1024 was left out. The LR
grid is half-octave, 7 points centred on the tuned LR for µP and on where SP's optimum is expected
(about -0.6 octave per doubling); a grid that does not bracket its optimum gets points added on
that side (adding points renames no run). Runs are ordered by cost: every seed of widths 32-128
first, then each wider width seed by seed, so a partial sweep has all seeds where runs are
cheap. `LONG_WIDTHS` repeat at 4x the steps.
"""

import math

from configs.sweeps import mutransfer_common as common
from pretrain.study.sweep import Sweep

try:
    from configs.sweeps.mutransfer_tuned import TUNED
except ImportError as e:   # the base sweep has not been run and chosen from yet
    raise ImportError('configs/sweeps/mutransfer_tuned.py is missing: run the base-tuning sweep '
                      '(configs/sweeps/mutransfer_base.py) and --choose_base first') from e

WIDTHS = [32, 64, 128, 256, 512]
LONG_WIDTHS = [32, 64]
SEEDS = [0, 1, 2]
SP_DRIFT_HALF_OCTAVES_PER_DOUBLING = -1.25
# {(variant, width): [k, ...]}: half-octave points added where a grid missed its optimum. Seed 0
# put µP's optimum at the top edge from width 64 on (it rises: +0.4 octave per doubling) and SP's
# at the bottom edge at 128 (it falls about 1 octave per doubling, faster than the -0.6 above).
EXTRA = {**{('mup', w): [-8, -7] for w in (64, 128, 256, 512)},
         ('sp', 128): [-19, -18], ('sp', 256): [-23, -22, -21, -20], ('sp', 512): [-23, -22, -21]}
# The same for the 4x-length runs only: at 4,000 steps SP's optimum at 64 sat at the grid's
# bottom edge (2^-8) with seeds 0-1.
EXTRA_LONG = {('sp', 64): [-18, -17]}
# {(variant, width): [k, ...]}: where a run costs ~10 minutes, seeds 1-2 (and the rest of seed 0)
# run only the half-octave points around seed 0's optimum instead of the full grid plus extras:
# µP's seed-0 curve at 512 is flat from 2^-6 to 2^-4.5 (8 points, 2^-7 ... 2^-3.5: with seeds 1-2
# the mean is lowest at 2^-4.5, and 2^-3.5 is the second point past it); SP's seed-0
# optimum is 2^-11.5, with 2^-12 and 2^-11 0.01 nats above it (5 points, 2^-12.5 ... 2^-10.5: two
# past it on each side; 2^-10 and 2^-9.5 were 0.05 and 0.11 worse). Runs seed 0 made outside
# these keep their folders under runs/ but leave results.jsonl (it lists this sweep's points);
# the fit uses only the LRs every seed of a width ran.
NARROW = {('mup', 512): list(range(-14, -6)), ('sp', 512): list(range(-25, -20))}
# Seeds 3-7 of the base model (width 32, its 7-point grid), both names: the base's optimum enters
# every drift, and single seeds place it anywhere in 1.5 octaves. They are the runs of the same
# name and seed in the hidden-init sweep (µP) and the depth sweep (SP at the base depth), whose
# resolved configs equal these, so `--reuse_from` adopts them instead of training them.
BASE_SEEDS = [3, 4, 5, 6, 7]


def _centre(variant: str, width: int) -> int:
    k = round(2 * math.log2(TUNED['optim.lr']))
    if variant == 'sp':
        k += round(SP_DRIFT_HALF_OCTAVES_PER_DOUBLING * math.log2(width / common.BASE_WIDTH))
    return k


def points(widths, steps: int, extra: dict | None = None, seeds=SEEDS) -> list[dict]:
    """The grid of every (seed, width, variant); `extra` adds points beyond EXTRA's."""
    extra = extra or {}
    out = []
    for group in common.cost_groups(widths, 128):   # up to 128: minutes a run
        for seed in seeds:
            for width in group:
                for variant in ('mup', 'sp'):
                    ks = NARROW.get((variant, width)) or sorted(
                        set(range(_centre(variant, width) - 3, _centre(variant, width) + 4))
                        | set(EXTRA.get((variant, width), []))
                        | set(extra.get((variant, width), [])))
                    for k in ks:
                        out.append({'parametrization.name': variant, 'model.d_model': width,
                                    'train.steps': steps, 'seed': seed, 'optim.lr': 2.0 ** (k / 2)})
    return out


def base_seed_points() -> list[dict]:
    return points([common.BASE_WIDTH], common.STEPS, seeds=BASE_SEEDS)


def derive(point: dict) -> dict:
    steps = point['train.steps']
    return {**common.shape(point), 'schedule.warmup_steps': steps // 10,
            'schedule.decay_steps': steps // 5, 'train.eval_every': steps}


def get_sweep() -> Sweep:
    tuned = {k: v for k, v in TUNED.items() if k != 'optim.lr'}
    return Sweep(base='configs/lm_tiny.py',
                 points=(points(WIDTHS, common.STEPS) + base_seed_points()
                         + points(LONG_WIDTHS, 4 * common.STEPS, EXTRA_LONG)),
                 fixed={**common.fixed(), **tuned}, derive=derive)
