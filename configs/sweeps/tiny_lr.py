"""2 widths x 2 peak LRs of a very small LM, a few steps each: the sweep machinery end to end.

    python -m pretrain.sweep --sweep=configs/sweeps/tiny_lr.py --workdir=runs/sweeps/tiny_lr
    python -m pretrain.fit --sweep_dir=runs/sweeps/tiny_lr
"""

from pretrain.study.sweep import Sweep, product


def widths(point):
    """Heads of 16 dims and a 3x MLP at every width."""
    d = point['model.d_model']
    return {'model.n_heads': d // 16, 'model.n_kv_heads': d // 16, 'model.d_ff': 3 * d}


def get_sweep() -> Sweep:
    return Sweep(
        base='configs/lm_tiny.py',
        points=product({'model.d_model': [32, 64]}, {'optim.lr': [1e-3, 3e-3]}),
        derive=widths,
        fixed={'model.n_layers': 2, 'data.seq_len': 32, 'data.max_files': 40,
               'train.steps': 8, 'train.global_batch_size': 8, 'train.log_every': 2,
               'train.eval_every': 8, 'train.eval_batches': 1,
               'schedule.warmup_steps': 2, 'schedule.decay_steps': 2,
               'checkpoint.every_steps': 4, 'checkpoint.async_save': False,
               'metrics.tensorboard': False, 'metrics.peak_flops_per_device': 1e12},
    )
