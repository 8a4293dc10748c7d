"""The trainer's train step against a plain-JAX reference, and attention kernels at long context.

    python -m benchmarks.attention_speed [--parts=speed,long] [--lengths=256:8,1024:2,4096:1] \
        [--impls=xla,blockwise,dot_product] [--rounds=3] [--layers=6] [--d_model=512] \
        [--long_lengths=1024,2048,4096,8192,16384] [--long_layers=6] [--max_step_s=20] \
        [--out=docs/attention_benchmark] [--replot]

Part `speed`: for each seq:batch, the trainer's step (built by `pretrain.setup.build`, as
benchmarks/train_throughput.py does) with each `model.attention_impl`, and the step of
benchmarks/reference_decoder.py at the same shapes, all compiled in this process and timed
round-robin (one call of each per round), so every step sees the same background load. Ratios
are reference time / trainer time (> 1: the trainer is faster), the median over rounds of the
per-round ratio; wall and process CPU time are both kept.

Part `long`: batch 1 from 1k to 16k tokens, the transformer with each kernel and Mamba-2 (SSD)
at the same width and depth. Every case is compiled on abstract inputs (nothing allocated), so
its compiled memory (temporaries + arguments, `memory_analysis()`) is known at every length; a
case is run only where that memory and its predicted step time (the previous length's time
scaled by FLOPs) fit `--max_run_gib` and `--max_step_s`.

`splash` is left out: off TPU it runs in Pallas interpret mode, orders of magnitude slower.
Writes OUT.json, OUT.md and OUT.png, with the goals of the speed issue marked met / not met.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

import model_zoo
from benchmarks import reference_decoder as ref_lib
from benchmarks.train_throughput import Case, interleaved, synthetic_batch
from pretrain import setup as setup_lib

GIB = 2 ** 30
# Goals of the speed issue (checked in `goals`).
MIN_RATIO = 1.0            # trainer >= reference at every length (float32)
MAX_MEMORY_GIB = 8.0       # blockwise trains 16k tokens within this
MIN_BLOCKWISE_GAIN = 1.1   # blockwise tokens/s over xla at 4k


def trainer_config(impl: str, seq_len: int, batch: int, *, d_model: int, n_layers: int,
                   block: int = 512):
    """The transformer at the reference's shapes: multi-head (kv heads = heads), head dim 64,
    d_ff = 3 d, byte vocabulary (320), untied readout, float32."""
    c = model_zoo.base_config()
    heads = max(1, d_model // 64)
    c.model.update(d_model=d_model, n_layers=n_layers, n_heads=heads, n_kv_heads=heads,
                   d_ff=3 * d_model, compute_dtype='float32', tie_embeddings=False,
                   attention_impl=impl, attention_block_size=block)
    c.data.seq_len = seq_len
    c.train.update(global_batch_size=batch, eval_every=0)
    c.metrics.tensorboard = False
    return c


def mamba2_config(seq_len: int, *, d_model: int, n_layers: int):
    c = trainer_config('xla', seq_len, 1, d_model=d_model, n_layers=n_layers)
    c.model.family = 'mamba'
    # Chunk 64 as on a CPU (configs/mamba2_130m.py); head dim 64 as there.
    c.model.ssm.update(version=2, d_state=64, headdim=64, chunk_size=64)
    return c


def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {'temp_bytes': int(m.temp_size_in_bytes), 'argument_bytes': int(m.argument_size_in_bytes),
            'output_bytes': int(m.output_size_in_bytes), 'alias_bytes': int(m.alias_size_in_bytes),
            # What the issue asks for: temporaries + arguments (outputs alias the donated state).
            'memory_bytes': int(m.temp_size_in_bytes + m.argument_size_in_bytes)}


class ReferenceCase:
    """benchmarks/reference_decoder.py at the trainer config's shapes, on the same tokens."""

    def __init__(self, cfg, device: jax.Device):
        m = cfg.model
        rows, length = cfg.train.global_batch_size, cfg.data.seq_len
        with jax.default_device(device):
            self.params = ref_lib.init(jax.random.key(0), vocab=m.vocab_size, d_model=m.d_model,
                                       n_layers=m.n_layers, n_heads=m.n_heads, d_ff=m.d_ff)
            optimizer, step = ref_lib.make_step(lr=cfg.optim.lr, b1=cfg.optim.b1,
                                                b2=cfg.optim.b2, weight_decay=cfg.optim.weight_decay)
            self.opt_state = optimizer.init(self.params)
        # The trainer's synthetic batch uses the same generator and seed: identical tokens.
        tokens = np.random.default_rng(0).integers(0, m.vocab_size, (rows, length + 1), np.int32)
        self.inputs = jax.device_put(tokens[:, :-1], device)
        self.targets = jax.device_put(tokens[:, 1:], device)
        start = time.perf_counter()
        self.compiled = step.lower(self.params, self.opt_state, self.inputs, self.targets).compile()
        self.compile_s = time.perf_counter() - start
        self.param_count = ref_lib.reference_params(self.params)
        self.loss = None

    def step(self):
        self.params, self.opt_state, self.loss = self.compiled(
            self.params, self.opt_state, self.inputs, self.targets)
        return self.loss


