"""VAR stage 2 at the published d16 size: depth 16 -> width 1024, 16 heads (about 310M params).

The published block (model.var.arch='published'), so the released var_d16 weights convert into
it (pretrain/var_official.py); the tokenizer keys come from configs/var_tokenizer_d16.py.

Needs a finished configs/var_tokenizer_d16.py run:

    python -m pretrain.train --config=configs/var_d16.py --workdir=runs/var_d16 \
        --config.data.image.tokenizer_dir=runs/var_tok_d16 \
        --config.data.image.image_dir=/data/imagenet/train --config.data.image.tfds_data_dir=/data/tfds
"""

from configs import var_tokenizer_d16
from model_zoo.var import depth_rule


def get_config():
    c = var_tokenizer_d16.get_config()   # the tokenizer's model.var and data.image settings
    c.model.family = 'var'
    c.model.update(**depth_rule(16), init_std=0.02, compute_dtype='bfloat16')
    c.model.var.update(num_classes=1000, cond_dropout=0.1, mlp_ratio=4.0, arch='published')
    c.data.image.tokenizer_dir = 'runs/var_tok_d16'
    # VAR's recipe: batch 768, lr 1e-4 x batch / 256, AdamW (0.9, 0.95), weight decay 0.05,
    # 200 epochs of ImageNet (~1,668 steps each at this batch).
    c.train.update(steps=333_600, global_batch_size=768, log_every=100, eval_every=10_000,
                   eval_batches=8)
    c.optim.update(lr=3e-4, b1=0.9, b2=0.95, weight_decay=0.05, grad_clip=2.0)
    c.schedule.update(kind='wsd', warmup_steps=5000, decay_steps=60_000, decay_shape='1-sqrt')
    c.checkpoint.update(every_steps=5000, keep_last=2, every_minutes=30.0)
    c.mesh.ici.update(data=1, fsdp=-1)
    return c
