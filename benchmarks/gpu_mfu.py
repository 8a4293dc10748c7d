"""Tokens/s and MFU of a ~1B-parameter transformer on an NVIDIA GPU, per attention kernel.

    python -m benchmarks.gpu_mfu [--impls=dot_product,blockwise] [--seq_len=2048] [--batch=8] \
        [--steps=30] [--warmup=3] [--remat=none] [--budget_s=540] [--out=FILE.json]
    python -m benchmarks.gpu_mfu --tiny      # the same code path at a tiny size (CPU, tests)

The model is configs/llama_1b.py (d_model 2048, 16 layers, 32 / 8 heads, SwiGLU 8192, 128,256
vocabulary, tied embeddings, ~1.24B parameters) with a shorter sequence, bfloat16 compute and
float32 parameters, built and stepped by the trainer's own `pretrain.setup.build` on one device
with a synthetic batch. Each kernel is compiled, warmed up, then `steps` steps are dispatched
back to back and timed to the last one's completion (the trainer's loop also overlaps dispatch
with compute). MFU = the family's FLOPs per step (6 N + attention, PaLM's convention) x steps/s
over the device's published dense bf16 peak (pretrain/peak_flops.py); on CPU, over the cached
measured matmul peak. `--budget_s` caps the whole run (compiles included): the timed steps are
cut to what still fits. A kernel that runs out of memory is retried once with remat='full'.
Without a GPU (or with --tiny) the model is tiny and float32, so the path is testable on CPU.

Before timing, `check_kernels` compares each kernel with the dense `xla` one on the device, at
the 1B model's head shapes (GQA 32 on 8, head dim 64) under the causal mask and VAR's
block-causal mask (its published ten scales, 680 tokens): outputs and all three gradients, in
float32 at the highest matmul precision and in bfloat16 (where `dot_product` is cuDNN's
kernel), as the worst error relative to the largest reference entry.
"""

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

import model_zoo
from benchmarks.train_throughput import synthetic_batch
from configs import llama_1b
from model_zoo import attention, var
from pretrain import peak_flops as peak_lib
from pretrain import setup as setup_lib

TINY = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)   # VAR's published ten scales: 680 tokens
# Worst |kernel - xla| / max|xla| allowed per dtype (bfloat16 keeps 8 bits of mantissa).
CHECK_TOLERANCE = {'float32': 1e-4, 'bfloat16': 2e-2}


def check_kernels(impls: list[str], *, tiny: bool, seed: int = 0) -> list[dict[str, Any]]:
    """Each kernel against `xla` on the default device: value and q/k/v gradients."""
    import jax.numpy as jnp
    B, H, G, K = (2, 4, 2, 16) if tiny else (2, 32, 8, 64)
    orders = {'causal': attention.causal_order(64 if tiny else 2048),
              'block_causal': var.levels(VAR_PATCH_NUMS[:4] if tiny else VAR_PATCH_NUMS)}
    rows = []
    for mask, order in orders.items():
        L = len(order)
        keys = jax.random.split(jax.random.PRNGKey(seed), 4)
        q, k, v = (jax.random.normal(kk, (B, L, n, K)) for kk, n in zip(keys[:3], (H, G, G)))
        w = jax.random.normal(keys[3], (B, L, H, K))   # a cotangent that differs per entry
        for dtype in ('float32', 'bfloat16'):
            def loss(q, k, v, impl):
                out = attention.attend(q, k, v, order, impl=impl, scale=K ** -0.5,
                                       block_size=min(512, L))
                return jnp.sum(out.astype(jnp.float32) * w)
            args = [x.astype(dtype) for x in (q, k, v)]
            with jax.default_matmul_precision('highest'):
                got = {impl: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)),
                                     static_argnums=3)(*args, impl)
                       for impl in dict.fromkeys(['xla'] + impls)}
            want = [np.asarray(x, np.float64) for x in jax.tree.leaves(got['xla'])]
            for impl in impls:
                if impl == 'xla':
                    continue
                errors = [float(np.max(np.abs(np.asarray(g, np.float64) - r)) / max(np.max(np.abs(r)), 1e-30))
                          for g, r in zip(jax.tree.leaves(got[impl]), want)]
                rows.append({'impl': impl, 'mask': mask, 'dtype': dtype, 'length': L,
                             'relative_error': dict(zip(('loss', 'dq', 'dk', 'dv'), errors)),
                             'ok': max(errors) <= CHECK_TOLERANCE[dtype]})
                print(f'check {impl:<12} {mask:<13} {dtype:<8} L={L:<5} worst relative error '
                      f'{max(errors):.2e} ({"ok" if rows[-1]["ok"] else "TOO LARGE"})', flush=True)
    return rows


def make_config(impl: str, *, tiny: bool, seq_len: int, batch: int, remat: str):
    c = llama_1b.get_config()
    if tiny:
        c.model.update(**TINY, compute_dtype='float32')   # bf16 matmuls are emulated on CPU
    c.model.update(attention_impl=impl, attention_block_size=min(512, seq_len), remat=remat)
    c.data.seq_len = seq_len
    c.train.update(global_batch_size=batch, eval_every=0, steps=1000)
    c.schedule.update(warmup_steps=10, decay_steps=100)   # fit inside train.steps
    c.metrics.tensorboard = False
    return c