# --- Part 1: trainer vs reference -------------------------------------------------------

def speed(lengths: list[tuple[int, int]], impls: list[str], *, d_model: int, n_layers: int,
          rounds: int, warmup: int) -> list[dict]:
    device = jax.devices()[0]
    rows = []
    for seq_len, batch in lengths:
        print(f'--- speed: seq {seq_len} x batch {batch}', flush=True)
        ref = ReferenceCase(trainer_config('xla', seq_len, batch, d_model=d_model,
                                           n_layers=n_layers), device)
        print(f'{"reference":<30} compiled in {ref.compile_s:5.1f}s', flush=True)
        cases = {impl: Case(impl, f'trainer {impl} L={seq_len}',
                            trainer_config(impl, seq_len, batch, d_model=d_model,
                                           n_layers=n_layers), [device]) for impl in impls}
        for impl, case in cases.items():   # same shapes, so same parameter count (and FLOPs)
            assert case.setup.param_count == ref.param_count, (impl, case.setup.param_count,
                                                               ref.param_count)
        fns = {'reference': ref.step, **{impl: case.step for impl, case in cases.items()}}
        wall, cpu = interleaved(fns, rounds, warmup)
        flops = next(iter(cases.values())).setup.flops_per_step
        row: dict[str, Any] = {
            'seq_len': seq_len, 'batch': batch, 'layers': n_layers, 'flops_per_step': flops,
            'params': ref.param_count, 'cases': {}}
        for name in fns:
            c = ref if name == 'reference' else cases[name]
            loss = ref.loss if name == 'reference' else c.metrics['loss']
            row['cases'][name] = {
                'compile_s': c.compile_s, 'wall_s': wall[name], 'cpu_s': cpu[name],
                'wall_median_s': statistics.median(wall[name]),
                'cpu_median_s': statistics.median(cpu[name]),
                'tokens_per_s': seq_len * batch / statistics.median(wall[name]),
                'loss': float(loss), **memory(c.compiled)}
            if name != 'reference':
                # Per-round ratios first: a load spike hits the calls of one round about alike.
                row['cases'][name]['ratio_wall'] = statistics.median(
                    r / t for r, t in zip(wall['reference'], wall[name]))
                row['cases'][name]['ratio_cpu'] = statistics.median(
                    r / t for r, t in zip(cpu['reference'], cpu[name]))
            c_row = row['cases'][name]
            print(f'{name:<12} L={seq_len:5d} wall {c_row["wall_median_s"]:7.3f}s '
                  f'cpu {c_row["cpu_median_s"]:7.3f}s compile {c_row["compile_s"]:5.1f}s '
                  f'mem {c_row["memory_bytes"] / GIB:6.2f} GiB loss {c_row["loss"]:.3f}'
                  + (f'  ratio ref/trainer wall {c_row["ratio_wall"]:.2f} cpu {c_row["ratio_cpu"]:.2f}'
                     if 'ratio_wall' in c_row else ''), flush=True)
        rows.append(row)
        del ref, cases, fns
        gc.collect()   # free this length's states before the next length compiles
    return rows


# --- Part 2: long context ----------------------------------------------------------------

class LongCase:
    """One (model, length): compiled on abstract inputs; materialised only when it is run."""

    def __init__(self, name: str, cfg, device: jax.Device):
        self.name = name
        self.setup = setup_lib.build(cfg, [device], families=model_zoo.FAMILIES)
        with self.setup.activate():
            start = time.perf_counter()
            self.compiled = self.setup.train_step.lower(self.setup.restore_target(),
                                                        self.setup.abstract_batch()).compile()
            self.compile_s = time.perf_counter() - start
        self.memory = memory(self.compiled)
        self.state = self.batch = None

    def materialise(self) -> None:
        with self.setup.activate():
            self.state = self.setup.init_state()
        self.batch = synthetic_batch(self.setup)

    def step(self):
        self.state, metrics = self.compiled(self.state, self.batch)
        return metrics


