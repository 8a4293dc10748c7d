"""Orbax checkpoints: train state + data-iterator state + a JSON record (config, schedule, shapes).

Saves are atomic: orbax writes `<step>.orbax-checkpoint-tmp-<id>` and renames it to `<step>`
once every item is written, so a kill during a save leaves the previous checkpoint intact and
`latest_step` only sees committed ones. A new manager deletes such leftovers before saving.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from pretrain.errors import ConfigError


class _DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's iterator handler, restorable with another process count.

    grain writes one `process_<i>-of-<n>.json` per process and reads back only the file of the
    same i and n. Our iterator state is the global batch index (rows are picked from seed, step
    and the process index when read), equal in every file, so any file restores any process.
    """

    def restore(self, directory, item=None, args=None):
        own = directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
        if own.exists():
            return super().restore(directory, item, args)
        states = {f.name: json.loads(f.read_text()) for f in directory.glob('process_*-of-*.json')}
        if not states or any(s != next(iter(states.values())) for s in states.values()):
            raise ValueError(f'cannot restore the data iterator from {directory} with '
                             f'{jax.process_count()} process(es): saved states {states}')
        item = item or args.item
        item.set_state(next(iter(states.values())))
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    item: Any


class Checkpointer:
    """Keeps the last `keep_last` checkpoints and every `keep_every`-th step."""

    def __init__(self, directory: str, ckpt_cfg=None, read_only: bool = False):
        """read_only: for another run's checkpoints (a branch parent): never writes or cleans;
        `ckpt_cfg` (the retention and save settings) is then not needed."""
        if ckpt_cfg is None and not read_only:
            raise ValueError('a writable Checkpointer needs the checkpoint config')
        self.directory = os.path.abspath(directory)
        retention = {} if ckpt_cfg is None else dict(
            max_to_keep=ckpt_cfg.keep_last,
            keep_period=ckpt_cfg.keep_every or None,
            save_interval_steps=ckpt_cfg.every_steps,
            enable_async_checkpointing=ckpt_cfg.async_save)
        options = ocp.CheckpointManagerOptions(
            **retention,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,   # half-written saves of a killed run
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_record(self, step: int) -> dict[str, Any]:
        """The JSON record of a checkpoint (cheap: no arrays are read)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

    def save(self, step: int, state, data_iter, record: dict[str, Any], force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=_DataSave(data_iter),
                                  meta=ocp.args.JsonSave(record))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iter):
        """Restores onto the shardings in `abstract_state` (any mesh) and the iterator in place."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=_DataRestore(data_iter)))
        return out['state']

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, step: int | None = None,
                   device: jax.Device | None = None) -> tuple[Any, dict[str, Any], int]:
    """(params, JSON record, step) of a run's checkpoint (the latest by default), read-only.

    Only the model parameters are read, onto one device (the first local one by default): their
    shapes come from the checkpoint's own metadata, so no model or optimizer is rebuilt.
    """
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f'{ckpt_dir} does not exist')
    checkpointer = Checkpointer(ckpt_dir, read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.all_steps():
            raise ConfigError(f'{ckpt_dir} holds no checkpoint'
                              + ('' if step is None else f' at step {step}'))
        record = checkpointer.read_record(step)
    finally:
        checkpointer.close()
    state_dir = os.path.join(checkpointer.path(step), 'state')
    reader = ocp.PyTreeCheckpointer()
    saved = reader.metadata(state_dir).item_metadata.tree['params']
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    target = {'params': jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), saved)}
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
    restored = reader.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    return restored['params'], record, step


class SaveTimer:
    """Time-based saves: due once `every_minutes` have passed since the last save (0 = never)."""

    def __init__(self, every_minutes: float, clock: Callable[[], float] = time.monotonic):
        self.interval = 60.0 * every_minutes
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self._last = self.clock()

    def due(self) -> bool:
        return self.interval > 0 and self.clock() - self._last >= self.interval


def check_shapes(record: dict[str, Any], shapes: dict[str, list[int]], directory: str, step: int) -> None:
    """Refuses to resume a checkpoint whose parameter shapes differ from the configured model."""
    saved = record.get('param_shapes', {})
    if saved == shapes:
        return
    diffs = [f'{k}: checkpoint {saved.get(k)} vs config {shapes.get(k)}'
             for k in sorted(set(saved) | set(shapes)) if saved.get(k) != shapes.get(k)]
    raise ConfigError(
        f'the checkpoint at step {step} in {directory} holds a model of a different shape '
        f'({len(diffs)} parameters differ; first: {"; ".join(diffs[:3])}). Use a new --workdir, '
        'or the config that wrote it. Nothing was changed on disk.')
