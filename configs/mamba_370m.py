"""Mamba-1 at the published ~370M size (d_model 1024, 48 layers, tied embeddings), for real hardware.

See configs/mamba_130m.py for the data flags; ~20 tokens per parameter at 0.5M tokens per step.
"""

from configs import mamba_130m


def get_config():
    c = mamba_130m.get_config()
    c.model.update(d_model=1024, n_layers=48)
    c.train.steps = 15_000
    c.optim.lr = 1.5e-3
    c.schedule.warmup_steps = 750
    return c
