"""The interface every model family gives the trainer, and the registry that finds it."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from pretrain.registry import Registry

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Family:
    """What the trainer needs from a model family; the trainer never names a family."""

    build: Callable[[Any, nnx.Rngs], nnx.Module]          # (full config, rngs) -> model
    loss: Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]
    flops_per_example: Callable[[Any], float]             # training FLOPs (fwd + bwd)
    tokens_per_example: Callable[[Any], int]
    validate: Callable[[Any, dict[str, int]], None]       # (config, mesh axis sizes) -> raise
    data: str = 'text'                                    # which data pipeline it consumes
    # Optional: config -> a frozen numpy batch -> batch function the data pipeline runs on
    # every local batch (VAR stage 2 encodes images with its frozen tokenizer there).
    prepare: Callable[[Any], Callable[[dict], dict]] | None = None
    # Optional: config -> {key: ShapeDtypeStruct of one example}, the batch --dry_run compiles
    # with; None means the text batch {'inputs', 'targets'}: int32[seq_len].
    example_spec: Callable[[Any], dict[str, jax.ShapeDtypeStruct]] | None = None


FAMILIES: Registry[Family] = Registry('model.family')
