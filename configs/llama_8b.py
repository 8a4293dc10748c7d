"""A Llama-3-8B-shaped transformer (d_model 4096, 32 layers, 32 query / 8 kv heads, SwiGLU 14,336,
untied embeddings, RoPE theta 500,000, 128,256-token vocabulary; about 8.03B parameters), for
real hardware: bfloat16 compute, float32 parameters and optimizer state, fsdp over every device,
sequence 8,192 as in MaxText's published Llama 3.1 8B runs.

    python -m pretrain.tpu_fit --config=configs/llama_8b.py --topology=v6e:16x16
"""

from configs import llama_1b


def get_config():
    c = llama_1b.get_config()
    c.model.update(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14_336,
                   tie_embeddings=False)
    c.data.seq_len = 8192
    # 2M tokens per step.
    c.train.update(steps=80_000, global_batch_size=256)
    return c
