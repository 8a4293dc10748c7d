"""VAR stage 2, tiny: a depth-2 next-scale transformer (width 128, 2 heads) on the tiny tokenizer.

    python -m pretrain.train --config=configs/var_tiny.py --workdir=runs/var \
        --config.data.image.tokenizer_dir=runs/var_tok
"""

from configs import var_tokenizer_tiny
from model_zoo.var import depth_rule


def get_config():
    c = var_tokenizer_tiny.get_config()   # the tokenizer's model.var and data.image settings
    c.model.family = 'var'
    c.model.update(**depth_rule(2))
    c.model.var.update(num_classes=10, cond_dropout=0.1, mlp_ratio=4.0)
    c.data.image.tokenizer_dir = 'runs/var_tok'
    c.train.update(steps=800, global_batch_size=32, log_every=20, eval_every=200, eval_batches=4)
    c.optim.update(lr=2e-3, weight_decay=0.05)
    c.schedule.update(kind='wsd', warmup_fraction=0.05, decay_fraction=0.2, decay_shape='1-sqrt')
    c.checkpoint.update(every_steps=200, keep_last=1)
    return c
