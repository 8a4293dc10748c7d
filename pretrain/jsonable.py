"""One JSON-safe form for every file the project writes (metrics, results, fits, experiments)."""

import math
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars and arrays as Python ones and NaN/inf as 'nan'/'inf'/'-inf'.

    JSON has no NaN or Infinity; strings keep "the loss diverged" visible to any strict JSON
    reader (null would hide which), and `pretrain.metrics.read_metrics` turns them back into
    floats. Mappings get string keys; tuples become lists.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isfinite(value):
            return value
        return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
    return value
