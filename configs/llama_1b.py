"""A Llama-3.2-1B-shaped transformer (d_model 2048, 16 layers, 32 query / 8 kv heads, SwiGLU 8192,
tied embeddings, RoPE theta 500,000, 128,256-token vocabulary; about 1.24B parameters), for real
hardware: bfloat16 compute, float32 parameters and optimizer state, fsdp over every device.

Set the data for a real run (e.g. --config.data.source=tfds --config.data.tfds_name=...
--config.data.tokenizer=sentencepiece --config.data.tokenizer_path=tokenizer.model). Check the fit first:

    python -m pretrain.tpu_fit --config=configs/llama_1b.py --topology=v5e:4x4
"""

from model_zoo import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                   d_ff=8192, rope_theta=500_000.0, norm_eps=1e-5, tie_embeddings=True,
                   compute_dtype='bfloat16', remat='full')
    c.data.seq_len = 4096
    # 1M tokens per step; ~20 tokens per parameter is about 24,000 steps.
    c.train.update(steps=24_000, global_batch_size=256, log_every=10, eval_every=1000,
                   eval_batches=20)
    c.optim.update(lr=3e-4, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0)
    c.schedule.update(kind='wsd', warmup_steps=2000, decay_steps=4800, decay_shape='1-sqrt')
    c.checkpoint.update(every_steps=1000, keep_last=2, every_minutes=30.0)
    c.mesh.ici.update(data=1, fsdp=-1)
    return c
