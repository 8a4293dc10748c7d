"""A tiny byte-level transformer LM on the embedded corpus: a few minutes on a 2-core CPU."""

from model_zoo import base_config


def get_config():
    c = base_config()
    c.model.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384)
    c.data.seq_len = 128
    c.train.update(steps=600, global_batch_size=16, log_every=20, eval_every=200, eval_batches=4)
    c.optim.lr = 3e-3
    # Warmup and decay follow train.steps (10% and 20%, the defaults), so a short run works;
    # a sweep or a branch that needs fixed lengths gives schedule.warmup_steps/decay_steps.
    c.schedule.update(kind='wsd', decay_shape='1-sqrt')
    # Every checkpoint is kept (keep_every = every_steps, a few MB each): any saved step can
    # be a branch point (schedule.branch_from=RUN@STEP).
    c.checkpoint.update(every_steps=200, keep_last=2, keep_every=200)
    return c
