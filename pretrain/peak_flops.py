"""Peak FLOP/s of the devices a run uses, and MFU against it.

Accelerators: a table of published dense peaks by device kind and compute dtype. CPU: a matmul
measured once per CPU model and dtype and cached in a small JSON file (measured at every start it
swung 4x with the machine's load). `metrics.peak_flops_per_device` overrides both.
"""

import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak FLOP/s per *JAX device* by compute dtype, keyed by a lowercase
# substring of `device.device_kind`. Lookup takes the first key found in the kind, so a key that
# is a substring of another (e.g. 'tpu v5' of 'tpu v5 lite', 'a10' of 'a100', 'l4' of 'l40s')
# must come after it.
#
# 'float32' is the peak of the unit float32 matmuls run on under JAX's default precision:
# on TPU one bfloat16 pass of the MXU (so the bfloat16 peak), on NVIDIA Ampere and later the
# TF32 tensor cores. Entries without a 'float32' value fall back to 'bfloat16' (and say so).
#
# Sources. TPU: Google Cloud TPU system-architecture pages, "peak compute per chip (bf16)":
# v4 275, v5e 197 (cloud.google.com/tpu/docs/v5e), v5p 459 (/v5p), v6e 918 TFLOP/s (/v6e).
# NVIDIA datasheets quote tensor peaks with 2:4 sparsity; halved here. A100 SXM/PCIe: BF16 312,
# TF32 156 (A100 datasheet). H100 SXM: BF16 1,979 and TF32 989 sparse -> 989 / 495 (H100
# datasheet); H200 SXM has the same GH100 tensor cores and clocks. B200 (HGX, 1,000 W): BF16
# 4.5 and TF32 2.2 PFLOP/s sparse per GPU -> 2.25e15 / 1.1e15 (HGX B200 datasheet).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # v2 and v3 expose each of the chip's two TensorCores as a JAX device, so per device is half
    # the per-chip number; v4 and later are one device per chip.
    'tpu v6 lite': {'bfloat16': 918e12, 'float32': 918e12},   # v6e / Trillium
    'tpu v6e': {'bfloat16': 918e12, 'float32': 918e12},
    'tpu v5 lite': {'bfloat16': 197e12, 'float32': 197e12},   # v5e
    'tpu v5e': {'bfloat16': 197e12, 'float32': 197e12},
    'tpu v5p': {'bfloat16': 459e12, 'float32': 459e12},
    'tpu v5': {'bfloat16': 459e12, 'float32': 459e12},        # v5p reports its kind as 'TPU v5'
    'tpu v4': {'bfloat16': 275e12, 'float32': 275e12},
    'tpu v3': {'bfloat16': 61.5e12, 'float32': 61.5e12},      # 123 TFLOP/s per chip, 2 cores
    'tpu v2': {'bfloat16': 22.5e12, 'float32': 22.5e12},      # 45 TFLOP/s per chip, 2 cores
    'gb200': {'bfloat16': 2.5e15, 'float32': 1.25e15},        # per Blackwell GPU of a GB200
    'b200': {'bfloat16': 2.25e15, 'float32': 1.1e15},
    'b100': {'bfloat16': 1.75e15},
    'gh200': {'bfloat16': 989e12, 'float32': 495e12},         # Hopper GPU of Grace Hopper
    'h200': {'bfloat16': 989e12, 'float32': 495e12},
    'h100 pcie': {'bfloat16': 756e12, 'float32': 378e12},
    'h100 nvl': {'bfloat16': 835e12},                         # 1,671 sparse per GPU
    'h100': {'bfloat16': 989e12, 'float32': 495e12},          # SXM ('NVIDIA H100 80GB HBM3')
    'h800': {'bfloat16': 989e12, 'float32': 495e12},
    'a100': {'bfloat16': 312e12, 'float32': 156e12},          # SXM and PCIe
    'a800': {'bfloat16': 312e12, 'float32': 156e12},
    'l40s': {'bfloat16': 362e12},                             # 733 sparse
    'l40': {'bfloat16': 181e12},
    'nvidia l4': {'bfloat16': 121e12},                        # 242 sparse
    'a10g': {'bfloat16': 125e12},        # AWS's A10 variant: A10 datasheet (AWS publishes none)
    'nvidia a10': {'bfloat16': 125e12},
    'a6000': {'bfloat16': 154.8e12},                          # RTX A6000, 309.7 sparse
    'v100s': {'bfloat16': 130e12},       # Volta has no bf16 tensor cores: fp16 tensor peak
    'v100-pcie': {'bfloat16': 112e12},
    'v100': {'bfloat16': 125e12},                             # SXM2
    't4': {'bfloat16': 65e12},                                # fp16 tensor peak, no bf16
    # AMD (Instinct datasheets).
    'mi300x': {'bfloat16': 1307.4e12},
    'mi325x': {'bfloat16': 1307.4e12},
}
DTYPE_NAMES = ('bfloat16', 'float32')


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in DTYPE_NAMES:
        raise ValueError(f'no peak FLOP/s for dtype {name!r}; known: {DTYPE_NAMES}')
    return name


