"""Small configs shared by the tests (tiny shapes keep the suite fast on 2 CPU cores)."""

from pretrain.config import base_config


def tiny_config(**train):
    c = base_config()
    c.model.update(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    c.data.update(seq_len=32, max_files=40)
    c.train.update(steps=6, global_batch_size=8, log_every=1, eval_every=0, eval_batches=1)
    c.train.update(**train)
    c.schedule.update(kind='wsd', warmup_steps=1, decay_steps=2)
    c.checkpoint.update(every_steps=3, keep_last=5, async_save=False)
    c.metrics.update(peak_flops_per_device=1e12, tensorboard=False)
    c.mesh.ici.update(data=-1)
    return c


def with_mesh(c, **ici):
    """`c` with exactly the given ici axis sizes (the others 1)."""
    c.mesh.ici.update(data=1, fsdp=1, tensor=1, sequence=1)
    c.mesh.ici.update(**ici)
    return c


def losses(result) -> list[float]:
    return [h['loss'] for h in result['history']]