def long_context(lengths: list[int], models: list[str], *, d_model: int, n_layers: int,
                 repeats: int, warmup: int, max_step_s: float, max_run_gib: float,
                 known: dict[tuple[str, int], float]) -> dict:
    """{model: {length: row}}; `known` holds step times measured by the speed part for the same
    config (batch 1, same depth): those cases are not run again."""
    device = jax.devices()[0]
    rows: dict[str, dict[str, dict]] = {m: {} for m in models}
    last: dict[str, tuple[int, float, float]] = {}   # model -> (length, step s, flops)
    for L in lengths:
        print(f'--- long: L={L}', flush=True)
        run: dict[str, LongCase] = {}
        for name in models:
            cfg = (mamba2_config(L, d_model=d_model, n_layers=n_layers) if name == 'mamba2' else
                   trainer_config(name, L, 1, d_model=d_model, n_layers=n_layers))
            case = LongCase(name, cfg, device)
            flops = case.setup.flops_per_step
            row = {'compile_s': case.compile_s, 'flops_per_step': flops,
                   'params': case.setup.param_count, **case.memory}
            predicted = (last[name][1] * flops / last[name][2]) if name in last else None
            if (name, L) in known:
                row.update(step_s=known[name, L], source='speed part (same config)')
            elif case.memory['memory_bytes'] > max_run_gib * GIB:
                row['skipped'] = f'memory > {max_run_gib:g} GiB'
            elif predicted is not None and predicted > max_step_s:
                row['skipped'] = f'predicted {predicted:.0f} s/step > {max_step_s:g} s'
            else:
                run[name] = case
            rows[name][str(L)] = row
            print(f'{name:<12} L={L:6d} compile {case.compile_s:5.1f}s '
                  f'mem {case.memory["memory_bytes"] / GIB:7.2f} GiB '
                  f'{row.get("skipped", "run" if name in run else row.get("source", ""))}', flush=True)
            if name not in run:
                del case
        for case in run.values():
            case.materialise()
        if run:
            wall, cpu = interleaved({n: c.step for n, c in run.items()}, repeats, warmup)
            for name in run:
                rows[name][str(L)].update(step_s=statistics.median(wall[name]),
                                          cpu_s=statistics.median(cpu[name]),
                                          wall_all_s=wall[name], cpu_all_s=cpu[name])
        for name in models:
            row = rows[name][str(L)]
            if 'step_s' in row:
                row['tokens_per_s'] = L / row['step_s']
                last[name] = (L, row['step_s'], row['flops_per_step'])
                print(f'{name:<12} L={L:6d} {row["step_s"]:7.2f} s/step '
                      f'{row["tokens_per_s"]:8,.0f} tok/s', flush=True)
        del run
        gc.collect()
    return rows


# --- Goals -------------------------------------------------------------------------------

def linear_fit(lengths: list[int], values: list[float]) -> tuple[float, float, float]:
    """Least-squares a + b L, and the largest relative residual."""
    a_L = np.stack([np.ones(len(lengths)), np.asarray(lengths, float)], 1)
    (a, b), *_ = np.linalg.lstsq(a_L, np.asarray(values, float), rcond=None)
    worst = max(abs(a + b * L - v) / v for L, v in zip(lengths, values))
    return float(a), float(b), float(worst)