def run_impl(impl: str, cfg, device: jax.Device, steps: int, warmup: int,
             deadline: float) -> dict[str, Any]:
    setup = setup_lib.build(cfg, [device], families=model_zoo.FAMILIES)
    batch = synthetic_batch(setup)
    with setup.activate():
        state = setup.init_state()
        t0 = time.perf_counter()
        compiled = setup.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    losses = []
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics['loss']))   # a host read: waits for the step
    step_s_est = (time.perf_counter() - t0) / max(1, warmup)
    # Cut the timed steps to the time left (at least 2, so a rate exists).
    n = int(max(2, min(steps, (deadline - time.perf_counter()) / max(step_s_est, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(n):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t0
    losses.append(float(metrics['loss']))
    return {'impl': impl, 'remat': cfg.model.remat, 'params': setup.param_count,
            'tokens_per_step': setup.tokens_per_step, 'flops_per_step': setup.flops_per_step,
            'compile_s': compile_s, 'timed_steps': n, 'step_s': elapsed / n,
            'tokens_per_s': setup.tokens_per_step * n / elapsed,
            'flops_per_s': setup.flops_per_step * n / elapsed,
            'temp_gib': mem.temp_size_in_bytes / 2 ** 30,
            'argument_gib': mem.argument_size_in_bytes / 2 ** 30,
            'loss_first': losses[0], 'loss_last': losses[-1]}


def matmul_rate(n: int, dtype: str, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matmul on the default device (the reachable ceiling)."""
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n)).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a, a)
    out.block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tiny', action='store_true', help='tiny model (automatic without a GPU)')
    p.add_argument('--impls', default='dot_product,blockwise')
    p.add_argument('--seq_len', type=int, default=None, help='default 2048 (tiny: 64)')
    p.add_argument('--batch', type=int, default=None, help='default 8 (tiny: 2)')
    p.add_argument('--steps', type=int, default=30)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--remat', default='none', choices=('none', 'dots', 'full'))
    p.add_argument('--budget_s', type=float, default=540.0, help='whole run, compiles included')
    p.add_argument('--out', default='', help='JSON file for the results (optional)')
    p.add_argument('--no_check', action='store_true', help='skip the kernel check against xla')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    start = time.perf_counter()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = jax.devices()[0]
    tiny = args.tiny or device.platform != 'gpu'
    seq_len = args.seq_len or (64 if tiny else 2048)
    batch = args.batch or (2 if tiny else 8)
    impls = [i for i in args.impls.split(',') if i]
    dtype = 'float32' if tiny else 'bfloat16'
    peak, peak_src = peak_lib.total_peak_flops([device], dtype=dtype)
    print(f'{device.platform}/{device.device_kind}: peak {peak / 1e12:.1f} TFLOP/s ({peak_src})',
          flush=True)
    measured = matmul_rate(256 if tiny else 8192, dtype)
    print(f'measured {dtype} matmul: {measured / 1e12:.1f} TFLOP/s', flush=True)
    checks = [] if args.no_check else check_kernels(impls, tiny=tiny)
    rows = []
    for i, impl in enumerate(impls):
        # Each kernel gets an equal share of what is left of the budget.
        deadline = time.perf_counter() + (args.budget_s - (time.perf_counter() - start)) / (len(impls) - i)
        row = None
        for remat in dict.fromkeys((args.remat, 'full')):
            cfg = make_config(impl, tiny=tiny, seq_len=seq_len, batch=batch, remat=remat)
            try:
                row = run_impl(impl, cfg, device, args.steps, args.warmup, deadline)
                break
            except Exception as e:   # XlaRuntimeError RESOURCE_EXHAUSTED: retry with less memory
                if 'RESOURCE_EXHAUSTED' not in str(e) and 'out of memory' not in str(e).lower():
                    raise
                print(f'{impl} remat={remat}: out of memory', flush=True)
                row = {'impl': impl, 'remat': remat, 'error': 'out of memory'}
        row['mfu'] = peak_lib.mfu(row['flops_per_s'], peak) if 'flops_per_s' in row else None
        if 'flops_per_s' in row:
            row['of_measured_matmul'] = row['flops_per_s'] / measured
        rows.append(row)
        if 'tokens_per_s' in row:
            print(f'{impl:<12} remat={row["remat"]:<5} {row["params"] / 1e9:.2f}B params  '
                  f'compile {row["compile_s"]:5.1f}s  {row["step_s"]:.3f} s/step  '
                  f'{row["tokens_per_s"]:,.0f} tok/s  MFU {row["mfu"]:.1%}  '
                  f'loss {row["loss_first"]:.3f} -> {row["loss_last"]:.3f}  '
                  f'memory {row["temp_gib"] + row["argument_gib"]:.1f} GiB', flush=True)
    result = {'device': f'{device.platform}/{device.device_kind}', 'tiny': tiny,
              'compute_dtype': dtype, 'seq_len': seq_len, 'batch': batch,
              'peak_flops': peak, 'peak_source': peak_src,
              'measured_matmul_flops': measured, 'checks': checks, 'rows': rows,
              'total_s': time.perf_counter() - start,
              'command': 'python -m benchmarks.gpu_mfu ' + ' '.join(sys.argv[1:] if argv is None else argv)}
    print(f'total {result["total_s"]:.0f} s', flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1, default=lambda x: float(x) if isinstance(x, np.floating) else str(x))
    return result


if __name__ == '__main__':
    main()
