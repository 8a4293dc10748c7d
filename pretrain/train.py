"""Entry point: flags -> config -> distributed init -> run().

    python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/tiny \
        --config.train.steps=100

Restarting the same command on the same workdir resumes from its latest checkpoint.
--dry_run compiles the step for the configured mesh and prints its size, FLOPs and memory.

Exit codes: 0 finished; 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGINT after saving a checkpoint at
the current step, so restarting resumes there; 1 config error or non-finite loss/gradients
(train.nonfinite_policy='stop'; the message names the step and the last good checkpoint).
"""

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

from pretrain import branching
from pretrain import checkpoint as ckpt_lib
from pretrain import config as config_lib
from pretrain import data as data_lib
from pretrain import distributed
from pretrain import mesh as mesh_lib
from pretrain import metrics as metrics_lib
from pretrain import optim, parametrization, preemption, scaling_rules, schedules
from pretrain import state as state_lib
from pretrain import step as step_lib
from pretrain.errors import ConfigError, NonFiniteError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: config, metrics, checkpoints.')
# The multi-process flags (--distributed, --coordinator_address, ...) live in pretrain/distributed.py.
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Compile the train step on abstract inputs, print '
                                'its size, FLOPs and memory, and exit; writes nothing.')
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    'dry_run_devices', 0, 'With --dry_run: compile for this many simulated CPU devices instead of '
    'the devices present, to check a mesh layout for a larger machine (shardings and per-device '
    'memory as the CPU compiler sees them).')


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


def _batch_axes(family) -> tuple[str, ...]:
    # Text shards (batch, sequence); other batches hold arrays of several ranks (labels [B],
    # images [B, H, W, C]) and shard only their batch axis.
    return step_lib.BATCH_AXES if family.data == 'text' else step_lib.BATCH_AXES[:1]


def _compile_parts(cfg, family, md, schedule, mesh, rules):
    """Optimizer, abstract state, shardings and the jitted train step (inside the mesh context)."""
    p13n = parametrization.from_config(cfg)
    tx = optim.make_optimizer(cfg.optim, schedule, md.info, p13n)
    abstract = jax.eval_shape(state_lib.init_fn(family.build, cfg, tx), jax.random.PRNGKey(0))
    shardings = state_lib.state_shardings(md, tx, mesh, rules, abstract)
    batch_sharding = mesh_lib.named_sharding(mesh, _batch_axes(family))
    train_step = jax.jit(
        step_lib.make_train_step(family.loss, md, tx, schedule, cfg.train.grad_accum_steps,
                                 optim.applied_rates(cfg.optim, schedule, md.info, p13n)),
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
        donate_argnums=(0,))
    return tx, abstract, shardings, batch_sharding, train_step


