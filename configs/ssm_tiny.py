"""A tiny byte-level Mamba-1 LM on the embedded corpus: a few minutes on a 2-core CPU.

Mamba-2 instead: --config.model.ssm.version=2 --config.model.ssm.d_state=32; a hybrid with an
attention block every 2nd layer: --config.model.ssm.attn_every=2.
"""

from model_zoo import base_config


def get_config():
    c = base_config()
    c.model.update(family='mamba', d_model=128, n_layers=4)
    c.model.ssm.update(version=1, d_state=16, d_conv=4, expand=2, scan='chunked', chunk_size=32,
                       headdim=32)
    c.data.seq_len = 128
    c.train.update(steps=600, global_batch_size=16, log_every=20, eval_every=200, eval_batches=4)
    c.optim.lr = 3e-3
    # Warmup and decay follow train.steps (10% and 20%, the defaults), so a short run works.
    c.schedule.update(kind='wsd', decay_shape='1-sqrt')
    c.checkpoint.update(every_steps=200, keep_last=2)
    return c
