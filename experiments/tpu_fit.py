"""Per-chip HBM and estimated MFU of the published configs on four TPU slices, with the layout and
remat choice that fits (pretrain.tpu_fit's advisor), compiled ahead of time by the TPU compiler.

    pip install -e '.[tpu]'
    .venv/bin/python -m experiments.tpu_fit [--configs=llama_1b,mamba_130m] [--topologies=v5e:4x4]

Each (config, topology) is one advisor search (remat none -> dots -> full, micro-batches 1 -> 16,
first fit per policy; fsdp over every chip first, tensor parallelism 4 then 8 only where nothing
fits), each compiled candidate kept in <config>@<topology>.json.partial until the search ends,
saved to docs/tpu_fit/<config>@<topology>.json as soon as it finishes, so
an interrupted run resumes where it stopped. Transformer configs use the splash attention kernel
(model.attention_impl='splash'). docs/tpu_fit.md is rewritten from all saved results
each time, with a row next to MaxText's published MFU where a comparable figure exists. The
estimates are rooflines (no collectives, no input pipeline): an upper bound, not a measurement.
"""

import json
import os
from typing import Any

from absl import app, flags

from experiments import common
from pretrain import tpu, tpu_fit
from pretrain.errors import ConfigError

CONFIGS = ['mamba_130m', 'mamba2_130m', 'var_d16', 'mamba_370m', 'mamba2_370m', 'llama_1b',
           'llama_8b']   # smallest first: an interrupted run has covered the cheap ones
TOPOLOGIES = ['v5e:4x4', 'v5e:16x16', 'v5p:4x4x4', 'v6e:8x8']
GRAD_ACCUM = (1, 2, 4, 8, 16)
LAYOUTS = (None, 4, 8)   # the config's mesh (fsdp over every chip), then mesh.ici.tensor = 4, 8
# Published measurements of a comparable model and chip: (config, topology) -> what and where.
PUBLISHED = {
    ('llama_8b', 'v6e:16x16'): {
        'mfu': 0.4546, 'tokens_per_s_per_chip': 7207,
        'what': 'MaxText, Llama 3.1 8B, 256 v6e chips, bf16, sequence 8192 (optimized-models '
                'tiering table of the MaxText documentation)'},
}
EXTRA_PAIRS = [('llama_8b', 'v6e:16x16')]   # run for the comparison with the published figure


def _define_flags() -> None:
    """Defined only when run as a program, so that tests can import the table's code."""
    flags.DEFINE_list('configs', CONFIGS, 'Config names under configs/.')
    flags.DEFINE_list('topologies', TOPOLOGIES, 'TPU topologies.')
    flags.DEFINE_string('out', 'docs', 'Folder of tpu_fit.md and tpu_fit/.')


def _config(name: str):
    import importlib
    c = importlib.import_module(f'configs.{name}').get_config()
    if c.model.family == 'transformer':
        # The kernel a TPU run uses (and MaxText's comparable runs): the configs' default dense
        # kernel would hold the L x L scores of an 8k sequence.
        c.model.attention_impl = 'splash'
    return c


def _path(out: str, config: str, topology: str) -> str:
    return os.path.join(out, 'tpu_fit', f'{config}@{topology}.json')


def reestimate(advice: dict[str, Any]) -> dict[str, Any]:
    """A saved advice with its roofline recomputed by today's `tpu.estimate` from the stored
    compiler numbers (no recompilation), and the fastest fit chosen again."""
    if not advice.get('candidates'):
        return advice
    chip = tpu.parse(advice['topology'])[0]
    for c in advice['candidates']:
        if 'dry_run' in c:
            c['dry_run'].setdefault('grad_accum_steps', c['grad_accum'])   # saved before it was
            c['dry_run']['tpu'] = tpu.estimate(c['dry_run'], chip, advice['devices'])
    fitting = [c for c in advice['candidates'] if c['fits'] and 'dry_run' in c]
    advice['best'] = min(fitting, key=lambda c: c['dry_run']['tpu']['step_s'], default=None)
    return advice


def run_pair(out: str, config: str, topology: str) -> dict[str, Any]:
    path = _path(out, config, topology)
    earlier, layouts = [], list(LAYOUTS)   # a saved search with no fit goes on with new layouts
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        earlier, layouts = saved['candidates'], tpu_fit.layouts_left(saved, LAYOUTS)
        if not layouts:
            return reestimate(saved)
    print(f'{config} on {topology}:', flush=True)
    partial = path + '.partial'   # the candidates compiled so far by an interrupted search
    done = []
    if os.path.exists(partial):
        with open(partial) as f:
            done = json.load(f)
    try:
        advice = tpu_fit.advise(_config(config), topology, grad_accums=GRAD_ACCUM,
                                layouts=layouts, say=lambda line: print(line, flush=True),
                                done=done, record=lambda rows: _write(partial, rows))
        advice['candidates'] = earlier + advice['candidates']
        advice = reestimate(advice)
    except ConfigError as e:
        advice = {'topology': topology, 'error': str(e), 'candidates': [], 'best': None}
    advice['config'] = config
    _write(path, advice)
    if os.path.exists(partial):
        os.remove(partial)
    return advice


def _write(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)   # a killed run leaves no half-written file


