"""Coordinate check: per-layer activation size vs width after a few Adam steps, SP vs muP.

    python -m pretrain.coord_check --config=configs/lm_tiny.py --out=runs/coord \
        --widths=64,128,256,512 --steps=5 --parametrizations=sp,mup

For each parametrization and width (base_width = the smallest width, fixed head count, d_ff
proportional to width), it trains `steps` steps with the real train step on the configured data
and records mean |x| of each layer's output, and of each attention block's pre-softmax logits
('attn_logits_<i>', reported by the model's capture), on a fixed batch after every step. It writes
`coord_check.json` (values and the slope of log2 mean|x| vs log2 width per layer and step) and
`coord_check.png`. Under SP slopes grow with steps (about +1 for the logits); under muP they
stay near 0. A flat check does not prove LR transfer: only an LR sweep across widths does.
"""

import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from pretrain import config as config_lib
from pretrain import data as data_lib
from pretrain import mesh as mesh_lib
from pretrain import optim, parametrization, schedules
from pretrain import state as state_lib
from pretrain import step as step_lib


def _width_config(cfg, width: int, base_width: int, name: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(cfg.to_dict())
    ratio = cfg.model.d_ff / cfg.model.d_model
    c.model.update(d_model=width, d_ff=int(round(ratio * width)))
    c.parametrization.update(name=name, base_width=base_width)
    c.mesh.ici.update(data=1, fsdp=1, tensor=1, sequence=1)
    c.mesh.dcn.update(data=1, fsdp=1, tensor=1, sequence=1)
    c.lock()
    return c


def measure(cfg, width: int, base_width: int, name: str, steps: int) -> dict[str, list[float]]:
    """mean |x| per layer output after 0..steps updates (one device)."""
    from model_zoo import FAMILIES

    c = _width_config(cfg, width, base_width, name)
    family = FAMILIES.get(c.model.family)
    spec = schedules.spec_from_config(c.schedule, c.optim.lr, c.train.steps)
    schedule = schedules.make_schedule(spec)
    md = state_lib.model_def(family.build, c)
    p13n = parametrization.from_config(c)
    tx = optim.make_optimizer(c.optim, schedule, md.info, p13n)
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    pipeline = data_lib.make_text_pipeline(c.data, global_batch_size=c.train.global_batch_size,
                                           num_eval_batches=1, seed=c.seed)
    batches = pipeline.train_iterator()
    probe = next(pipeline.eval_batches())

    def activations(params, batch):
        capture = {}
        md.merge(params)(batch['inputs'], capture=capture)
        return {k: jax.numpy.mean(jax.numpy.abs(v.astype(jax.numpy.float32))) for k, v in capture.items()}

    with mesh_lib.activate(mesh):
        state, _, _ = state_lib.create(family.build, c, tx, mesh, mesh_lib.DEFAULT_RULES)
        train_step = jax.jit(step_lib.make_train_step(family.loss, md, tx, schedule))
        measure_fn = jax.jit(activations)
        out: dict[str, list[float]] = {}
        for t in range(steps + 1):
            for k, v in jax.device_get(measure_fn(state.params, probe)).items():
                out.setdefault(k, []).append(float(v))
            if t < steps:
                state, _ = train_step(state, next(batches))
    return out


def slopes(values: dict[int, dict[str, list[float]]]) -> dict[str, list[float]]:
    """Least-squares slope of log2 mean|x| against log2 width, per layer and step."""
    widths = sorted(values)
    x = np.log2(widths)
    layers = values[widths[0]]
    return {layer: [float(np.polyfit(x, np.log2([values[w][layer][t] for w in widths]), 1)[0])
                    for t in range(len(layers[layer]))] for layer in layers}


def run(cfg, widths: Sequence[int], steps: int, names: Sequence[str], out_dir: str | None = None) -> dict:
    base = min(widths)
    result = {}
    for name in names:
        values = {w: measure(cfg, w, base, name, steps) for w in widths}
        result[name] = {'values': {str(w): v for w, v in values.items()}, 'slopes': slopes(values)}
    result['widths'] = list(widths)
    result['steps'] = steps
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'coord_check.json'), 'w') as f:
            json.dump(result, f, indent=1)
        plot(result, os.path.join(out_dir, 'coord_check.png'))
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = [k for k in result if k not in ('widths', 'steps')]
    layers = list(result[names[0]]['slopes'])
    fig, axes = plt.subplots(len(names), len(layers), figsize=(3 * len(layers), 2.8 * len(names)),
                             squeeze=False, sharex=True)
    widths = result['widths']
    for i, name in enumerate(names):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            for t in range(result['steps'] + 1):
                ys = [result[name]['values'][str(w)][layer][t] for w in widths]
                ax.plot(widths, ys, marker='o', label=f't={t}', color=plt.cm.viridis(t / max(1, result['steps'])))
            ax.set_xscale('log', base=2)
            ax.set_yscale('log', base=2)
            ax.set_title(f'{name}: {layer}\nslope@t={result["steps"]}: {result[name]["slopes"][layer][-1]:+.2f}',
                         fontsize=8)
            if i == len(names) - 1:
                ax.set_xlabel('width')
    axes[0][0].set_ylabel('mean |x|')
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _define_flags() -> None:
    # Defined only when run as a script: importing this module next to pretrain.train (which
    # owns --config) must not define a flag twice.
    config_flags.DEFINE_config_file('config', 'configs/lm_tiny.py', 'Base config file.')
    flags.DEFINE_string('out', 'runs/coord_check', 'Output folder.')
    flags.DEFINE_list('widths', ['64', '128', '256', '512'], 'Widths (d_model).')
    flags.DEFINE_integer('steps', 5, 'Adam steps.')
    flags.DEFINE_list('parametrizations', ['sp', 'mup'], 'Parametrizations to compare.')


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    cfg = config_lib.finalize(f.config)
    names = f.parametrizations
    result = run(cfg, [int(w) for w in f.widths], f.steps, names, f.out)
    for name in names:
        print(name, {k: round(v[-1], 3) for k, v in result[name]['slopes'].items()})


if __name__ == '__main__':
    _define_flags()
    app.run(main)