def goals(result: dict) -> list[dict]:
    out = []
    speed_rows = result.get('speed', [])
    long_rows = result.get('long', {})
    for impl in result['impls']:
        ratios = {r['seq_len']: r['cases'][impl]['ratio_wall'] for r in speed_rows
                  if impl in r['cases']}
        if ratios:
            worst = min(ratios.values())
            out.append({'goal': f'trainer ({impl}) >= {MIN_RATIO:.1f}x the reference at every '
                                'length, float32',
                        'value': ', '.join(f'{L}: {v:.2f}x' for L, v in ratios.items()),
                        'met': worst >= MIN_RATIO})
    if speed_rows:
        best = {r['seq_len']: max(v['ratio_wall'] for k, v in r['cases'].items() if k != 'reference')
                for r in speed_rows}
        out.append({'goal': 'trainer with the best kernel per length >= reference',
                    'value': ', '.join(f'{L}: {v:.2f}x' for L, v in best.items()),
                    'met': min(best.values()) >= MIN_RATIO})
    mem = {int(L): r['memory_bytes'] for L, r in long_rows.get('blockwise', {}).items()}
    if len(mem) >= 2:
        Ls = sorted(mem)
        a, b, worst = linear_fit(Ls, [mem[L] for L in Ls])
        top, prev = Ls[-1], Ls[-2]
        ratio = mem[top] / mem[prev]
        # Linear memory doubles per doubling of L (a little less with a fixed part a);
        # quadratic quadruples. 2.5 sits well between.
        out.append({'goal': 'blockwise memory grows linearly in L',
                    'value': f'memory ~ {a / GIB:.3f} GiB + {b * 1024 / GIB:.4f} GiB per 1k tokens '
                             f'(worst residual {worst:.1%}); {top} / {prev}: {ratio:.2f}x '
                             '(linear ~2x, quadratic ~4x)',
                    'met': ratio <= 2.5 and worst <= 0.1})
        if 16384 in mem:
            out.append({'goal': f'16k tokens train within {MAX_MEMORY_GIB:g} GiB with blockwise',
                        'value': f'{mem[16384] / GIB:.2f} GiB (temporaries + arguments)',
                        'met': mem[16384] <= MAX_MEMORY_GIB * GIB})
    at4k = {m: long_rows.get(m, {}).get('4096', {}).get('tokens_per_s') for m in ('xla', 'blockwise')}
    if all(at4k.values()):
        gain = at4k['blockwise'] / at4k['xla']
        out.append({'goal': f'blockwise >= {MIN_BLOCKWISE_GAIN}x xla tokens/s at 4k',
                    'value': f'{at4k["blockwise"]:,.0f} vs {at4k["xla"]:,.0f} tokens/s: {gain:.2f}x',
                    'met': gain >= MIN_BLOCKWISE_GAIN})
    elif long_rows:
        out.append({'goal': f'blockwise >= {MIN_BLOCKWISE_GAIN}x xla tokens/s at 4k',
                    'value': 'not measured (4k not run for both)', 'met': None})
    return out


# --- Report ------------------------------------------------------------------------------

def _gib(b: float) -> str:
    return f'{b / GIB:.2f}'