def lookup_peak_flops(device_kind: str, dtype: Any = 'bfloat16') -> tuple[float, str] | None:
    """The table's peak for `device_kind` and `dtype` as (flops, 'key dtype'); None if unknown."""
    kind, name = device_kind.lower(), _dtype_name(dtype)
    for key, peaks in PEAK_FLOPS.items():
        if key in kind:
            if name in peaks:
                return peaks[name], f'{key} {name}'
            return peaks['bfloat16'], f'{key} bfloat16 (no {name} entry)'
    return None


def measure_matmul_flops(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 5,
                         device: jax.Device | None = None) -> float:
    """Best FLOP/s of a jitted n×n matmul on one device (default: the first device)."""
    device = device or jax.devices()[0]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(kb, (n, n), dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()   # compile and warm caches outside the timed runs
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / max(best, 1e-12)


# --- Measured CPU peak, cached ------------------------------------------------------------
# A matmul timed at every start-up swings with the machine's load (2.2e10 to 8.2e10 FLOP/s
# between runs on one 2-core host), and MFU with it. So a CPU is measured once, on its first
# run, and the number is kept in a small JSON file keyed by CPU model, core count and dtype.

PEAK_CACHE_ENV = 'PRETRAIN_PEAK_FLOPS_CACHE'   # path of the JSON file, overriding the default


def peak_cache_path() -> str:
    """$PRETRAIN_PEAK_FLOPS_CACHE, else <user cache dir>/pretrain/peak_flops.json."""
    override = os.environ.get(PEAK_CACHE_ENV)
    if override:
        return override
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'pretrain', 'peak_flops.json')


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.lower().startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown cpu'


def _cache_key(dtype_name: str) -> str:
    return f'{cpu_model()} | {os.cpu_count()} cores | {dtype_name}'


def _read_cache(path: str) -> dict[str, float]:
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}   # absent or unreadable: measure again and rewrite it
    return data if isinstance(data, dict) else {}


def cached_cpu_peak(dtype: Any = jnp.float32,
                    measure: Callable[[Any], float] | None = None) -> tuple[float, str]:
    """This CPU's matmul peak for `dtype`, measured on the first call ever and then read back.

    Returns (flops, where from). `measure(dtype)` times the matmul (default: the best of 10
    2048×2048 matmuls on the first CPU device); a cache that cannot be written only costs a
    new measurement next time.
    """
    name = _dtype_name(dtype)
    path, key = peak_cache_path(), _cache_key(name)
    cache = _read_cache(path)
    value = cache.get(key)
    if isinstance(value, (int, float)) and value > 0:
        return float(value), f'measured {name} matmul, cached in {path}'
    if measure is None:
        measure = lambda d: measure_matmul_flops(dtype=d, repeats=10,   # noqa: E731
                                                 device=jax.devices('cpu')[0])
    flops = float(measure(jnp.dtype(name)))
    cache[key] = flops
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f'{path}.{os.getpid()}.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)   # atomic: a concurrent reader sees the old or the new file
        where = f'measured {name} matmul, saved to {path}'
    except OSError as e:
        where = f'measured {name} matmul (not cached: {e.strerror})'
    return flops, where


@functools.cache
def _measured_peak(platform_name: str, device_kind: str, dtype_name: str) -> float:
    # An unknown accelerator: measured once per process and kind (not cached on disk: the
    # table is the place for accelerators).
    device = next(d for d in jax.devices(platform_name) if d.device_kind == device_kind)
    return measure_matmul_flops(dtype=dtype_name, device=device)


def _default_dtype(device: jax.Device) -> str:
    # CPUs run bf16 matmuls slowly (no native support), so CPU runs are usually float32.
    return 'float32' if device.platform == 'cpu' else 'bfloat16'


def peak_flops(device: jax.Device, override: float = 0.0,
               dtype: Any = None) -> tuple[float, str]:
    """Peak FLOP/s of one device for `dtype` (the model's compute dtype) and its source.

    dtype None: bfloat16 on accelerators, float32 on CPU.
    """
    if override > 0:
        return float(override), 'config metrics.peak_flops_per_device'
    name = _dtype_name(dtype) if dtype is not None else _default_dtype(device)
    if device.platform == 'cpu':
        return cached_cpu_peak(name)
    found = lookup_peak_flops(device.device_kind, name)
    if found is not None:
        return found[0], f'published peak: {found[1]}'
    flops = _measured_peak(device.platform, device.device_kind, name)
    # A measured matmul is below the datasheet peak, so MFU here reads high.
    return flops, f'measured {name} matmul (unknown accelerator {device.device_kind!r})'


def total_peak_flops(devices: Sequence[jax.Device], override: float = 0.0,
                     dtype: Any = None) -> tuple[float, str]:
    """Peak FLOP/s of all `devices` together and where the number came from."""
    if not devices:
        raise ValueError('total_peak_flops needs at least one device.')
    per_device, source = peak_flops(devices[0], override, dtype)
    if devices[0].platform == 'cpu' and override <= 0:
        # Simulated CPU devices (--xla_force_host_platform_device_count) all run on the same
        # physical cores, and XLA's CPU matmul already uses every core, so the single-device
        # measurement is the whole host's peak; multiplying by the device count would
        # understate MFU by that factor.
        return per_device, source
    return per_device * len(devices), f'{source}, x{len(devices)} devices'


def mfu(flops_per_s: float, peak_total: float) -> float:
    """Model FLOPs utilization as a fraction; 0 when the peak is unknown."""
    return flops_per_s / peak_total if peak_total > 0 else 0.0
