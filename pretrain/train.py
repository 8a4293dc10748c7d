"""Entry point: flags -> config -> distributed init -> run(): plan -> start -> loop -> result.

    python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/tiny \
        --config.train.steps=100

Restarting the same command on the same workdir resumes from its latest checkpoint.
--dry_run compiles the step for the configured mesh and prints its size, FLOPs and memory.

Exit codes: 0 finished; 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGINT after saving a checkpoint at
the current step, so restarting resumes there; 1 config error or non-finite loss/gradients
(train.nonfinite_policy='stop'; the message names the step and the last good checkpoint).
"""

if __name__ == '__main__':   # first: SIGTERM/SIGINT while importing or parsing must not kill
    from pretrain import startup_signals
    startup_signals.install()

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from model_zoo import FAMILIES   # this entry point hands the family registry to the setup
from pretrain import checkpoint as checkpoint_lib
from pretrain import cli_errors
from pretrain import config as config_lib
from pretrain import data as data_lib
from pretrain import distributed, preemption
from pretrain import dry_run as dry_run_lib
from pretrain import logs
from pretrain import loop as loop_lib
from pretrain import metrics as metrics_lib
from pretrain import peak_flops as peak_flops_lib
from pretrain import schedules
from pretrain import setup as setup_lib
from pretrain import start as start_lib
from pretrain import tpu as tpu_lib
from pretrain.errors import CheckpointError, ConfigError, DoesNotFitError, NonFiniteError
from pretrain.registry import Registry

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: config, metrics, checkpoints.')
# The multi-process flags (--distributed, --coordinator_address, ...) live in pretrain/distributed.py.
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Compile the train step on abstract inputs, print '
                                'its size, FLOPs and memory, and exit; writes nothing.')
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    'dry_run_devices', 0, 'With --dry_run: compile for this many simulated CPU devices instead of '
    'the devices present, to check a mesh layout for a larger machine (shardings and per-device '
    'memory as the CPU compiler sees them; the CPU compiler ignores remat, so memory is not '
    'what an accelerator needs).')
_DRY_RUN_TOPOLOGY = flags.DEFINE_string(
    'dry_run_topology', '', 'With --dry_run: compile for this TPU topology (e.g. v5e:4x4, '
    'v4:2x2x2, v5p:4x4x4, v6e:8x8) with the TPU compiler, on any machine with libtpu installed '
    "(pip install -e '.[tpu]'); prints per-chip HBM against capacity and a roofline estimate.")
_DRY_RUN_SLICES = flags.DEFINE_integer(
    'dry_run_slices', 1, 'With --dry_run_topology: this many slices joined over DCN (mesh.dcn '
    'then spreads axes over them).')


