"""Training cost vs sequence length: each Mamba-1 scan, Mamba-2 (SSD) and the transformer
(dense and blockwise attention).

    python -m benchmarks.ssm_vs_attention [--lengths=256,512,1024,...,16384] [--repeats=3] \
        [--max_temp_gib=6] [--out=docs/ssm_benchmark] [--replot]

Small models at matched parameter counts (d_model 128, 2 layers, byte vocabulary; the
transformer's d_ff is chosen to match Mamba-1's count), batch 1, one device. Each case times
the jitted forward + backward (value_and_grad of the LM loss; no optimizer update, which does
not depend on length) as the median of `repeats` calls after a compile-and-warm-up call.
Peak memory is the compiled executable's memory analysis (arguments + outputs + temporaries),
since the CPU backend keeps no device memory statistics; a case whose analysis exceeds
`max_temp_gib` is compiled but not run. Writes OUT.json, OUT.md and OUT.png.
"""

import json
import platform
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx

from model_zoo import FAMILIES, base_config
from pretrain import parametrization
from pretrain import state as state_lib

D_MODEL, N_LAYERS, VOCAB = 128, 2, 256

MODELS: dict[str, dict] = {
    'mamba1-sequential': dict(family='mamba', ssm=dict(version=1, scan='sequential')),
    'mamba1-associative': dict(family='mamba', ssm=dict(version=1, scan='associative')),
    'mamba1-chunked': dict(family='mamba', ssm=dict(version=1, scan='chunked', chunk_size=64)),
    'mamba2-ssd': dict(family='mamba', ssm=dict(version=2, d_state=64, headdim=64, chunk_size=64)),
    'transformer': dict(family='transformer'),                   # dense attention ('xla')
    'transformer-blockwise': dict(family='transformer', attention_impl='blockwise'),
}
TRANSFORMERS = ('transformer', 'transformer-blockwise')


def make_config(name: str, seq_len: int, d_ff: int) -> ml_collections.ConfigDict:
    c = base_config()
    spec = MODELS[name]
    c.model.update(family=spec['family'], vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS,
                   n_heads=4, n_kv_heads=4, d_ff=d_ff,
                   attention_impl=spec.get('attention_impl', 'xla'))
    c.model.ssm.update(**spec.get('ssm', {}))
    c.data.seq_len = seq_len
    return c


def n_params(c) -> int:
    definition = state_lib.model_def(FAMILIES.get(c.model.family).build, c,
                                     parametrization.from_config(c))
    return state_lib.param_count(definition)


def matched_d_ff() -> int:
    """The transformer d_ff (multiple of 8) whose parameter count is closest to Mamba-1's."""
    target = n_params(make_config('mamba1-chunked', 1024, 8))
    return min(range(8, 2048, 8), key=lambda f: abs(n_params(make_config('transformer', 1024, f)) - target))


def measure(c, repeats: int, max_temp_bytes: float) -> dict:
    family = FAMILIES.get(c.model.family)
    model = family.build(c, nnx.Rngs(0), parametrization.from_config(c))
    graphdef, params = nnx.split(model)

    def loss_fn(p, batch):
        return family.loss(nnx.merge(graphdef, p), batch)[0]

    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, c.data.seq_len + 1), 0, VOCAB, jnp.int32)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    row = {'compile_s': compile_s, 'temp_bytes': int(mem.temp_size_in_bytes),
           'peak_bytes': int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                             + mem.temp_size_in_bytes - mem.alias_size_in_bytes)}
    if mem.temp_size_in_bytes > max_temp_bytes:
        return {**row, 'skipped': 'memory'}
    jax.block_until_ready(compiled(params, batch))   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, batch))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {**row, 'step_s': step_s, 'tokens_per_s': c.data.seq_len / step_s,
            'flops_per_token': family.flops_per_example(c) / c.data.seq_len}


def run(lengths: Sequence[int], repeats: int, max_temp_gib: float, max_step_s: float) -> dict:
    d_ff = matched_d_ff()
    result = {'lengths': list(lengths), 'd_model': D_MODEL, 'n_layers': N_LAYERS, 'vocab': VOCAB,
              'transformer_d_ff': d_ff, 'repeats': repeats, 'max_temp_gib': max_temp_gib,
              'machine': f'{platform.machine()}, {jax.devices()[0].platform}, '
                         f'{jax.local_device_count()} device(s), jax {jax.__version__}',
              'params': {}, 'rows': {}}
    for name in MODELS:
        result['params'][name] = n_params(make_config(name, lengths[0], d_ff))
        result['rows'][name] = {}
        too_slow = False
        for L in lengths:
            if too_slow:   # the previous length already took longer than the budget
                result['rows'][name][str(L)] = {'skipped': 'time'}
                continue
            row = measure(make_config(name, L, d_ff), repeats, max_temp_gib * 2 ** 30)
            result['rows'][name][str(L)] = row
            too_slow = row.get('step_s', 0.0) > max_step_s
            print(f'{name:20s} L={L:6d} ' + ', '.join(
                f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()), flush=True)
    return result


