"""Entry point: flags -> config -> distributed init -> run().

    python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/tiny \
        --config.train.steps=100

Restarting the same command on the same workdir resumes from its latest checkpoint.
"""

import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from pretrain import checkpoint as ckpt_lib
from pretrain import config as config_lib
from pretrain import data as data_lib
from pretrain import distributed
from pretrain import mesh as mesh_lib
from pretrain import metrics as metrics_lib
from pretrain import optim, schedules
from pretrain import state as state_lib
from pretrain import step as step_lib
from pretrain.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: config, metrics, checkpoints.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')


def _flat_shapes(shapes) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): list(leaf.shape) for path, leaf in flat}


def _check_schedule(record: dict, spec: schedules.ScheduleSpec, allow_change: bool, where: str) -> None:
    saved = record.get('schedule')
    if saved is None or saved == spec.to_dict() or allow_change:
        return
    diffs = {k: (saved.get(k), v) for k, v in spec.to_dict().items() if saved.get(k) != v}
    raise ConfigError(f'the schedule differs from the one saved in {where}: '
                      + ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in diffs.items())
                      + '. Resuming would silently change the learning rate of a running job; '
                      'restore the saved values or pass --config.schedule.allow_resume_change=True.')


def _global_batch(local: dict[str, np.ndarray], sharding, global_rows: int) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:]))
            for k, v in local.items()}


