"""TPU topologies without a TPU: abstract devices for ahead-of-time compilation, chip facts, and a
roofline estimate of a compiled step.

With libtpu installed (`pip install -e '.[tpu]'`), JAX describes any TPU slice on any machine
(`jax.experimental.topologies.get_topology_desc`), and `jit(...).lower(...).compile()` on a mesh of
those devices runs the real TPU compiler: its memory analysis is the HBM the step needs on each
chip, with rematerialisation and fusion applied (the CPU compiler of --dry_run_devices ignores
remat). Nothing here runs a computation.

Topology names are CHIP:AxB[xC] with CHIP one of CHIPS (the chip grid, as in a TPU VM's
accelerator topology): v4:2x2x2, v5e:16x16, v5p:4x4x4, v6e:8x8. v4 and v5p are described in
megacore mode (one JAX device per chip, as they run).
"""

import dataclasses
import importlib.metadata
import math
import os
import re
from typing import Any

import jax

from pretrain import peak_flops as peak_flops_lib
from pretrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (Google Cloud TPU system-architecture pages)."""

    name: str
    hbm_bytes: int          # HBM capacity
    hbm_bytes_per_s: float  # HBM bandwidth
    chip_config: str        # get_topology_desc's chip_config_name
    device_kind: str        # what JAX devices of this chip report (peak_flops looks it up)
    accelerator_type: str   # a one-host slice of this chip, as a TPU VM names it

    @property
    def peak_flops(self) -> float:
        """Dense bfloat16 peak FLOP/s (pretrain.peak_flops's table)."""
        return peak_flops_lib.PEAK_FLOPS[self.device_kind.lower()]['bfloat16']


GIB = 2 ** 30
CHIPS = {
    'v4': Chip('v4', 32 * GIB, 1200e9, 'megacore', 'TPU v4', 'v4-8'),
    'v5e': Chip('v5e', 16 * GIB, 819e9, 'default', 'TPU v5 lite', 'v5litepod-4'),
    'v5p': Chip('v5p', 95 * GIB, 2765e9, 'megacore', 'TPU v5', 'v5p-8'),
    'v6e': Chip('v6e', 32 * GIB, 1640e9, 'default', 'TPU v6 lite', 'v6e-4'),
}
_TOPOLOGY = re.compile(r'^(?P<chip>[a-z0-9]+):(?P<grid>\d+(x\d+){1,2})$')


class TopologyError(ConfigError):
    """A topology that cannot be described here (bad name, libtpu missing or mismatched)."""


def parse(name: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5e:4x4' -> (the v5e Chip, (4, 4)); a clear error for anything else."""
    match = _TOPOLOGY.match(name)
    if not match or match['chip'] not in CHIPS:
        raise TopologyError(f'--dry_run_topology={name!r}: expected CHIP:AxB[xC] with CHIP one of '
                            f'{sorted(CHIPS)}, e.g. v5e:4x4, v4:2x2x2, v5p:4x4x4, v6e:8x8')
    grid = tuple(int(n) for n in match['grid'].split('x'))
    if min(grid) < 1:
        raise TopologyError(f'--dry_run_topology={name!r}: every grid size must be >= 1')
    return CHIPS[match['chip']], grid


def libtpu_requirement() -> str | None:
    """The libtpu version specifier that the installed jax's [tpu] extra asks for, if any."""
    for requirement in importlib.metadata.requires('jax') or []:
        if requirement.startswith('libtpu') and 'extra == "tpu"' in requirement:
            return requirement.split(';')[0].strip()
    return None


def check_libtpu() -> str:
    """The installed libtpu version; TopologyError when it is missing or not the one jax expects."""
    try:
        version = importlib.metadata.version('libtpu')
    except importlib.metadata.PackageNotFoundError:
        raise TopologyError(
            "compiling for a TPU topology needs libtpu, which is not installed: "
            "pip install -e '.[tpu]' (about 700 MB; it brings the libtpu that matches "
            f"jax {jax.__version__})") from None
    wanted = libtpu_requirement()
    if wanted:
        pinned = re.match(r'libtpu\s*==\s*([0-9.]+)(\.\*)?$', wanted)
        if pinned and not (version == pinned[1] or (pinned[2] and version.startswith(pinned[1] + '.'))):
            raise TopologyError(f'libtpu {version} is installed but jax {jax.__version__} expects '
                                f'{wanted}: pip install -e \'.[tpu]\' installs the matching one')
    return version


def devices(name: str, num_slices: int = 1) -> list[jax.Device]:
    """The abstract devices of `num_slices` slices of topology `name` (for compiling only)."""
    chip, _ = parse(name)
    if num_slices < 1:
        raise TopologyError(f'--dry_run_slices={num_slices} must be >= 1')
    check_libtpu()
    # Off a TPU VM libtpu cannot look up the host it runs on and says so at length; these are
    # read only by its runtime, which compiling does not use.
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', chip.accelerator_type)
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    # libtpu admits one process per machine unless told otherwise; compiling needs no chip, so
    # several dry runs (or a dry run beside training on a TPU VM) may load it at once.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    from jax.experimental import topologies   # only here: it is experimental API
    try:
        topology = topologies.get_topology_desc(topology_name=name, platform='tpu',
                                                chip_config_name=chip.chip_config,
                                                num_slices=num_slices)
    except Exception as e:   # libtpu's own message says what it could not build
        raise TopologyError(f'--dry_run_topology={name!r}: libtpu could not describe it: '
                            f'{str(e).splitlines()[0]}') from None
    return list(topology.devices)


def chip_of(device: jax.Device) -> Chip:
    kind = device.device_kind.lower()
    for chip in CHIPS.values():
        if chip.device_kind.lower() == kind:
            return chip
    raise TopologyError(f'no chip facts for device kind {device.device_kind!r}')


def estimate(result: dict[str, Any], chip: Chip, num_devices: int) -> dict[str, Any]:
    """A roofline estimate of one step from a compiled step's per-device cost: the larger of
    compute time (the larger of XLA's and the model's FLOPs / peak) and HBM time (XLA bytes accessed / bandwidth). Collectives,
    host input and overlap are not modelled, so this is an upper bound on speed."""
    model_flops = result['flops_per_step'] / num_devices
    # XLA's cost analysis counts a while loop's body once, and micro-batches are a scan: the
    # counts cover one micro-batch's forward and backward (its parameter gathers included) plus
    # the update once. Scaling all of it by the trip count overcounts only the update, which
    # moves a few bytes per parameter against the activations' gigabytes.
    loops = result.get('grad_accum_steps', 1)
    # XLA's cost analysis does not see inside custom calls (the Pallas splash kernel), so its
    # count can fall below the model's own FLOPs; the step does at least the model's FLOPs.
    flops = max(result['xla_flops_per_device'] * loops, model_flops)
    accessed = result['xla_bytes_accessed_per_device'] * loops
    compute_s = flops / chip.peak_flops
    memory_s = accessed / chip.hbm_bytes_per_s
    step_s = max(compute_s, memory_s)
    return {
        'chip': chip.name, 'hbm_bytes': chip.hbm_bytes, 'peak_flops': chip.peak_flops,
        'hbm_bytes_per_s': chip.hbm_bytes_per_s,
        'used_bytes': result['total_bytes'],
        'fits': result['total_bytes'] <= chip.hbm_bytes,
        'headroom_bytes': chip.hbm_bytes - result['total_bytes'],
        'compute_s': compute_s, 'hbm_s': memory_s, 'step_s': step_s,
        'bound': 'compute' if compute_s >= memory_s else 'memory',
        'mfu': model_flops / (step_s * chip.peak_flops) if step_s > 0 else math.nan,
    }


def describe(estimate_: dict[str, Any], topology: str, num_slices: int) -> str:
    total = estimate_['used_bytes']
    verdict = ('fits' if estimate_['fits']
               else f'DOES NOT FIT: over by {-estimate_["headroom_bytes"] / GIB:.2f} GiB')
    slices = f' x {num_slices} slices' if num_slices > 1 else ''
    return (f'  TPU {topology}{slices}: {total / GIB:.2f} GiB of {estimate_["hbm_bytes"] / GIB:.0f} GiB '
            f'HBM per chip: {verdict}\n'
            f'  roofline estimate (not a measurement; collectives not modelled): step '
            f'{estimate_["step_s"] * 1e3:.1f} ms ({estimate_["bound"]}-bound: compute '
            f'{estimate_["compute_s"] * 1e3:.1f} ms, HBM {estimate_["hbm_s"] * 1e3:.1f} ms), '
            f'MFU {100 * estimate_["mfu"]:.1f}%')
