"""VAR stage 1, tiny: a multi-scale VQ-VAE on upsampled digits (16x16 -> 4x4 latent), CPU minutes.

    python -m pretrain.train --config=configs/var_tokenizer_tiny.py --workdir=runs/var_tok
"""

from model_zoo import base_config


def get_config():
    c = base_config()
    c.model.family = 'var_tokenizer'
    c.model.var.update(patch_nums=(1, 2, 3, 4), codebook_size=64, latent_channels=16,
                       base_channels=32, channel_mult=(1, 2, 2), n_phi=4)
    c.data.image.update(source='digits', image_size=16)
    c.train.update(steps=600, global_batch_size=32, log_every=20, eval_every=200, eval_batches=4)
    c.optim.update(lr=2e-3, weight_decay=0.0)
    c.schedule.update(kind='wsd', warmup_fraction=0.05, decay_fraction=0.2, decay_shape='1-sqrt')
    c.checkpoint.update(every_steps=200, keep_last=1)
    return c