def run(config: ml_collections.ConfigDict, workdir: str,
        devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Trains (or resumes) the configured run in `workdir`; returns the logged history."""
    from model_zoo import FAMILIES

    cfg = config_lib.finalize(config)
    devices = list(devices or jax.devices())
    granules = len({getattr(d, 'slice_index', d.process_index) for d in devices})
    config_lib.validate(cfg, num_devices=len(devices), num_granules=granules,
                        process_count=jax.process_count())
    family = FAMILIES.get(cfg.model.family)
    rules = mesh_lib.merge_rules(cfg.mesh.rules)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    spec = schedules.spec_from_config(cfg.schedule, cfg.optim.lr, cfg.train.steps)
    schedule = schedules.make_schedule(spec)
    md = state_lib.model_def(family.build, cfg)
    param_shapes = _flat_shapes(md.shapes)

    ckpt_dir = os.path.join(workdir, 'checkpoints')
    latest = None
    if os.path.isdir(ckpt_dir):  # check compatibility before creating or computing anything
        ckpt = ckpt_lib.Checkpointer(ckpt_dir, cfg.checkpoint)
        latest = ckpt.latest_step()
        if latest is not None:
            record = ckpt.read_record(latest)
            ckpt_lib.check_shapes(record, param_shapes, ckpt_dir, latest)
            _check_schedule(record, spec, cfg.schedule.allow_resume_change, f'{ckpt_dir} step {latest}')
    else:
        ckpt = None

    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            f.write(config_lib.to_json(cfg))
    ckpt = ckpt or ckpt_lib.Checkpointer(ckpt_dir, cfg.checkpoint)

    t = cfg.train
    pipeline = data_lib.make_text_pipeline(
        cfg.data, global_batch_size=t.global_batch_size, num_eval_batches=t.eval_batches,
        seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = pipeline.train_iterator()
    tx = optim.make_optimizer(cfg.optim, schedule, md.info)

    # Measured outside the mesh context: a CPU peak is a single-device matmul.
    peak, peak_source = metrics_lib.total_peak_flops(devices, cfg.metrics.peak_flops_per_device)
    writer = metrics_lib.MetricsWriter(workdir, active=is_main, total_steps=t.steps,
                                       tensorboard=cfg.metrics.tensorboard)
    with mesh_lib.activate(mesh, rules):
        abstract = jax.eval_shape(state_lib.init_fn(family.build, cfg, tx), jax.random.PRNGKey(0))
        shardings = state_lib.state_shardings(md, tx, mesh, rules, abstract)
        if latest is not None:
            state = ckpt.restore(latest, state_lib.abstract_with_shardings(abstract, shardings), data_iter)
            writer.text(f'resumed from step {latest} in {ckpt_dir}')
        else:
            state = jax.jit(state_lib.init_fn(family.build, cfg, tx), out_shardings=shardings)(
                jax.random.PRNGKey(cfg.seed))

        batch_sharding = mesh_lib.named_sharding(mesh, step_lib.BATCH_AXES)
        train_step = jax.jit(
            step_lib.make_train_step(family.loss, md, tx, schedule, t.grad_accum_steps),
            in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
            donate_argnums=(0,))
        byte_lengths = jnp.asarray(pipeline.tokenizer.byte_lengths, jnp.float32)
        eval_step = jax.jit(step_lib.make_eval_step(family.loss, md, byte_lengths),
                            in_shardings=(shardings.params, batch_sharding))

        n_params = state_lib.param_count(md)
        tokens_per_step = t.global_batch_size * family.tokens_per_example(cfg)
        flops_per_step = t.global_batch_size * family.flops_per_example(cfg)
        writer.text(f'{cfg.model.family}: {n_params:,} params, {flops_per_step / tokens_per_step:.3g} '
                    f'FLOPs/token, mesh {dict(mesh.shape)}, {jax.process_count()} process(es), '
                    f'peak {peak:.3g} FLOP/s ({peak_source}); {schedules.describe(spec)}')

        def evaluate(step: int, params) -> dict[str, float]:
            totals: dict[str, float] = {}
            n = 0
            for local in pipeline.eval_batches():
                out = jax.device_get(eval_step(params, _global_batch(local, batch_sharding, t.global_batch_size)))
                for k, v in out.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                n += 1
            result = {'loss': totals['loss'] / n}
            if 'bytes' in totals:
                result['bits_per_byte'] = result['loss'] * totals['tokens'] / (math.log(2) * totals['bytes'])
            writer.write(step, result, split='eval')
            return result

        step = int(jax.device_get(state.step))
        history: list[dict[str, float]] = []
        evals: list[dict[str, float]] = []
        compiled = None
        last_logged = step
        throughput = metrics_lib.Throughput()
        while step < t.steps:
            batch = _global_batch(next(data_iter), batch_sharding, t.global_batch_size)
            if compiled is None:
                start = time.perf_counter()
                compiled = train_step.lower(state, batch).compile()
                writer.text(f'compiled the train step in {time.perf_counter() - start:.1f}s')
                throughput.reset()
            state, metrics = compiled(state, batch)
            step += 1
            if step % t.log_every == 0 or step == t.steps:
                logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
                done = step - last_logged
                speed = throughput.update(tokens=tokens_per_step * done, flops=flops_per_step * done,
                                          steps=done)
                last_logged = step
                logged.update(tokens=float(step * tokens_per_step), **speed,
                              mfu=metrics_lib.mfu(speed['flops_per_s'], peak))
                history.append({'step': step, **logged})
                writer.write(step, logged)
            if ckpt.manager.should_save(step) or step == t.steps:
                ckpt.save(step, state, data_iter, _record(cfg, spec, param_shapes, step), force=step == t.steps)
            if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                evals.append({'step': step, **evaluate(step, state.params)})
                throughput.reset()  # eval time is not training throughput
                last_logged = step
        ckpt.close()
    writer.close()
    return {'history': history, 'eval': evals, 'step': step, 'params': n_params,
            'state': state}


def _record(cfg, spec: schedules.ScheduleSpec, param_shapes, step: int) -> dict[str, Any]:
    return {'step': step, 'config': cfg.to_dict(), 'schedule': spec.to_dict(),
            'param_shapes': param_shapes}


def _quiet_library_info() -> None:
    """Drops orbax's per-save INFO chatter from the log; its warnings and errors still show."""
    def keep(record) -> bool:
        return record.levelno > logging.INFO or f'{os.sep}orbax{os.sep}' not in record.pathname
    absl_logging.get_absl_handler().addFilter(keep)


def main(argv) -> None:
    _quiet_library_info()
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError('--config and --workdir are required')
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        raise SystemExit(f'config error: {e}') from None


if __name__ == '__main__':
    app.run(main)