def _row(advice: dict[str, Any]) -> str:
    config, topology = advice['config'], advice['topology']
    best = advice['best']
    tried = sum(not c.get('error', '').startswith(tpu_fit.SKIPPED) for c in advice['candidates'])
    died = sum(c.get('error', '').startswith(tpu_fit.DIED) for c in advice['candidates'])
    counted = f'{tried} tried' + (f', {died} of them ended the compiling process' if died else '')
    if best is None:
        why = advice.get('error') or tpu_fit.nothing_fits(advice['candidates'])
        return f'| {config} | {topology} | - | - | - | - | {why} ({counted}) |'
    r = best['dry_run']
    t = r['tpu']
    used = r['total_bytes'] / tpu.GIB
    mesh = ' x '.join(f'{k} {v}' for k, v in r['mesh'].items() if v > 1)
    return (f'| {config} | {topology} | {mesh} | {best["remat"]}, accum {best["grad_accum"]} | '
            f'{used:.2f} / {t["hbm_bytes"] / tpu.GIB:.0f} GiB | {t["step_s"] * 1e3:.0f} ms '
            f'({t["bound"]}) | {100 * t["mfu"]:.1f}% ({counted}) |')


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        '# Fitting the published configs on TPU slices (ahead-of-time compilation)',
        '',
        'Written by `python -m experiments.tpu_fit` (needs `pip install -e \'.[tpu]\'`). Every',
        'number is read from the TPU compiler\'s output for the trainer\'s real train step,',
        'compiled on a CPU-only machine for the abstract devices of the slice. HBM is the',
        'compiler\'s per-chip memory analysis (arguments + outputs - aliased + temporaries)',
        'against the chip\'s published capacity. Step time and MFU are a **roofline estimate**:',
        'max(XLA FLOPs / peak, XLA bytes accessed / HBM bandwidth) per chip, with collectives,',
        'host input and imperfect overlap left out, so real MFU is lower. The compute-bound',
        'transformer rows read about 100%: XLA does not count the FLOPs inside the splash kernel,',
        'so the estimate takes the model\'s own FLOPs (the larger count) as the step\'s; such a row',
        'says the step is not limited by HBM traffic, not how fast it will run. XLA counts the',
        'body of the micro-batch loop once, so with micro-batches its counts are multiplied by',
        'their number.',
        '',
        'The advisor (`python -m pretrain.tpu_fit`) tries remat none -> dots -> full and 1 -> 16',
        'micro-batches, stopping each policy at its first fit (a policy with more recompute only',
        'with fewer micro-batches than a cheaper one already fits with; a micro-batch count is not',
        'compiled when a refusal with fewer already shows that its temporaries cannot fit, as only',
        'the activations shrink with the micro-batch), and picks the fastest fit by the estimate.',
        '"tried" counts the compiled candidates; a compile that ended the compiling process (the',
        'host\'s out-of-memory killer: a large step, its layers unrolled, can take more host',
        'memory than the 23 GB this table was compiled with) is counted and named, and not',
        'retried on resume. Transformer configs run with the splash attention kernel, as a TPU',
        'run would. The layout is fsdp over every chip first; only where nothing fits with it are',
        'tensor-parallel layouts tried (tensor 4, then 8, fsdp taking the rest), stopping at the',
        'first that fits: the roofline leaves out the collectives that set layouts apart, so it',
        'cannot rank them. Where nothing fits, the row says what the compiler asked for.',
        '',
        f'Status: {len(results)} of {len(CONFIGS) * len(TOPOLOGIES) + len(EXTRA_PAIRS)} '
        '(config, slice) pairs done' + ('.' if len(results) >= len(CONFIGS) * len(TOPOLOGIES)
                                        + len(EXTRA_PAIRS) else
                                        '; in progress (each pair is saved as it finishes, and '
                                        'rerunning the command resumes).'),
        '',
        '| config | slice | mesh | remat, micro-batches | HBM per chip | est. step | est. MFU |',
        '|---|---|---|---|---|---|---|',
    ]
    lines += [_row(a) for a in results]
    compared = [(a, PUBLISHED[(a['config'], a['topology'])]) for a in results
                if (a['config'], a['topology']) in PUBLISHED and a['best']]
    if compared:
        lines += ['', '## Against a published measurement', '',
                  '| config | slice | estimate here | published (measured) |', '|---|---|---|---|']
        for a, pub in compared:
            t = a['best']['dry_run']['tpu']
            lines.append(f'| {a["config"]} | {a["topology"]} | MFU {100 * t["mfu"]:.1f}% (roofline) '
                         f'| MFU {100 * pub["mfu"]:.1f}%, {pub["tokens_per_s_per_chip"]:,} tokens/s '
                         f'per chip: {pub["what"]} |')
        lines += ['', 'The roofline leaves out what separates a compiled program from a measured one',
                  '(collectives that do not overlap, step overheads), so it should lie above the',
                  'measurement; how far above is the part of the gap this estimate cannot see.']
    return '\n'.join(lines) + '\n'


def main(argv) -> None:
    del argv
    common.setup()
    tpu.check_libtpu()
    import jax
    jax.config.update('jax_platforms', 'cpu')
    FLAGS = flags.FLAGS
    pairs = [(c, t) for c in FLAGS.configs for t in FLAGS.topologies]
    pairs += [p for p in EXTRA_PAIRS if p not in pairs and p[0] in FLAGS.configs]
    for config, topology in pairs:
        run_pair(FLAGS.out, config, topology)
    saved = []
    folder = os.path.join(FLAGS.out, 'tpu_fit')
    for config in CONFIGS:
        for topology in TOPOLOGIES + [t for c, t in EXTRA_PAIRS if c == config]:
            if os.path.exists(_path(FLAGS.out, config, topology)):
                with open(_path(FLAGS.out, config, topology)) as f:
                    saved.append(reestimate(json.load(f)))
    with open(os.path.join(FLAGS.out, 'tpu_fit.md'), 'w') as f:
        f.write(markdown(saved))
    print(f'wrote {os.path.join(FLAGS.out, "tpu_fit.md")} ({len(saved)} results in {folder})')


if __name__ == '__main__':
    _define_flags()
    app.run(main)