def run(config: ml_collections.ConfigDict, workdir: str,
        devices: list[jax.Device] | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the configured run in `workdir`; returns the logged history.

    'preempted' in the result is True when SIGTERM/SIGINT stopped the run after saving at
    'step'. Raises ConfigError before any compute, and NonFiniteError on a NaN/inf loss or
    gradient with train.nonfinite_policy='stop'. dry_run=True only compiles the step on
    abstract inputs and reports its size and cost (`_dry_run`); `workdir` is not touched.
    """
    from model_zoo import FAMILIES

    devices = list(devices or jax.devices())
    granules = len({getattr(d, 'slice_index', d.process_index) for d in devices})
    layout = dict(num_devices=len(devices), num_granules=granules, process_count=jax.process_count())
    cfg = config_lib.finalize(config)
    axes = config_lib.validate(cfg, **layout)
    family = FAMILIES.get(cfg.model.family)
    md = state_lib.model_def(family.build, cfg)
    scaling = None
    if cfg.scaling.rule != 'none':
        # The rule's outputs replace config values before finalize (so a derived train.steps
        # also sets an unset schedule.total_steps), then everything is validated again.
        non_embedding = state_lib.param_count(md, exclude_roles=('embedding', 'readout'))
        overrides, explanation = scaling_rules.apply(
            cfg, non_embedding, batch_multiple=axes['data'] * axes['fsdp'] * cfg.train.grad_accum_steps)
        cfg = config_lib.finalize(config_lib.with_overrides(config, overrides))
        config_lib.validate(cfg, **layout)
        scaling = {'overrides': overrides, 'explanation': explanation}
        if jax.process_index() == 0:
            absl_logging.info('scaling rule %s:\n%s', cfg.scaling.rule, explanation)
    rules = mesh_lib.merge_rules(cfg.mesh.rules)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    spec = schedules.spec_from_config(cfg.schedule, cfg.optim.lr, cfg.train.steps)
    schedule = schedules.make_schedule(spec)
    param_shapes = _flat_shapes(md.shapes)
    if dry_run:
        return _dry_run(cfg, family, md, schedule, mesh, rules)

    ckpt_dir = os.path.join(workdir, 'checkpoints')
    latest = None
    lineage: list[dict[str, Any]] = []   # runs this one branched from: [{'run', 'step'}, ...]
    skipped = 0    # updates skipped for a non-finite loss or gradient, over the whole run
    if os.path.isdir(ckpt_dir):  # check compatibility before creating or computing anything
        ckpt = ckpt_lib.Checkpointer(ckpt_dir, cfg.checkpoint)
        latest = ckpt.latest_step()
        if latest is not None:
            record = ckpt.read_record(latest)
            ckpt_lib.check_shapes(record, param_shapes, ckpt_dir, latest)
            _check_schedule(record, spec, cfg.schedule.allow_resume_change, f'{ckpt_dir} step {latest}')
            skipped = int(record.get('skipped_steps', 0))
            lineage = record.get('lineage', [])
    else:
        ckpt = None
    parent = None   # (read-only checkpointer, step) of the run this one branches from
    if latest is None and cfg.schedule.branch_from:
        parent_run, branch_step = branching.parse(cfg.schedule.branch_from)
        parent_dir = os.path.join(parent_run, 'checkpoints')
        if not os.path.isdir(parent_dir):
            raise ConfigError(f'schedule.branch_from={cfg.schedule.branch_from!r}: {parent_dir} '
                              'does not exist')
        parent_ckpt = ckpt_lib.Checkpointer(parent_dir, cfg.checkpoint, read_only=True)
        if branch_step not in parent_ckpt.all_steps():
            raise ConfigError(f'schedule.branch_from={cfg.schedule.branch_from!r}: no checkpoint at '
                              f'step {branch_step}; {parent_dir} has steps {parent_ckpt.all_steps()}')
        parent_record = parent_ckpt.read_record(branch_step)
        ckpt_lib.check_shapes(parent_record, param_shapes, parent_dir, branch_step)
        lineage = branching.check(parent_record, parent_run, branch_step, spec, cfg.train.steps)
        parent = (parent_ckpt, branch_step)

    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            f.write(config_lib.to_json(cfg, **({'scaling_applied': scaling} if scaling else {})))
    ckpt = ckpt or ckpt_lib.Checkpointer(ckpt_dir, cfg.checkpoint)

    t = cfg.train
    pipeline = data_lib.make_pipeline(
        cfg, family, global_batch_size=t.global_batch_size, num_eval_batches=t.eval_batches,
        seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = pipeline.train_iterator()
    # Measured outside the mesh context: a CPU peak is a single-device matmul.
    peak, peak_source = metrics_lib.total_peak_flops(devices, cfg.metrics.peak_flops_per_device)
    writer = metrics_lib.MetricsWriter(workdir, active=is_main, total_steps=t.steps,
                                       tensorboard=cfg.metrics.tensorboard)
    with mesh_lib.activate(mesh, rules):
        tx, abstract, shardings, batch_sharding, train_step = _compile_parts(
            cfg, family, md, schedule, mesh, rules)
        if latest is not None:
            state = ckpt.restore(latest, state_lib.abstract_with_shardings(abstract, shardings), data_iter)
            writer.text(f'resumed from step {latest} in {ckpt_dir}')
        elif parent is not None:
            parent_ckpt, branch_step = parent
            state = parent_ckpt.restore(branch_step, state_lib.abstract_with_shardings(abstract, shardings),
                                        data_iter)
            parent_ckpt.close()
            writer.text(f'branched from {parent_ckpt.path(branch_step)}; lineage {lineage}')
        else:
            state = jax.jit(state_lib.init_fn(family.build, cfg, tx), out_shardings=shardings)(
                jax.random.PRNGKey(cfg.seed))

        byte_lengths = (None if pipeline.tokenizer is None   # bits/byte only for text
                        else jnp.asarray(pipeline.tokenizer.byte_lengths, jnp.float32))
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

        def check_finite(at: int, metrics) -> None:
            """Acts on step `at`'s non-finite flag (reading it waits for that step)."""
            nonlocal skipped
            if not int(metrics['nonfinite']):
                return
            if t.nonfinite_policy == 'skip':
                skipped += 1
                writer.text(f'step {at}: non-finite loss or gradients; update skipped '
                            f'({skipped} so far)')
                return
            ckpt.wait()   # an async save of an earlier, good step may still be committing
            last = ckpt.latest_step()
            path = None if last is None else ckpt.path(last)
            raise NonFiniteError(
                f'non-finite loss or gradients at step {at} (loss {float(metrics["loss"])}, grad '
                f'norm {float(metrics["grad_norm"])}) with train.nonfinite_policy=stop; nothing '
                f'after step {at - 1} was saved. Last good checkpoint: '
                + ('none' if last is None else f'{path} (step {last})'), at, path)

        step = int(jax.device_get(state.step))
        history: list[dict[str, float]] = []
        evals: list[dict[str, float]] = []
        compiled = None
        last_logged = step
        throughput = metrics_lib.Throughput()
        watcher = preemption.Watcher()
        timer = ckpt_lib.SaveTimer(cfg.checkpoint.every_minutes)
        # Multi-process runs agree (one tiny collective at log steps) on time-based saves and,
        # without JAX's preemption sync manager, on stopping; otherwise nothing is exchanged.
        collective = jax.process_count() > 1 and (timer.interval > 0 or watcher.needs_agreement)
        preempted = False
        pending = None   # (step, metrics) whose non-finite flag has not been read yet
        try:
            with watcher:
                while step < t.steps:
                    batch = _global_batch(next(data_iter), batch_sharding, t.global_batch_size)
                    if compiled is None:
                        start = time.perf_counter()
                        compiled = train_step.lower(state, batch).compile()
                        if t.eval_every:   # also compiled now: processes must not drift apart
                            eval_step = eval_step.lower(state.params, batch).compile()
                        writer.text(f'compiled the train step in {time.perf_counter() - start:.1f}s')
                        # A process that hit the compilation cache must not reach the first
                        # collective more than gloo's fixed 30 s before one that compiled.
                        distributed.barrier('train_step_compiled')
                        throughput.reset()
                        timer.reset()
                    state, metrics = compiled(state, batch)
                    step += 1
                    # Reading the previous step's flag, not this one's, keeps this step queued
                    # on the device while the host prepares the next batch.
                    if pending is not None:
                        check_finite(*pending)
                    pending = (step, metrics)
                    stop = watcher.should_stop(step)
                    log = step % t.log_every == 0 or step == t.steps
                    timed = False
                    if log:   # the host waits for the step here anyway
                        timed = timer.due()
                        if collective:
                            stop, timed = preemption.agree(
                                stop or (watcher.needs_agreement and watcher.local_flag), timed)
                    stop = stop and step < t.steps   # the last step is a normal finish
                    # Not orbax's should_save: it also saves the first step and polls the
                    # preemption sync point a second time.
                    save = (stop or timed or step == t.steps
                            or step % cfg.checkpoint.every_steps == 0)
                    if log or save:   # never log or save a step before knowing it was finite
                        check_finite(*pending)
                        pending = None
                    if log:
                        logged = {k: float(v) for k, v in jax.device_get(metrics).items()
                                  if k != 'nonfinite'}
                        done = step - last_logged
                        speed = throughput.update(tokens=tokens_per_step * done,
                                                  flops=flops_per_step * done, steps=done)
                        last_logged = step
                        logged.update(tokens=float(step * tokens_per_step), skipped=float(skipped),
                                      **speed, mfu=metrics_lib.mfu(speed['flops_per_s'], peak))
                        history.append({'step': step, **logged})
                        writer.write(step, logged)
                    if save:
                        ckpt.save(step, state, data_iter,
                                  _record(cfg, spec, param_shapes, step, skipped, lineage), force=True)
                        timer.reset()
                    if stop:
                        ckpt.wait()
                        preempted = True
                        writer.text(f'preempted at step {step}: checkpoint saved to '
                                    f'{ckpt.path(step)}')
                        break
                    if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                        evals.append({'step': step, **evaluate(step, state.params)})
                        throughput.reset()  # eval time is not training throughput
                        last_logged = step
        finally:
            ckpt.close()   # waits for an in-flight save, also when an error stops the run
            writer.close()
    return {'history': history, 'eval': evals, 'step': step, 'params': n_params,
            'state': state, 'preempted': preempted, 'skipped': skipped}


def _abstract_batch(cfg, family, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    if family.example_spec is not None:
        return {k: jax.ShapeDtypeStruct((cfg.train.global_batch_size, *s.shape), s.dtype,
                                        sharding=sharding)
                for k, s in family.example_spec(cfg).items()}
    if family.data != 'text':
        raise ConfigError(f'--dry_run does not know the batch of data kind {family.data!r}')
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
            for k in ('inputs', 'targets')}


def _dry_run(cfg, family, md, schedule, mesh, rules) -> dict[str, Any]:
    """Compiles the train step for the configured mesh on abstract inputs and reports its cost.

    Nothing is materialised (no parameter, no batch), no data is read, no file is written.
    """
    t = cfg.train
    with mesh_lib.activate(mesh, rules):
        _, abstract, shardings, batch_sharding, train_step = _compile_parts(
            cfg, family, md, schedule, mesh, rules)
        start = time.perf_counter()
        compiled = train_step.lower(state_lib.abstract_with_shardings(abstract, shardings),
                                    _abstract_batch(cfg, family, batch_sharding)).compile()
        compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    report = {
        'params': state_lib.param_count(md),
        'flops_per_step': float(t.global_batch_size * family.flops_per_example(cfg)),
        'mesh': dict(mesh.shape),
        'compile_s': compile_s,
        # Per device: the SPMD program is the same on every device.
        'argument_bytes': int(mem.argument_size_in_bytes),
        'output_bytes': int(mem.output_size_in_bytes),
        'alias_bytes': int(mem.alias_size_in_bytes),   # outputs written over donated inputs
        'temp_bytes': int(mem.temp_size_in_bytes),
        'xla_flops_per_device': float(cost.get('flops', float('nan'))),
    }
    report['total_bytes'] = (report['argument_bytes'] + report['output_bytes']
                             - report['alias_bytes'] + report['temp_bytes'])
    if jax.process_index() == 0:
        gib = lambda b: f'{b / 2**30:.3f} GiB'   # noqa: E731
        print(f'dry run: {cfg.model.family}, {report["params"]:,} params, mesh {report["mesh"]}, '
              f'compiled in {compile_s:.1f}s\n'
              f'  FLOPs per step (model): {report["flops_per_step"]:.4g}; XLA cost analysis: '
              f'{report["xla_flops_per_device"]:.4g} per device\n'
              f'  memory per device: arguments {gib(report["argument_bytes"])}, outputs '
              f'{gib(report["output_bytes"])} (aliased to donated arguments '
              f'{gib(report["alias_bytes"])}), temporaries {gib(report["temp_bytes"])}; '
              f'total {gib(report["total_bytes"])}', flush=True)
    return report


def _record(cfg, spec: schedules.ScheduleSpec, param_shapes, step: int,
            skipped: int = 0, lineage: list | None = None) -> dict[str, Any]:
    return {'step': step, 'config': cfg.to_dict(), 'schedule': spec.to_dict(),
            'param_shapes': param_shapes, 'skipped_steps': skipped, 'lineage': lineage or []}


def main(argv) -> None:
    from pretrain import logs
    logs.quiet_libraries()   # library chatter off unless --verbosity is raised
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if _CONFIG.value is None or not (_WORKDIR.value or _DRY_RUN.value):
        raise app.UsageError('--config and --workdir are required')
    if _DRY_RUN_DEVICES.value:
        if not _DRY_RUN.value:
            raise app.UsageError('--dry_run_devices needs --dry_run')
        # Before anything initialises a backend; afterwards the device count is fixed.
        jax.config.update('jax_platforms', 'cpu')
        jax.config.update('jax_num_cpu_devices', _DRY_RUN_DEVICES.value)
    try:
        distributed.initialize_from_flags()
    except distributed.DistributedError as e:
        raise SystemExit(f'distributed error: {e}') from None
    with distributed.fail_fast():   # a crash in one process must not leave the others waiting
        try:
            result = run(_CONFIG.value, _WORKDIR.value or '', dry_run=_DRY_RUN.value)
        except ConfigError as e:
            raise SystemExit(f'config error: {e}') from None
        except NonFiniteError as e:
            raise SystemExit(f'stopped: {e}') from None
    if result.get('preempted'):
        raise SystemExit(preemption.EXIT_PREEMPTED)


if __name__ == '__main__':
    app.run(main)
