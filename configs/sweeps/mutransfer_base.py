"""Step 1 of µTransfer: tune the base model (width 32, 2 layers) once, by random search.

    python -m pretrain.sweep --sweep=configs/sweeps/mutransfer_base.py \
        --workdir=docs/mutransfer/base_sweep --parallel=2
    python -m pretrain.study.transfer --sweep_dir=docs/mutransfer/base_sweep \
        --choose_base=configs/sweeps/mutransfer_tuned.py

64 draws (one seed each) over the peak LR (half-octave grid), the embedding and readout
multipliers (octave grids), the init std, and zero-init of the query projection and of the
readout, with the protocol of mutransfer_common.py. The second command writes the best draw to
configs/sweeps/mutransfer_tuned.py, which the width and depth sweeps import.
"""

import numpy as np

from configs.sweeps import mutransfer_common as common
from pretrain.study.sweep import Sweep

DRAWS = 64
SPACE = {
    'optim.lr': [2.0 ** (k / 2) for k in range(-18, -7)],
    'parametrization.output_mult': [2.0 ** k for k in range(-2, 5)],
    'parametrization.input_mult': [2.0 ** k for k in range(-2, 5)],
    'model.init_std': [0.005, 0.01, 0.02, 0.04, 0.08],
    'parametrization.zero_query': [False, True],
    'parametrization.zero_readout': [False, True],
}


def draws(count: int = DRAWS, seed: int = 0) -> list[dict]:
    """`count` distinct points, the same on every call (names must not change between sessions)."""
    rng = np.random.default_rng(seed)
    points: list[dict] = []
    while len(points) < count:
        point = {k: values[int(rng.integers(len(values)))] for k, values in SPACE.items()}
        if point not in points:
            points.append(point)
    return points


def get_sweep() -> Sweep:
    return Sweep(base='configs/lm_tiny.py', points=draws(),
                 fixed={**common.fixed(), 'parametrization.name': 'mup'}, derive=common.shape)
