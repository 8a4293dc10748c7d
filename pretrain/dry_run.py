"""--dry_run: compile the train step for the configured mesh on abstract inputs and report its
size, FLOPs and per-device memory. Nothing is materialised, no data is read, nothing is written.

On the devices present or simulated CPU devices (--dry_run_devices) the report checks shardings
and shapes; the CPU compiler ignores rematerialisation, so its memory is not what an accelerator
needs. On abstract TPU devices (--dry_run_topology, pretrain/tpu.py) it is the TPU compiler's
own memory analysis, compared with the chip's HBM, plus a roofline estimate.
"""

import time
from typing import Any

import jax

from pretrain import setup as setup_lib
from pretrain import tpu
from pretrain.errors import DoesNotFitError


def report(setup: setup_lib.Setup, topology: str = '', num_slices: int = 1,
           quiet: bool = False) -> dict[str, Any]:
    """Compiles `setup`'s train step; returns (and on process 0 prints, unless quiet) its cost.
    On TPU devices (`topology` names them) it adds 'tpu': HBM fit and a roofline estimate."""
    device = setup.mesh.devices.flat[0]
    # The persistent compilation cache cannot hold a program for abstract TPU devices (it has no
    # client to load it back with): off while compiling one, as it was afterwards.
    cache_was_on = jax.config.jax_enable_compilation_cache
    if device.platform == 'tpu':
        jax.config.update('jax_enable_compilation_cache', False)
    try:
        with setup.activate():
            start = time.perf_counter()
            compiled = setup.train_step.lower(setup.restore_target(), setup.abstract_batch()).compile()
            compile_s = time.perf_counter() - start
    except Exception as e:
        if device.platform == 'tpu' and 'RESOURCE_EXHAUSTED' in str(e):
            raise _does_not_fit(setup, topology or device.device_kind, str(e)) from None
        raise
    finally:
        jax.config.update('jax_enable_compilation_cache', cache_was_on)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    result = {
        'params': setup.param_count,
        'flops_per_step': float(setup.flops_per_step),
        'mesh': dict(setup.mesh.shape),
        'compile_s': compile_s,
        # Per device: the SPMD program is the same on every device.
        'argument_bytes': int(memory.argument_size_in_bytes),
        'output_bytes': int(memory.output_size_in_bytes),
        'alias_bytes': int(memory.alias_size_in_bytes),   # outputs written over donated inputs
        'temp_bytes': int(memory.temp_size_in_bytes),
        'xla_flops_per_device': float(cost.get('flops', float('nan'))),
        'xla_bytes_accessed_per_device': float(cost.get('bytes accessed', float('nan'))),
        # XLA's cost analysis counts a loop's body once, so with micro-batches (a scan) its
        # FLOPs and bytes cover one micro-batch; the estimate scales them by this.
        'grad_accum_steps': int(setup.cfg.train.grad_accum_steps),
    }
    result['total_bytes'] = (result['argument_bytes'] + result['output_bytes']
                             - result['alias_bytes'] + result['temp_bytes'])
    if device.platform == 'tpu':
        result['tpu'] = tpu.estimate(result, tpu.chip_of(device), setup.mesh.devices.size)
    if jax.process_index() == 0 and not quiet:
        text = describe(setup.cfg.model.family, result)
        if 'tpu' in result:
            text += '\n' + tpu.describe(result['tpu'], topology or device.device_kind, num_slices)
        print(text, flush=True)
    return result


def describe(family_name: str, result: dict[str, Any]) -> str:
    def gib(size: int) -> str:
        return f'{size / 2**30:.3f} GiB'

    accum = result.get('grad_accum_steps', 1)
    per_loop = (f' (one of the {accum} micro-batches: XLA counts a loop body once)'
                if accum > 1 else '')
    return (f'dry run: {family_name}, {result["params"]:,} params, mesh {result["mesh"]}, '
            f'compiled in {result["compile_s"]:.1f}s\n'
            f'  FLOPs per step (model): {result["flops_per_step"]:.4g}; XLA cost analysis: '
            f'{result["xla_flops_per_device"]:.4g} per device'
            f'{per_loop}\n'
            f'  memory per device: arguments {gib(result["argument_bytes"])}, outputs '
            f'{gib(result["output_bytes"])} (aliased to donated arguments '
            f'{gib(result["alias_bytes"])}), temporaries {gib(result["temp_bytes"])}; '
            f'total {gib(result["total_bytes"])}')


def _does_not_fit(setup: setup_lib.Setup, where: str, error: str) -> DoesNotFitError:
    """The TPU compiler's out-of-memory refusal as an answer: what was tried and what to try."""
    line = error.splitlines()[0].strip()
    cfg = setup.cfg
    return DoesNotFitError(
        f'the train step does not fit {where}: {line} (model.remat={cfg.model.remat!r}, '
        f'train.grad_accum_steps={cfg.train.grad_accum_steps}, mesh {dict(setup.mesh.shape)}). '
        f'python -m pretrain.tpu_fit --config=CONFIG --topology={where} tries the remat policies '
        'and micro-batch counts.', compiler_message=line)
