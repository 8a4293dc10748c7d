"""The interface every model family gives the trainer, and the registry that finds it."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from pretrain.parametrization import Parametrization
from pretrain.registry import Registry

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Family:
    """What the trainer needs from a model family; the trainer never names a family."""

    # (full config, rngs, parametrization) -> model; the parametrization is built once by the
    # trainer's setup and handed to every family that reads its multipliers.
    build: Callable[[Any, nnx.Rngs, Parametrization], nnx.Module]
    loss: Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]
    flops_per_example: Callable[[Any], float]             # training FLOPs (fwd + bwd)
    tokens_per_example: Callable[[Any], int]
    validate: Callable[[Any, dict[str, int]], None]       # (config, mesh axis sizes) -> raise
    data: str = 'text'                                    # which data pipeline it consumes
    # Optional: () -> {section: {key: default}}, the family's own keys under cfg.model (e.g.
    # {'ssm': {...}}); model_zoo.base_config() adds every registered family's sections.
    default_config: Callable[[], dict[str, dict[str, Any]]] | None = None
    # Optional: config -> extra keyword arguments of the data pipeline (VAR stage 2 hands the
    # image pipeline its class count and a frozen numpy batch -> batch encoding there).
    pipeline_options: Callable[[Any], dict[str, Any]] | None = None
    # Optional: config -> {key: ShapeDtypeStruct of one example}, the batch --dry_run compiles
    # with; None means the text batch {'inputs', 'targets'}: int32[seq_len].
    example_spec: Callable[[Any], dict[str, jax.ShapeDtypeStruct]] | None = None
    # Optional: config -> raise, checks of what the family's data needs beyond data.* (VAR
    # stage 2: its stage-1 checkpoint). Run before training; a dry run reads no data, skips it.
    check_data: Callable[[Any], None] | None = None


FAMILIES: Registry[Family] = Registry('model.family')
