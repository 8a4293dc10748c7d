"""µTransfer with one of µP's width rules replaced by SP's: the hidden init (sigma, not sigma / sqrt(m)).

    python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_hidden_init_rule.py \
        --workdir=docs/mutransfer/hidden_init_rule_sweep --parallel=2 \
        --reuse_from=docs/mutransfer/width_sweep,docs/mutransfer/ablation_sweep
    python -m pretrain.fit --sweep_dir=docs/mutransfer/hidden_init_rule_sweep --transfer=width

Why this one: over 32 -> 256 plain µP's optimum rises (+0.38 octave per doubling) and the
modified µP of mutransfer_embedding_rule.py (SP's embedding LR and SP's hidden init) makes it
fall (about -0.35 per doubling), so the rule that moves it is one of the two. The width-128
drift ablation (experiments/mutransfer_drift_cause.py) put µP with SP's hidden init alone at
+0.24 octave over 32 -> 128 and µP with SP's embedding LR alone at +0.60, both with wide
intervals. This sweep measures the first over the full range: the hidden init times sqrt(m)
(m = width / 32), every other µP rule kept. Its width-128 runs on the ablation's grid are
adopted from the ablation sweep, the base model at 32 from the width sweep; SP is the width
sweep's runs, adopted. The grid is the modified-µP sweep's, extended (EXTRA) above it at widths
64, 128 and 256, where the 3-seed loss had not risen by the grid's top edge. In this folder
'mup' means this variant.
"""

import math

from configs.sweeps import mutransfer_common as common
from configs.sweeps import mutransfer_embedding_rule as both_rules
from configs.sweeps import mutransfer_width as width_sweep
from pretrain.study.sweep import Sweep


# Half-octave points lr = 2^(k/2) above the grid: at 64 and 128 the optimum sat at or next to the
# top edge; at 256 the mean loss is flat (within 0.003 nats) from 2^-7 to 2^-5.5, the top edge.
EXTRA = {64: [-10, -9], 128: [-10, -9], 256: [-10, -9]}


def points() -> list[dict]:
    # both_rules.points() holds the base model's seeds 3-7 (width 32, where every µP variant is
    # the same model and a run takes seconds): with 3 seeds its per-seed optima spread over 1.5
    # octaves (2^-7.05 ... 2^-5.50) and its bootstrap interval dominated the drift's. This sweep
    # trained their µP runs first; the other width-study sweeps adopt them.
    extra = [both_rules.mup_point(width, seed, k)
             for width, ks in EXTRA.items() for seed in both_rules.SEEDS for k in ks]
    return both_rules.points() + extra


def derive(point: dict) -> dict:
    out = width_sweep.derive(point)
    if point['parametrization.name'] == 'mup':
        out['parametrization.role_init_mult.hidden'] = math.sqrt(
            point['model.d_model'] / common.BASE_WIDTH)
    return out


def get_sweep() -> Sweep:
    return Sweep(base='configs/lm_tiny.py', points=points(),
                 fixed=width_sweep.get_sweep().fixed, derive=derive)
