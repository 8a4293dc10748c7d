"""The model and protocol shared by the µTransfer sweeps (base tuning, width, depth).

A byte-level transformer on the embedded corpus: 4 heads (the head dim grows with width),
d_ff = 3 d_model, seq 64, batch 16 (1,024 tokens per step), 1,000 steps (about 1M tokens at
every size), WSD with a 10% warmup and a 20% 1-sqrt decay to 0, AdamW with decay independent of
the LR (the same per-step decay at every LR and width), gradient clipping at 1, and the
held-out loss over 16 fixed batches (262,144 tokens) at the end. Base model: width 32, 2 layers.
"""

BASE_WIDTH = 32
BASE_DEPTH = 2
STEPS = 1000


def lr_grid(centre_half_octaves: int, below: int = 3, above: int = 3) -> list[float]:
    """A half-octave grid 2^(k/2) for k in [centre - below, centre + above]."""
    return [2.0 ** (k / 2) for k in range(centre_half_octaves - below, centre_half_octaves + above + 1)]


def cost_groups(sizes, cheap_up_to: int) -> list[list[int]]:
    """Sizes up to `cheap_up_to` together, then each larger one alone: a sweep that runs every
    seed of a group before the next has all its seeds where runs are cheap when it stops."""
    cheap = [s for s in sizes if s <= cheap_up_to]
    return ([cheap] if cheap else []) + [[s] for s in sizes if s > cheap_up_to]


def shape(point: dict) -> dict:
    """4 heads and a 3x MLP at every width."""
    width = point.get('model.d_model', BASE_WIDTH)
    return {'model.d_model': width, 'model.n_heads': 4, 'model.n_kv_heads': 4, 'model.d_ff': 3 * width}


def fixed(steps: int = STEPS) -> dict:
    return {
        'model.n_layers': BASE_DEPTH, 'data.seq_len': 64,
        'train.steps': steps, 'train.global_batch_size': 16, 'train.log_every': 50,
        'train.eval_every': steps, 'train.eval_batches': 16,
        'schedule.kind': 'wsd', 'schedule.warmup_steps': steps // 10,
        'schedule.decay_steps': steps // 5, 'schedule.decay_shape': '1-sqrt',
        'schedule.min_lr_ratio': 0.0,
        'optim.weight_decay_mode': 'independent', 'optim.weight_decay': 3e-4,
        'parametrization.base_width': BASE_WIDTH, 'parametrization.base_depth': BASE_DEPTH,
        'checkpoint.every_steps': 250, 'checkpoint.keep_last': 1, 'checkpoint.keep_every': 0,
        'mesh.ici.data': 1,   # one device per run: runs go side by side instead
        'metrics.tensorboard': False, 'metrics.peak_flops_per_device': 1e12,
    }
