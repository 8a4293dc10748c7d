"""A small scaling study on the embedded corpus: 5 widths, 3 token budgets from branched cooldowns.

    python -m pretrain.sweep --sweep=configs/sweeps/scaling_tiny.py --workdir=runs/sweeps/scaling_tiny
    python -m pretrain.fit --sweep_dir=runs/sweeps/scaling_tiny

Every width trains one constant-LR run of 600 steps; 20% 1-sqrt cooldowns branch from its
checkpoints to end at 150, 300 and 600 steps. The LR is muP-transferred: tuned once at width 64
(docs/mutransfer.md) and reused at every width. Width 256 is held out: the laws fitted on the
other widths predict its losses.
"""

from pretrain.sweep import Cooldowns, Sweep, zipped

WIDTHS = [32, 48, 64, 96, 128]
HELD_OUT = [256]


def shape(point):
    """Heads of 16 dims and a 3x MLP at every width."""
    d = point['model.d_model']
    return {'model.n_heads': d // 16, 'model.n_kv_heads': d // 16, 'model.d_ff': 3 * d}


def get_sweep() -> Sweep:
    return Sweep(
        base='configs/lm_tiny.py',
        points=zipped({'model.d_model': WIDTHS}),
        heldout=zipped({'model.d_model': HELD_OUT}),
        derive=shape,
        fixed={
            'model.n_layers': 2,
            # muP with the readout multiplier that docs/mutransfer.md found for the base model.
            'parametrization.name': 'mup', 'parametrization.base_width': 64,
            'parametrization.output_mult': 4.0, 'optim.lr': 3e-3,
            'parametrization.base_head_dim': 16,   # heads grow, the head dim stays 16
            'schedule.warmup_steps': 50,
            'train.log_every': 10, 'train.eval_every': 150, 'train.eval_batches': 8,
            'metrics.tensorboard': False, 'metrics.peak_flops_per_device': 1e12,
        },
        cooldowns=Cooldowns(budgets=[150, 300, 600], fraction=0.2, shape='1-sqrt'),
    )
