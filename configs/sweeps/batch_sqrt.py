"""Batch-size sweep with the square-root rule for Adam: each batch size gets its own LR, betas, eps.

    python -m pretrain.sweep --sweep=configs/sweeps/batch_sqrt.py --workdir=runs/sweeps/batch_sqrt

The reference is configs/lm_tiny.py (batch 16, LR 3e-3); `scaling.rule=sqrt_adam` rescales
the LR by sqrt(B/16) and adjusts b1, b2 and eps (pretrain/scaling_rules.py) inside each run, so
the sweep only names the batch size. The steps shrink as the batch grows: tokens stay equal.
"""

from pretrain.study.sweep import Sweep, zipped

BATCHES = [8, 16, 32, 64]
TOKENS = 16 * 600 * 128   # the reference run's


def get_sweep() -> Sweep:
    return Sweep(
        base='configs/lm_tiny.py',
        points=zipped({'train.global_batch_size': BATCHES}),
        derive=lambda p: {'train.steps': TOKENS // (p['train.global_batch_size'] * 128)},
        fixed={'scaling.rule': 'sqrt_adam', 'scaling.ref_global_batch_size': 16,
               'scaling.ref_lr': 3e-3, 'schedule.warmup_steps': 25, 'schedule.decay_steps': 60,
               'metrics.tensorboard': False},
    )
