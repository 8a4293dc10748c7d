"""VAR stage 1 at the published size: 256px images -> 16x16 latent, 10 scales, 4096 codes, Cvae 32.

The published VQ-VAE layout and phi rule (model.var.tokenizer_arch / phi_rule = 'published'),
so the released VQ-VAE converts into it (pretrain/var_official.py).

For real hardware. The data is a local folder of labelled images (<class>/<image>, e.g. an
ImageNet train folder) prepared once into ArrayRecord by the `local_image_folder` builder:

    python -m pretrain.train --config=configs/var_tokenizer_d16.py --workdir=runs/var_tok_d16 \
        --config.data.image.image_dir=/data/imagenet/train --config.data.image.tfds_data_dir=/data/tfds
"""

from model_zoo import base_config


def get_config():
    c = base_config()
    c.model.family = 'var_tokenizer'
    c.model.var.update(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), codebook_size=4096,
                       latent_channels=32, base_channels=160, channel_mult=(1, 1, 2, 2, 4),
                       n_phi=4, phi_ratio=0.5, beta=0.25, num_classes=1000,
                       tokenizer_arch='published', phi_rule='published', arch='published')
    c.data.image.update(source='tfds', tfds_name='local_image_folder', image_size=256,
                        eval_percent=1)
    c.train.update(steps=200_000, global_batch_size=256, log_every=100, eval_every=5000,
                   eval_batches=8)
    c.optim.update(lr=2e-4, b1=0.5, b2=0.9, weight_decay=0.0)
    c.schedule.update(kind='wsd', warmup_steps=2000, decay_steps=20_000, decay_shape='1-sqrt')
    c.checkpoint.update(every_steps=5000, keep_last=2, every_minutes=30.0)
    c.mesh.ici.update(data=-1)
    return c