def run(config: ml_collections.ConfigDict, workdir: str,
        devices: list[jax.Device] | None = None, dry_run: bool = False, *,
        families: Registry = FAMILIES, topology: str = '', num_slices: int = 1) -> dict[str, Any]:
    """Trains (or resumes) the configured run in `workdir`; returns the logged history.

    'preempted' in the result is True when SIGTERM/SIGINT stopped the run after saving at
    'step'. A workdir whose latest checkpoint is already at train.steps is left as it is: one
    line says so and the result has 'already_finished' True, no history and no 'state'. Raises ConfigError before any compute, and NonFiniteError on a NaN/inf loss or
    gradient with train.nonfinite_policy='stop'. dry_run=True only compiles the step on
    abstract inputs and reports its size and cost (pretrain/dry_run.py); `workdir` is not touched.
    `topology` (with dry_run): compile for the abstract devices of that TPU topology instead.
    """
    if topology:
        devices = tpu_lib.devices(topology, num_slices)
    devices = list(devices or jax.devices())
    setup = setup_lib.build(config, devices, families=families, check_data=not dry_run)  # plan
    if dry_run:
        return dry_run_lib.report(setup, topology, num_slices)
    start = start_lib.plan(setup, workdir, log=absl_logging.warning)   # checked, nothing created
    cfg = setup.cfg
    if start.finished(cfg.train.steps):   # re-run of a finished run: nothing to restore or compile
        if jax.process_index() == 0:
            print(start.finished_line(workdir, cfg.train.steps), flush=True)
        return {'history': [], 'eval': [], 'step': start.resume_step, 'params': setup.param_count,
                'state': None, 'preempted': False, 'skipped': start.skipped_steps,
                'already_finished': True}
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            f.write(config_lib.to_json(cfg, **({'scaling_applied': setup.scaling} if setup.scaling else {})))
    checkpointer = start.open_checkpointer(cfg.checkpoint)
    pipeline = data_lib.make_pipeline(
        cfg, setup.family, global_batch_size=cfg.train.global_batch_size,
        num_eval_batches=cfg.train.eval_batches, seed=cfg.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = pipeline.train_iterator()
    # Measured outside the mesh context: a CPU peak is a single-device matmul.
    peak, peak_source = peak_flops_lib.total_peak_flops(devices, cfg.metrics.peak_flops_per_device,
                                                     dtype=cfg.model.compute_dtype)
    with setup.activate():
        started = start.state(setup, checkpointer, data_iter, log=absl_logging.warning)
        # Opened at the step the run continues from: rows logged after it by an earlier attempt
        # (killed before its next checkpoint) are dropped, so every step is logged once.
        writer = metrics_lib.MetricsWriter(workdir, active=jax.process_index() == 0,
                                           total_steps=cfg.train.steps,
                                           tensorboard=cfg.metrics.tensorboard,
                                           resume_step=started.step,
                                           wandb_project=cfg.metrics.wandb_project,
                                           wandb_mode=cfg.metrics.wandb_mode,
                                           run_config=cfg.to_dict())
        if started.note:
            writer.text(started.note)
        byte_lengths = (None if pipeline.tokenizer is None   # bits/byte only for text
                        else jnp.asarray(pipeline.tokenizer.byte_lengths, jnp.float32))
        writer.text(f'{cfg.model.family}: {setup.param_count:,} params, '
                    f'{setup.flops_per_step / setup.tokens_per_step:.3g} FLOPs/token, mesh '
                    f'{dict(setup.mesh.shape)}, {jax.process_count()} process(es), peak {peak:.3g} '
                    f'FLOP/s ({peak_source}); {schedules.describe(setup.schedule_spec)}')
        loop = loop_lib.TrainLoop(setup, started.state, pipeline, data_iter, checkpointer, writer,
                                  eval_step=setup.eval_step(byte_lengths), peak_flops=peak,
                                  skipped_steps=started.skipped_steps, lineage=started.lineage)
        return loop.run()                                                # loop -> result


def main(argv) -> None:
    logs.quiet_libraries()   # library chatter off unless --verbosity is raised
    if len(argv) > 1:
        raise SystemExit(f'usage error: unexpected arguments {argv[1:]} (flags look like --name=value)')
    if _CONFIG.value is None or not (_WORKDIR.value or _DRY_RUN.value):
        raise SystemExit('usage error: --config=FILE and --workdir=DIR are required, e.g. '
                         '--config=configs/lm_tiny.py --workdir=runs/tiny')
    if (_DRY_RUN_DEVICES.value or _DRY_RUN_TOPOLOGY.value) and not _DRY_RUN.value:
        raise SystemExit('usage error: --dry_run_devices and --dry_run_topology need --dry_run')
    if _DRY_RUN_DEVICES.value and _DRY_RUN_TOPOLOGY.value:
        raise SystemExit('usage error: give --dry_run_devices or --dry_run_topology, not both')
    if _DRY_RUN_SLICES.value != 1 and not _DRY_RUN_TOPOLOGY.value:
        raise SystemExit('usage error: --dry_run_slices needs --dry_run_topology')
    if _DRY_RUN_DEVICES.value or _DRY_RUN_TOPOLOGY.value:
        # Before anything initialises a backend; afterwards the device count is fixed. A
        # topology's devices are abstract: the host backend stays the CPU.
        jax.config.update('jax_platforms', 'cpu')
        if _DRY_RUN_DEVICES.value:
            jax.config.update('jax_num_cpu_devices', _DRY_RUN_DEVICES.value)
    # A signal while importing or parsing the config: exit 75 before connecting to other processes.
    preemption.startup_signals.exit_if_received('the run started')
    if _DRY_RUN.value:   # nothing to save: a stop signal during the compile ends it at once
        preemption.startup_signals.act_at_once()
    try:
        if not _DRY_RUN_TOPOLOGY.value:   # compiling for abstract chips joins no job
            distributed.initialize_from_flags()
    except distributed.DistributedError as e:
        raise SystemExit(f'distributed error: {e}') from None
    with distributed.fail_fast():   # a crash in one process must not leave the others waiting
        try:
            if not _DRY_RUN.value:   # a file or a read-only folder: one line, before any compute
                checkpoint_lib.check_writable(_WORKDIR.value)
            result = run(_CONFIG.value, _WORKDIR.value or '', dry_run=_DRY_RUN.value,
                         topology=_DRY_RUN_TOPOLOGY.value, num_slices=_DRY_RUN_SLICES.value)
        except ConfigError as e:
            raise SystemExit(f'config error: {e}') from None
        except NonFiniteError as e:
            raise SystemExit(f'stopped: {e}') from None
        except CheckpointError as e:
            raise SystemExit(f'checkpoint error: {e}') from None
        except DoesNotFitError as e:
            raise SystemExit(f'dry run: {e}') from None
    if result.get('preempted'):
        raise SystemExit(preemption.EXIT_PREEMPTED)


if __name__ == '__main__':
    app.run(main, flags_parser=cli_errors.parse_flags)   # bad flags and config files: one line
