"""Small configs shared by the tests (tiny shapes keep the suite fast on 2 CPU cores)."""

from model_zoo import base_config


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


def leaves_by_path(tree) -> dict:
    """Leaves as numpy arrays by 'a/0/b' path (a checkpoint keeps list indices as strings)."""
    import jax
    import numpy as np
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v) for path, v in flat}


def random_tokens(shape, seed=0, vocab=256):
    import jax
    import jax.numpy as jnp
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab, dtype=jnp.int32)


def fixed_batch_losses(c, devices, tokens_BL, steps=2) -> list[float]:
    """Losses of `steps` updates on one fixed batch (inputs/targets from `tokens_BL`) under
    the config's mesh over `devices`: the trainer's own setup, state creation and train step."""
    import jax
    import model_zoo
    from pretrain import setup as setup_lib
    setup = setup_lib.build(c, devices, families=model_zoo.FAMILIES)
    batch = jax.device_put({'inputs': tokens_BL[:, :-1], 'targets': tokens_BL[:, 1:]},
                           setup.batch_sharding)
    out = []
    with setup.activate():
        state = setup.init_state()
        for _ in range(steps):
            state, metrics = setup.train_step(state, batch)
            out.append(float(metrics['loss']))
    return out


def trained_run(workdir: str, c, steps: int = 2):
    """Trains `c` for `steps` updates in `workdir` (saving the last step): weights not at init."""
    from pretrain import train
    c.train.steps = steps
    c.checkpoint.every_steps = steps
    c.schedule.update(warmup_steps=1, decay_steps=1)
    return train.run(c, workdir)


def model_logits(c, params, tokens_BL):
    """Float32 logits of the model `c` with `params` (a pure dict) on `tokens_BL`."""
    import model_zoo
    from pretrain import parametrization
    from pretrain import state as state_lib
    definition = state_lib.model_def(model_zoo.FAMILIES.get(c.model.family).build, c,
                                     parametrization.from_config(c))
    return definition.merge(params)(tokens_BL)
