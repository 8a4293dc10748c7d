"""Mamba-1 at the published ~130M size (d_model 768, 24 layers, tied embeddings), for real hardware.

Vocabulary 50,304: the GPT-NeoX tokenizer's 50,277 rounded up so that it divides a tensor axis.
For a real run set the data (e.g. --config.data.source=tfds --config.data.tfds_name=...
--config.data.tokenizer=sentencepiece --config.data.tokenizer_path=...); the schedule is a
Chinchilla-style ~20 tokens per parameter at 0.5M tokens per step.
"""

from model_zoo import base_config


def get_config():
    c = base_config()
    c.model.update(family='mamba', vocab_size=50_304, d_model=768, n_layers=24, tie_embeddings=True,
                   norm_eps=1e-5, compute_dtype='bfloat16')
    c.model.ssm.update(version=1, d_state=16, d_conv=4, expand=2, dt_rank=0, scan='chunked',
                       chunk_size=256)
    c.data.seq_len = 2048
    c.train.update(steps=5_000, global_batch_size=256, log_every=10, eval_every=500, eval_batches=20)
    c.optim.update(lr=3e-3, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0)
    c.schedule.update(kind='cosine', warmup_steps=250, min_lr_ratio=0.1)
    c.checkpoint.update(every_steps=500, keep_last=2)
    c.mesh.ici.update(data=1, fsdp=-1)
    return c
