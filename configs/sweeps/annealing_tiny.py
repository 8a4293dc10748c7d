"""The LR-annealing law checked on cooldowns it never saw: 2 widths x 3 seeds.

    python -m pretrain.sweep --sweep=configs/sweeps/annealing_tiny.py --workdir=runs/sweeps/annealing_tiny
    python -m pretrain.fit --sweep_dir=runs/sweeps/annealing_tiny

Per width and seed, one constant-LR run of 600 steps and three cooldowns branched from its
checkpoints, all ending at step 600: 20% linear (fitted with the constant run), 10% linear
(another length) and 20% 1-sqrt (another shape), both held out. The held-out eval loss (4 fixed batches) is
logged every 5 steps and the LR every step, so the law is fitted on eval loss with exact areas.
"""

from configs.sweeps.scaling_tiny import SETUP, shape   # the same model, muP and LR
from pretrain.study.sweep import Cooldowns, Sweep, product

WIDTHS = [32, 64]
SEEDS = [0, 1, 2]            # the spread over seeds is the noise floor of a final loss
STEPS = 600


def get_sweep() -> Sweep:
    return Sweep(
        base='configs/lm_tiny.py',
        points=product({'model.d_model': WIDTHS}, {'seed': SEEDS}),
        derive=shape,
        fixed={**SETUP, 'train.log_every': 1, 'train.eval_every': 5, 'train.eval_batches': 4},
        cooldowns=[
            Cooldowns(budgets=[STEPS], fraction=0.2, shape='linear'),
            Cooldowns(budgets=[STEPS], fraction=0.1, shape='linear', heldout=True),
            Cooldowns(budgets=[STEPS], fraction=0.2, shape='1-sqrt', heldout=True),
        ],
    )
