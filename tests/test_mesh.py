"""Mesh construction from ici/dcn sizes and the logical-axis rules table."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from pretrain import mesh as mesh_lib
from model_zoo import base_config
from pretrain.errors import ConfigError


def _mesh_cfg(**ici):
    c = base_config().mesh
    c.ici.update(data=1, fsdp=1, tensor=1, sequence=1)
    c.ici.update(**ici)
    return c


def test_fill_axis_takes_the_remaining_devices():
    mesh = mesh_lib.make_mesh(_mesh_cfg(data=-1, tensor=2))
    assert dict(mesh.shape) == {'data': 4, 'fsdp': 1, 'tensor': 2, 'sequence': 1}
    assert mesh.devices.size == 8


@pytest.mark.parametrize('ici, message', [
    (dict(data=3), 'but there are 8 devices'),
    (dict(data=-1, fsdp=-1), 'only one axis may be -1'),
    (dict(data=3, fsdp=-1), 'does not divide'),
    (dict(tensor=0), 'mesh.ici.tensor=0'),
])
def test_impossible_meshes_are_named(ici, message):
    with pytest.raises(ConfigError, match=message):
        mesh_lib.make_mesh(_mesh_cfg(**ici))


def test_dcn_axes_span_processes():
    c = _mesh_cfg(fsdp=4)
    c.dcn.update(data=2)
    ici, dcn = mesh_lib.mesh_shape(c, num_devices=8, num_granules=2)
    assert ici['fsdp'] == 4 and dcn['data'] == 2
    with pytest.raises(ConfigError, match='mesh.dcn'):
        mesh_lib.mesh_shape(c, num_devices=8, num_granules=1)


def test_rules_map_logical_names_and_never_reuse_a_mesh_axis():
    assert mesh_lib.logical_to_spec(('embed', 'mlp')) == P('fsdp', 'tensor')
    assert mesh_lib.logical_to_spec(('act_batch', 'act_length', None)) == P(('data', 'fsdp'), 'sequence', None)
    # 'heads' and 'mlp' both want 'tensor': only the first gets it.
    assert mesh_lib.logical_to_spec(('heads', 'mlp')) == P('tensor', None)
    with pytest.raises(KeyError, match='no rule'):
        mesh_lib.logical_to_spec(('nonexistent',))


def test_config_overrides_the_rules():
    rules = mesh_lib.merge_rules((('embed', None), ('act_batch', ['data'])))
    assert mesh_lib.logical_to_spec(('embed', 'mlp'), rules) == P(None, 'tensor')
    assert mesh_lib.logical_to_spec(('act_batch',), rules) == P('data')
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        mesh_lib.merge_rules((('embed', 'model'),))


def test_constrain_is_a_noop_without_a_mesh_and_shards_with_one():
    x = jax.numpy.ones((8, 4))
    assert mesh_lib.constrain(x, ('act_batch', None)) is x
    mesh = mesh_lib.make_mesh(_mesh_cfg(data=8))
    with mesh_lib.activate(mesh):
        y = jax.jit(lambda v: mesh_lib.constrain(v * 2, ('act_batch', None)))(x)
    assert y.sharding.shard_shape(y.shape) == (1, 4)   # one row per device
