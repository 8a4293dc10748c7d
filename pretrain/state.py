"""Train state and its sharded creation (abstract first; never a full copy on one host)."""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pretrain import mesh as mesh_lib
from pretrain import parametrization as parametrization_lib
from pretrain.parametrization import Parametrization


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32: optimizer updates done
    params: Any              # pure nested dict of arrays
    opt_state: Any
    rng: jax.Array           # uint32[2] raw PRNG key, for stochastic layers and sampling


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What a parameter says about itself: logical axes and muP role (a pytree leaf)."""

    axes: tuple[str | None, ...]
    role: str


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static half of a model: rebuilds the nnx module from a pure params dict."""

    graphdef: Any
    skeleton: Any            # abstract nnx.State with the variables' metadata
    info: Any                # pure dict of ParamInfo, same structure as params
    shapes: Any              # pure dict of jax.ShapeDtypeStruct

    def merge(self, params) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self.skeleton)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def model_def(build, cfg, parametrization: Parametrization) -> ModelDef:
    """Traces the model constructor `build(cfg, rngs, parametrization)` abstractly (no compute,
    no memory)."""
    model = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0), parametrization))
    graphdef, skeleton = nnx.split(model)
    info, shapes = {}, {}
    flat = list(nnx.to_flat_state(skeleton))
    for path, var in flat:
        if not isinstance(var, nnx.Param):
            raise TypeError(f'{"/".join(map(str, path))} is a {type(var).__name__}; the trainer '
                            'expects only nnx.Param state in a model')
        meta = var.get_metadata()
        _set(info, path, ParamInfo(tuple(meta['axes']), meta['role']))
        _set(shapes, path, jax.ShapeDtypeStruct(var.shape, var.dtype))
    return ModelDef(graphdef, skeleton, info, shapes)


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def param_count(definition: ModelDef, exclude_roles: tuple[str, ...] = ()) -> int:
    """Parameters, optionally without some roles (e.g. non-embedding: no embedding/readout)."""
    roles = jax.tree.leaves(jax.tree.map(lambda i: i.role, definition.info))
    return sum(x.size for x, r in zip(jax.tree.leaves(definition.shapes), roles)
               if r not in exclude_roles)


def state_shardings(definition: ModelDef, mesh: Mesh, rules: mesh_lib.Rules,
                    abstract_state: TrainState) -> TrainState:
    """Shardings of every leaf: params by their logical axes; optimizer state by the parameter
    it belongs to (see _opt_leaf_sharding); counters and other scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = jax.tree.map(lambda i: mesh_lib.named_sharding(mesh, i.axes, rules), definition.info)
    # 'blocks', 0, 'attn', 'wq' -> (the parameter's logical axes, its shape)
    by_path = {tuple(k.key for k in path): (info.axes, tuple(shape.shape))
               for (path, info), shape in zip(jax.tree_util.tree_flatten_with_path(definition.info)[0],
                                              jax.tree.leaves(definition.shapes))}
    opt_sh = jax.tree_util.tree_map_with_path(
        lambda path, leaf: _opt_leaf_sharding(path, leaf, by_path, mesh, rules, replicated),
        abstract_state.opt_state)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def _opt_leaf_sharding(path, leaf, by_path: dict, mesh: Mesh, rules: mesh_lib.Rules,
                       replicated: NamedSharding) -> NamedSharding:
    """An optimizer-state leaf sits under its parameter's own path at the end of its key path
    (Adam's mu['blocks'][0]['attn']['wq'], inside any chain or partition). A leaf of the
    parameter's shape gets its sharding; a factored second moment (the shape with one axis
    removed, Adafactor) gets it without that axis; anything else is replicated."""
    keys = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(entry.key)
    key = tuple(reversed(keys))
    if key not in by_path:
        return replicated
    (axes, shape), leaf_shape = by_path[key], tuple(leaf.shape)
    if leaf_shape == shape:
        return mesh_lib.named_sharding(mesh, axes, rules)
    for i in range(len(shape)):
        if shape[:i] + shape[i + 1:] == leaf_shape:
            return mesh_lib.named_sharding(mesh, axes[:i] + axes[i + 1:], rules)
    return replicated


def init_fn(build, cfg, tx: optax.GradientTransformation, parametrization: Parametrization,
            definition: ModelDef):
    """A pure function seed-key -> TrainState, to be jitted with out_shardings.

    `parametrization` and `definition` are the run's parametrization and model def, built once
    by the caller (pretrain.setup) and used here for the model and its init multipliers.
    """

    def init(key: jax.Array) -> TrainState:
        init_key, rng = jax.random.split(key)
        model = build(cfg, nnx.Rngs(params=init_key), parametrization)
        params = parametrization_lib.scale_init(nnx.to_pure_dict(nnx.state(model)), definition.info,
                                                parametrization)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=rng)

    return init


def abstract_with_shardings(abstract: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying shardings: the restore target for any mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
