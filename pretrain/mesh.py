"""Device mesh from ici/dcn axis sizes, and the logical-axis rules that map names to it.

Layers name logical axes ('embed', 'mlp', 'act_batch', ...); one rules table maps each name
to mesh axes. Parameters get their shardings from it, activations are constrained with it.
"""

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pretrain.errors import ConfigError

AXES = ('data', 'fsdp', 'tensor', 'sequence')

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Parameters shard their 'embed' dimension over fsdp (ZeRO-3 style: gathered for each matmul)
# and their wide dimensions over tensor (Megatron style). Activations shard the batch over every
# data-parallel axis and the sequence over 'sequence'.
DEFAULT_RULES: Rules = (
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('inner', 'tensor'),           # SSM expanded dimension d_inner
    ('ssm_heads', 'tensor'),       # Mamba-2 heads
    ('ssm_groups', None),
    ('state', None),               # SSM state size N
    ('dt_rank', None),
    ('conv', None),
    ('act_batch', ('data', 'fsdp')),
    ('act_length', 'sequence'),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_head_dim', None),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('act_inner', 'tensor'),
    ('act_ssm_heads', 'tensor'),
)

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar('rules', default=DEFAULT_RULES)


def merge_rules(overrides: Sequence[Sequence]) -> Rules:
    """DEFAULT_RULES with entries replaced (or added) by `overrides`."""
    table = dict(DEFAULT_RULES)
    for entry in overrides:
        if len(entry) != 2:
            raise ConfigError(f'mesh.rules entry {entry!r} must be (logical_name, mesh_axes)')
        name, axes = entry
        for ax in ([axes] if isinstance(axes, str) else list(axes or [])):
            if ax not in AXES:
                raise ConfigError(f'mesh.rules maps {name!r} to unknown mesh axis {ax!r}; '
                                  f'mesh axes are {list(AXES)}')
        table[name] = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    return tuple(table.items())


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis names; a mesh axis is used at most once per spec."""
    table = dict(_RULES.get() if rules is None else rules)
    used: set[str] = set()
    out = []
    for name in names:
        if name is not None and name not in table:
            raise KeyError(f'logical axis {name!r} has no rule; known: {sorted(table)}')
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        free = tuple(a for a in axes if a not in used)
        used.update(free)
        out.append(None if not free else free[0] if len(free) == 1 else free)
    return PartitionSpec(*out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Makes `mesh` and `rules` current (for jit tracing and sharding constraints)."""
    token = _RULES.set(rules)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains an activation to the sharding of its logical axes (no-op without a mesh)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules | None = None):
    return NamedSharding(mesh, logical_to_spec(names, rules))


def _fill(sizes: Mapping[str, int], total: int, key: str) -> dict[str, int]:
    sizes = {a: int(sizes[a]) for a in AXES}
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ConfigError(f'{key}.{a}={s}: a mesh axis size must be a positive integer or -1')
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f'{key}: only one axis may be -1 (fill), got {fill}')
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if total % known:
            raise ConfigError(f'{key}: the fixed axes {sizes} use {known} devices, which does not '
                              f'divide the {total} available')
        sizes[fill[0]] = total // known
    if math.prod(sizes.values()) != total:
        prod = '*'.join(str(sizes[a]) for a in AXES)
        raise ConfigError(f'{key}: data*fsdp*tensor*sequence = {prod} = {math.prod(sizes.values())} '
                          f'but there are {total} devices to fill; use -1 on one axis to fill')
    return sizes


def num_granules(devices: Sequence[jax.Device]) -> int:
    """Number of DCN-connected groups: TPU slices if the devices say so, else processes."""
    if hasattr(devices[0], 'slice_index'):
        return len({d.slice_index for d in devices})
    return len({d.process_index for d in devices})


def mesh_shape(mesh_cfg, num_devices: int, num_granules: int = 1) -> tuple[dict, dict]:
    """Resolved (ici, dcn) axis sizes; raises ConfigError for an impossible layout."""
    dcn = _fill(mesh_cfg.dcn, num_granules, 'mesh.dcn') if any(
        int(mesh_cfg.dcn[a]) != 1 for a in AXES) else {a: 1 for a in AXES}
    per_granule = num_devices // math.prod(dcn.values())
    ici = _fill(mesh_cfg.ici, per_granule, 'mesh.ici')
    return ici, dcn


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over AXES (Auto axis types: sharding follows the logical constraints)."""
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = mesh_shape(mesh_cfg, len(devices), num_granules(devices))
    shape = [ici[a] for a in AXES]
    if math.prod(dcn.values()) == 1:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.array(devices).reshape(shape)
    else:
        grid = mesh_utils.create_hybrid_device_mesh(
            shape, [dcn[a] for a in AXES], devices,
            process_is_granule=not hasattr(devices[0], 'slice_index'))
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))