def crossover(result: dict, ssm: str) -> str:
    """The shortest measured length from which on `ssm` has more tokens/s than the transformer
    with its faster attention kernel at that length."""
    def faster(L):   # lengths where the SSM did not run do not count against it
        a = result['rows'][ssm][str(L)]
        t = [result['rows'][m][str(L)].get('tokens_per_s') for m in TRANSFORMERS
             if m in result['rows']]
        t = [x for x in t if x is not None]
        return 'tokens_per_s' not in a or not t or a['tokens_per_s'] > max(t)
    lengths = [n for n in result['lengths'] if 'tokens_per_s' in result['rows'][ssm][str(n)]]
    for i, L in enumerate(lengths):
        if all(faster(n) for n in lengths[i:]):
            return str(L)
    return f'none up to {lengths[-1]}'


def write_markdown(result: dict, path: str) -> None:
    L = result['lengths']
    lines = ['| model | params | ' + ' | '.join(f'L={n}' for n in L) + ' |',
             '|---|---:|' + '---:|' * len(L)]
    for name, rows in result['rows'].items():
        cells = []
        for n in L:
            r = rows[str(n)]
            mib = r.get('peak_bytes', 0) / 2 ** 20
            if 'tokens_per_s' in r:
                cells.append(f'{r["tokens_per_s"]:,.0f} tok/s, {mib:,.0f} MiB')
            elif r.get('skipped') == 'memory':
                cells.append(f'not run ({mib:,.0f} MiB)')
            else:
                cells.append('not run (time)')
        lines.append(f'| {name} | {result["params"][name]:,} | ' + ' | '.join(cells) + ' |')
    cross = '\n'.join(f'- {name}: {crossover(result, name)}' for name in result['rows']
                      if name not in TRANSFORMERS)
    with open(path, 'w') as f:
        f.write(TEMPLATE.format(table='\n'.join(lines), crossover=cross, **result))


TEMPLATE = """# SSM vs attention: training cost vs sequence length

Generated by `python -m benchmarks.ssm_vs_attention` on {machine}.
Models: d_model {d_model}, {n_layers} layers, vocabulary {vocab}, batch 1, float32; the
transformer's d_ff = {transformer_d_ff} matches Mamba-1's parameter count. Each cell is the
jitted forward + backward of the LM loss (median of {repeats} after a warm-up; no optimizer
update) in tokens/s, and the peak memory from the compiled executable's memory analysis
(arguments + outputs + temporaries; the CPU backend has no device memory statistics). Cases
whose temporaries exceed {max_temp_gib} GiB were compiled but not run.

![tokens/s and memory vs length](ssm_benchmark.png)

{table}

Shortest measured length from which on each SSM trains faster than the transformer (with the
faster of its two attention kernels at each length: dense `xla`, or `blockwise`, which never
holds the L x L scores):

{crossover}
"""


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in result['rows'].items():
        lengths = [int(n) for n in rows if 'tokens_per_s' in rows[n]]
        ax_t.plot(lengths, [rows[str(n)]['tokens_per_s'] for n in lengths], 'o-', label=name)
        lengths = [int(n) for n in rows if 'peak_bytes' in rows[n]]
        ax_m.plot(lengths, [rows[str(n)]['peak_bytes'] / 2 ** 20 for n in lengths], 'o-', label=name)
    for ax, label in ((ax_t, 'training tokens/s (fwd + bwd)'), (ax_m, 'peak memory, MiB (compiled)')):
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('sequence length')
        ax.set_ylabel(label)
        ax.grid(True, which='both', alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f'd_model {result["d_model"]}, {result["n_layers"]} layers, batch 1, CPU')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_LENGTHS = flags.DEFINE_list('lengths', ['256', '512', '1024', '2048', '4096', '8192', '16384'],
                             'Sequence lengths to time.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per case (the median is reported).',
                                lower_bound=1)
_MAX_TEMP_GIB = flags.DEFINE_float('max_temp_gib', 6.0, 'Compile but do not run a case whose '
                                   'compiled memory exceeds this.')
_MAX_STEP_S = flags.DEFINE_float('max_step_s', 30.0, 'Skip longer lengths of a model once a step '
                                 'takes longer than this.')
_OUT = flags.DEFINE_string('out', 'docs/ssm_benchmark', 'Output prefix: OUT.json, OUT.md, OUT.png.')
_REPLOT = flags.DEFINE_bool('replot', False, 'Rewrite OUT.md and OUT.png from OUT.json.')


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    out = _OUT.value
    if _REPLOT.value:
        with open(out + '.json') as f:
            result = json.load(f)
    else:
        result = run([int(n) for n in _LENGTHS.value], _REPEATS.value, _MAX_TEMP_GIB.value,
                     _MAX_STEP_S.value)
        with open(out + '.json', 'w') as f:
            json.dump(result, f, indent=2)
    write_markdown(result, out + '.md')
    plot(result, out + '.png')


if __name__ == '__main__':
    app.run(main)
