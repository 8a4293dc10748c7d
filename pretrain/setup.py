"""A run's setup, built once: config -> family, model, parametrization, optimizer, schedule,
mesh, shardings and the jitted steps.

Every entry point (the trainer and its --dry_run, the throughput benchmark, the coordinate
check, tests) builds through `build`, so they cannot drift apart. Nothing here reads data,
touches a workdir or materialises a parameter: the state is abstract until `init_state`.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from pretrain import config as config_lib
from pretrain import mesh as mesh_lib
from pretrain import optim, scaling_rules, schedules
from pretrain import parametrization as parametrization_lib
from pretrain import state as state_lib
from pretrain import step as step_lib
from pretrain.errors import ConfigError
from pretrain.registry import Registry


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted (state, batch) -> (state, metrics) step (donates state), called and lowered
    like a jitted function; the schedule's LR levels go in as inputs (`levels`)."""

    jitted: Any                         # jitted (state, batch, levels)
    levels: dict[str, np.float32]       # schedules.peak_inputs of the run's schedule

    def __call__(self, state, batch):
        return self.jitted(state, batch, self.levels)

    def lower(self, state, batch) -> '_Lowered':
        return _Lowered(self.jitted.lower(state, batch, self.levels), self.levels)


@dataclasses.dataclass(frozen=True)
class _Lowered:
    lowered: Any
    levels: dict[str, np.float32]

    def compile(self) -> '_Compiled':
        return _Compiled(self.lowered.compile(), self.levels)

    def __getattr__(self, name):   # as_text, cost_analysis, ...
        return getattr(self.lowered, name)


