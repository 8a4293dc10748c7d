"""Mamba-2 (SSD) at the published ~370M size (d_model 1024, 48 layers, state 128, head dim 64)."""

from configs import mamba_370m


def get_config():
    c = mamba_370m.get_config()
    c.model.ssm.update(version=2, d_state=128, headdim=64, n_groups=1, chunk_size=256)
    return c
