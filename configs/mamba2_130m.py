"""Mamba-2 (SSD) at the published ~130M size (d_model 768, 24 layers, state 128, head dim 64).

Same data and schedule as configs/mamba_130m.py; chunk 256 as on GPUs (use 64 on a CPU).
"""

from configs import mamba_130m


def get_config():
    c = mamba_130m.get_config()
    c.model.ssm.update(version=2, d_state=128, headdim=64, n_groups=1, chunk_size=256)
    return c