def write_markdown(result: dict, path: str) -> None:
    lines = ['# Attention kernels: trainer vs a plain-JAX reference, and long context', '',
             f'Generated by `{result["command"]}` on {result["date"]} '
             f'({result["minutes"]:.1f} min).', '',
             f'- machine: {result["machine"]}; 1-min load average over the run: '
             + ' → '.join(f'{x:.1f}' for x in result['loads'])
             + ' (shared with other jobs: read ratios within this run, not absolute times);',
             f'- model: d_model {result["d_model"]}, head dim 64 (multi-head: kv heads = heads), '
             'd_ff = 3·d, byte vocabulary 320, untied readout, float32, AdamW; the trainer\'s '
             'step is `pretrain.setup.build`\'s (clipping, metrics and the non-finite guard '
             'included), the reference is `benchmarks/reference_decoder.py` (plain JAX, '
             '`optax.adamw`); same parameter count, checked;',
             '- `splash` is not measured: off TPU it runs in Pallas interpret mode.', '']
    if result.get('speed'):
        lines += ['## Trainer vs reference', '',
                  'Every config of a length is compiled in one process '
                  f'and timed round-robin: {result["warmup"]} untimed round(s), then '
                  f'{result["rounds"]} timed rounds. Times are medians over rounds; the ratio is '
                  'the median over rounds of reference time / trainer time in that round (> 1: '
                  'the trainer is faster). Memory: compiled temporaries + arguments.', '',
                  '| seq × batch, layers | step | compile s | wall s/step | CPU s/step | tokens/s | '
                  'ratio (wall) | ratio (CPU) | memory GiB | loss |',
                  '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
        for r in result['speed']:
            for name, c in r['cases'].items():
                label = 'reference' if name == 'reference' else f'trainer `{name}`'
                ratio = (f'**{c["ratio_wall"]:.2f}×** | {c["ratio_cpu"]:.2f}×'
                         if 'ratio_wall' in c else '– | –')
                lines.append(f'| {r["seq_len"]} × {r["batch"]}, {r.get("layers", result["layers"])} '
                             f'| {label} | {c["compile_s"]:.1f} | '
                             f'{c["wall_median_s"]:.3f} | {c["cpu_median_s"]:.3f} | '
                             f'{c["tokens_per_s"]:,.0f} | {ratio} | {_gib(c["memory_bytes"])} | '
                             f'{c["loss"]:.3f} |')
        lines += ['', 'Per-round wall seconds (reference first):', '']
        for r in result['speed']:
            lines.append(f'- {r["seq_len"]} × {r["batch"]}: ' + '; '.join(
                f'{n} ' + ', '.join(f'{t:.2f}' for t in c['wall_s']) for n, c in r['cases'].items()))
        lines.append('')
    if result.get('long'):
        Ls = result['long_lengths']
        lines += ['## Long context', '',
                  f'Batch 1, {result["long_layers"]} layers. Every cell is compiled on abstract '
                  'inputs; memory is the compiled train step\'s temporaries + arguments '
                  '(parameters, optimizer state, batch). Tokens/s are the median of '
                  f'{result["long_repeats"]} steps after {result["warmup"]} warm-up step(s), '
                  'the models of one length timed round-robin; cells not run say why '
                  f'(limits: {result["max_run_gib"]:g} GiB, {result["max_step_s"]:g} s/step '
                  'predicted from the previous length by FLOPs).', '',
                  '![tokens/s and memory vs length](attention_benchmark.png)', '',
                  '| model | params | ' + ' | '.join(f'L={L}' for L in Ls) + ' |',
                  '|---|---:|' + '---:|' * len(Ls)]
        for name, rows in result['long'].items():
            cells = []
            for L in Ls:
                r = rows.get(str(L))
                if r is None:
                    cells.append('–')
                    continue
                speed_txt = (f'{r["tokens_per_s"]:,.0f} tok/s' if 'tokens_per_s' in r
                             else f'not run ({r.get("skipped", "")})')
                cells.append(f'{speed_txt}, {_gib(r["memory_bytes"])} GiB')
            label = f'transformer `{name}`' if name != 'mamba2' else 'Mamba-2 (SSD)'
            params = next(iter(rows.values()))['params'] if rows else 0
            lines.append(f'| {label} | {params:,} | ' + ' | '.join(cells) + ' |')
        lines += ['', 'Compile seconds: ' + '; '.join(
            f'{name} ' + ', '.join(f'{L}: {rows[str(L)]["compile_s"]:.1f}' for L in Ls
                                   if str(L) in rows)
            for name, rows in result['long'].items()), '']
    lines += ['## Goals', '', '| goal | measured | verdict |', '|---|---|---|']
    for g in result['goals']:
        verdict = {True: '**met**', False: '**not met**', None: 'not measured'}[g['met']]
        lines.append(f'| {g["goal"]} | {g["value"]} | {verdict} |')
    if result.get('notes'):
        lines += ['', '## What was run', ''] + [f'- {n}' for n in result['notes']]
    with open(path, 'w') as f:
        f.write('\n'.join(lines).rstrip() + '\n')


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in result.get('long', {}).items():
        label = 'Mamba-2 (SSD)' if name == 'mamba2' else f'transformer {name}'
        timed = sorted(int(L) for L, r in rows.items() if 'tokens_per_s' in r)
        if timed:
            ax_t.plot(timed, [rows[str(L)]['tokens_per_s'] for L in timed], 'o-', label=label)
        sized = sorted(int(L) for L in rows)
        ax_m.plot(sized, [rows[str(L)]['memory_bytes'] / GIB for L in sized], 'o-', label=label)
    ax_m.axhline(MAX_MEMORY_GIB, color='grey', ls='--', lw=1, label=f'{MAX_MEMORY_GIB:g} GiB goal')
    for ax, label in ((ax_t, 'train-step tokens/s (batch 1)'),
                      (ax_m, 'compiled memory, GiB (temp + args)')):
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('sequence length')
        ax.set_ylabel(label)
        ax.grid(True, which='both', alpha=0.3)
    for ax in (ax_t, ax_m):
        if ax.get_legend_handles_labels()[0]:   # a speed-only run plots nothing
            ax.legend(fontsize=8)
    fig.suptitle(f'd_model {result["d_model"]}, {result["long_layers"]} layers, float32, '
                 f'{jax.devices()[0].platform.upper()}')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- Main --------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--parts', default='speed,long')
    p.add_argument('--lengths', default='256:8,1024:2,4096:1', help='seq:batch of the speed part')
    p.add_argument('--impls', default='xla,blockwise,dot_product')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--layers', type=int, default=6)
    p.add_argument('--d_model', type=int, default=512)
    p.add_argument('--long_lengths', default='1024,2048,4096,8192,16384')
    p.add_argument('--long_layers', type=int, default=6)
    p.add_argument('--long_models', default='', help='default: the impls and mamba2')
    p.add_argument('--long_repeats', type=int, default=2)
    p.add_argument('--max_step_s', type=float, default=20.0)
    p.add_argument('--max_run_gib', type=float, default=8.0)
    p.add_argument('--note', action='append', default=[], help='a line for "What was run"')
    p.add_argument('--out', default='docs/attention_benchmark')
    p.add_argument('--replot', action='store_true', help='rewrite OUT.md and OUT.png from OUT.json')
    p.add_argument('--append', action='store_true',
                   help='keep the speed rows of an earlier OUT.json at other seq:batch (a run split '
                        'into processes, e.g. to fit a time budget)')
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    loads = [os.getloadavg()[0]]
    parts = args.parts.split(',')
    impls = [i for i in args.impls.split(',') if i]
    assert 'splash' not in impls, 'splash runs in Pallas interpret mode off TPU: not timed here'
    result: dict[str, Any] = {
        'command': 'python -m benchmarks.attention_speed' + ''.join(
            f' {shlex.quote(a)}' for a in sys.argv[1:]),
        'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
        'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, '
                   f'{jax.devices()[0].platform}/{jax.devices()[0].device_kind}, jax {jax.__version__}',
        'd_model': args.d_model, 'layers': args.layers, 'long_layers': args.long_layers,
        'impls': impls, 'rounds': args.rounds, 'warmup': args.warmup,
        'long_repeats': args.long_repeats, 'max_step_s': args.max_step_s,
        'max_run_gib': args.max_run_gib, 'long_lengths': [], 'notes': list(args.note)}
    known: dict[tuple[str, int], float] = {}
    if 'speed' in parts:
        lengths = [tuple(int(x) for x in s.split(':')) for s in args.lengths.split(',') if s]
        result['speed'] = speed(lengths, impls, d_model=args.d_model, n_layers=args.layers,
                                rounds=args.rounds, warmup=args.warmup)
        loads.append(os.getloadavg()[0])
        if args.long_layers == args.layers:   # batch-1 rows are also long-context cells
            for r in result['speed']:
                if r['batch'] == 1:
                    for impl in impls:
                        known[impl, r['seq_len']] = r['cases'][impl]['wall_median_s']
    if 'long' in parts:
        result['long_lengths'] = [int(x) for x in args.long_lengths.split(',') if x]
        models = [m for m in args.long_models.split(',') if m] or [*impls, 'mamba2']
        result['long'] = long_context(
            result['long_lengths'], models, d_model=args.d_model, n_layers=args.long_layers,
            repeats=args.long_repeats, warmup=args.warmup, max_step_s=args.max_step_s,
            max_run_gib=args.max_run_gib, known=known)
        loads.append(os.getloadavg()[0])
    result['loads'] = loads
    result['minutes'] = (time.perf_counter() - t0) / 60
    result['goals'] = goals(result)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.replot:
        with open(args.out + '.json') as f:
            result = json.load(f)
        result['notes'] = result.get('notes', []) + [n for n in args.note if n not in result.get('notes', [])]
        result['goals'] = goals(result)
    else:
        result = run(args)
        if args.append and os.path.exists(args.out + '.json'):
            with open(args.out + '.json') as f:
                earlier = json.load(f)
            new = {(r['seq_len'], r['batch']) for r in result.get('speed', [])}
            result['speed'] = [r for r in earlier.get('speed', [])
                               if (r['seq_len'], r['batch']) not in new] + result.get('speed', [])
            if 'long' not in result and 'long' in earlier:   # a speed-only rerun keeps it
                result['long'], result['long_lengths'] = earlier['long'], earlier['long_lengths']
            result['command'] = f'{earlier["command"]}`, then `{result["command"]}'
            result['loads'] = earlier['loads'] + result['loads']
            result['minutes'] += earlier['minutes']
            result['notes'] = earlier.get('notes', []) + result['notes']
            result['goals'] = goals(result)
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out + '.json', 'w') as f:
        json.dump(result, f, indent=1)
    write_markdown(result, args.out + '.md')
    plot(result, args.out + '.png')
    for g in result['goals']:
        print(f'{g["goal"]}: {g["value"]} -> {g["met"]}', flush=True)
    return result


if __name__ == '__main__':
    main()