@dataclasses.dataclass(frozen=True)
class _Compiled:
    compiled: Any
    levels: dict[str, np.float32]

    def __call__(self, state, batch):
        return self.compiled(state, batch, self.levels)

    def __getattr__(self, name):   # memory_analysis, cost_analysis, as_text, ...
        return getattr(self.compiled, name)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run needs before its first batch; trace and run its steps inside `activate()`."""

    cfg: ml_collections.ConfigDict      # finalized, with the scaling rule's values applied
    family: Any                         # the model_zoo Family that cfg.model.family names
    model_def: state_lib.ModelDef
    parametrization: parametrization_lib.Parametrization
    optimizer: optax.GradientTransformation
    schedule_spec: schedules.ScheduleSpec
    schedule: optax.Schedule
    mesh: Mesh
    rules: mesh_lib.Rules
    axes: dict[str, int]                # mesh axis sizes (ici x dcn)
    abstract_state: state_lib.TrainState
    state_shardings: state_lib.TrainState
    batch_sharding: NamedSharding
    train_step: TrainStep               # (state, batch) -> (state, metrics); donates state
    param_count: int
    tokens_per_step: int
    flops_per_step: float
    scaling: dict[str, Any] | None      # {'overrides', 'explanation'} when a scaling rule ran

    def activate(self):
        """The mesh and logical-axis rules the steps are traced under (a context manager)."""
        return mesh_lib.activate(self.mesh, self.rules)

    @property
    def param_shapes(self) -> dict[str, list[int]]:
        """'path/to/param' -> shape, as checkpoint records keep them."""
        flat = jax.tree_util.tree_flatten_with_path(self.model_def.shapes)[0]
        return {'/'.join(str(getattr(k, 'key', k)) for k in path): list(leaf.shape)
                for path, leaf in flat}

    def init_state(self, seed: int | None = None) -> state_lib.TrainState:
        """A fresh sharded state (each device materialises only its shard)."""
        init = state_lib.init_fn(self.family.build, self.cfg, self.optimizer,
                                 self.parametrization, self.model_def)
        key = jax.random.PRNGKey(self.cfg.seed if seed is None else seed)
        return jax.jit(init, out_shardings=self.state_shardings)(key)

    def restore_target(self) -> state_lib.TrainState:
        """The abstract state carrying its shardings: what a checkpoint restores onto."""
        return state_lib.abstract_with_shardings(self.abstract_state, self.state_shardings)

    def eval_step(self, byte_lengths: jax.Array | None = None):
        """Jitted (params, batch) -> summed metrics; `byte_lengths` adds bytes for bits/byte."""
        return jax.jit(step_lib.make_eval_step(self.family.loss, self.model_def, byte_lengths),
                       in_shardings=(self.state_shardings.params, self.batch_sharding))

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a batch -> the global, sharded batch."""
        rows = self.cfg.train.global_batch_size
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (rows, *v.shape[1:]))
                for k, v in local.items()}

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch as shapes with shardings (for compiling without data)."""
        rows = self.cfg.train.global_batch_size
        if self.family.example_spec is not None:
            return {k: jax.ShapeDtypeStruct((rows, *s.shape), s.dtype, sharding=self.batch_sharding)
                    for k, s in self.family.example_spec(self.cfg).items()}
        if self.family.data != 'text':
            raise ConfigError(f'model.family={self.cfg.model.family!r} has no example_spec, so its '
                              f'{self.family.data!r} batch cannot be described without data')
        shape = (rows, self.cfg.data.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
                for k in ('inputs', 'targets')}


def batch_axes(family: Any) -> tuple[str, ...]:
    """Logical axes of a batch: text shards (batch, sequence); other batches hold arrays of
    several ranks (labels [B], images [B, H, W, C]) and shard only their batch axis."""
    return step_lib.BATCH_AXES if family.data == 'text' else step_lib.BATCH_AXES[:1]


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None, *,
          families: Registry, check_data: bool = True) -> Setup:
    """Validates `config` for `devices` (default: all), applies its scaling rule and builds the
    setup. `families` is the model family registry (model_zoo.FAMILIES), looked up by the
    entry point. check_data=False (dry runs) skips the checks of data folders and files.
    Raises ConfigError before any compute."""
    devices = list(devices or jax.devices())
    # The hosts that hold the devices: this job's processes, or an abstract topology's hosts.
    layout = dict(num_devices=len(devices), num_granules=mesh_lib.num_granules(devices),
                  process_count=max(jax.process_count(), len({d.process_index for d in devices})),
                  check_data=check_data)
    cfg = config_lib.finalize(config)
    family = families.get(cfg.model.family, 'model.family')
    axes = config_lib.validate(cfg, family, **layout)
    parametrization = parametrization_lib.from_config(cfg)
    definition = state_lib.model_def(family.build, cfg, parametrization)
    scaling = None
    if cfg.scaling.rule != 'none':
        # The rule sets optimizer and batch/step values only, so the model and its
        # parametrization stay as built.
        cfg, scaling = _apply_scaling_rule(config, cfg, family, definition, axes, layout)
    rules = mesh_lib.merge_rules(cfg.mesh.rules)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    spec = schedules.spec_from_config(cfg.schedule, cfg.optim.lr, cfg.train.steps)
    schedule = schedules.make_schedule(spec)

    def step_at_peak(state, batch, levels):
        # The schedule's LR levels are inputs, not constants: runs that differ only in
        # optim.lr (an LR sweep) share one compiled program and its persistent cache entry.
        traced_schedule = schedules.make_schedule(spec, levels)
        tx = optim.make_optimizer(cfg.optim, traced_schedule, definition, parametrization,
                                  peak=levels['peak'])
        rates = optim.applied_rates(cfg.optim, traced_schedule, definition, parametrization,
                                    peak=levels['peak'])
        step = step_lib.make_train_step(family.loss, definition, tx, traced_schedule,
                                        cfg.train.grad_accum_steps, rates,
                                        cfg.train.nonfinite_policy == 'skip')
        return step(state, batch)

    with mesh_lib.activate(mesh, rules):
        optimizer = optim.make_optimizer(cfg.optim, schedule, definition, parametrization)
        init = state_lib.init_fn(family.build, cfg, optimizer, parametrization, definition)
        # An abstract key: a concrete one would be placed on the mesh, and the devices of a
        # TPU topology compiled for ahead of time cannot hold data.
        abstract = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
        shardings = state_lib.state_shardings(definition, mesh, rules, abstract)
        batch_sharding = mesh_lib.named_sharding(mesh, batch_axes(family))
        replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
        train_step = TrainStep(
            jax.jit(step_at_peak, in_shardings=(shardings, batch_sharding, replicated),
                    out_shardings=(shardings, None), donate_argnums=(0,)),
            schedules.peak_inputs(spec))
    batch = cfg.train.global_batch_size
    return Setup(
        cfg=cfg, family=family, model_def=definition, parametrization=parametrization,
        optimizer=optimizer,
        schedule_spec=spec, schedule=schedule, mesh=mesh, rules=rules, axes=axes,
        abstract_state=abstract, state_shardings=shardings, batch_sharding=batch_sharding,
        train_step=train_step, param_count=state_lib.param_count(definition),
        tokens_per_step=batch * family.tokens_per_example(cfg),
        flops_per_step=batch * family.flops_per_example(cfg), scaling=scaling)


def _apply_scaling_rule(config, cfg, family, definition, axes, layout):
    """(the config with the rule's values, {'overrides', 'explanation'}), validated again.

    The values replace config entries before finalize, so a derived train.steps also sets an
    unset schedule.total_steps.
    """
    non_embedding = state_lib.param_count(definition, exclude_roles=('embedding', 'readout'))
    overrides, explanation = scaling_rules.apply(
        cfg, non_embedding, batch_multiple=axes['data'] * axes['fsdp'] * cfg.train.grad_accum_steps)
    cfg = config_lib.finalize(config_lib.with_overrides(config, overrides))
    config_lib.validate(cfg, family, **layout)
    if jax.process_index() == 0:
        logging.info('scaling rule %s:\n%s', cfg.scaling.rule, explanation)
    return cfg, {'overrides': overrides, 'explanation': explanation}
