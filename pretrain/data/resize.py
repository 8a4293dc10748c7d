"""Exact separable image resizing: PyTorch's `area` and `bicubic` modes as matrices.

`jax.image.resize` uses other kernels (Keys a=-0.5, antialiasing), so VAR's quantizer and
transformer inputs would not match the published algorithm with it. Both modes here are
separable: resizing [H, W] to [h, w] is R_h @ x @ R_w^T with one small matrix per axis.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MODES = ('area', 'bicubic')
_CUBIC_A = -0.75   # PyTorch's bicubic coefficient


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: output i averages inputs [floor(i n_in / n_out), ceil((i+1) n_in / n_out))."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)   # ceil without floats
        m[i, start:end] = 1.0 / (end - start)
    return m


def _cubic(x: float) -> float:
    x = abs(x)
    a = _CUBIC_A
    if x <= 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: align_corners=False cubic convolution; taps past an edge repeat the edge."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5   # not clamped for cubic, unlike linear modes
        x0 = math.floor(src)
        t = src - x0
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), n_in - 1)] += _cubic(t - k)
    return m


def matrix(mode: str, n_in: int, n_out: int) -> np.ndarray:
    if mode not in MODES:
        raise ValueError(f'resize mode {mode!r}; known: {MODES}')
    return area_matrix(n_in, n_out) if mode == 'area' else bicubic_matrix(n_in, n_out)


def resize(x_BHWC: jax.Array, size: int | tuple[int, int], mode: str) -> jax.Array:
    """Resizes the two spatial axes of a channels-last batch; identity when the size is equal."""
    h, w = (size, size) if isinstance(size, int) else size
    H, W = x_BHWC.shape[1:3]
    if (h, w) == (H, W):
        return x_BHWC
    rh_hH = jnp.asarray(matrix(mode, H, h), x_BHWC.dtype)
    rw_wW = jnp.asarray(matrix(mode, W, w), x_BHWC.dtype)
    # HIGHEST: on accelerators the default matmul precision would round the weights.
    return jnp.einsum('hH,bHWc,wW->bhwc', rh_hH, x_BHWC, rw_wW,
                      precision=jax.lax.Precision.HIGHEST)
