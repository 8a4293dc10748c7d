"""Orbax checkpoints: train state + data-iterator state + a JSON record (config, schedule, shapes).

Saves are atomic: orbax writes `<step>.orbax-checkpoint-tmp-<id>` and renames it to `<step>`
once every item is written, so a kill during a save leaves the previous checkpoint intact and
`latest_step` only sees committed ones. A new manager deletes such leftovers before saving.

A committed checkpoint can still be damaged afterwards (a disk error, a copy cut short, a
hand edit). `restore_latest` checks the newest step cheaply (`verify`: every item present and
its JSON parseable), restores it, and compares the restored arrays with checksums saved in the
record (a flipped or zeroed byte in an array file restores silently otherwise). A damaged step
is moved into `damaged/` beside the steps (never deleted) and the next older one is tried.
"""

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from pretrain.errors import CheckpointError, ConfigError

DAMAGED_DIR = 'damaged'   # orbax only scans integer-named folders, so it never sees this one
CHECKSUM_KEY = 'state_checksums'   # in the record: one uint32 per state leaf, by tree path
ITEMS = ('state', 'data', 'meta')
# Storage errors a damaged array file raises from TensorStore (as ValueError or Exception);
# anything else during a restore is a bug or a config problem and is not blamed on the files.
_STORAGE_ERROR_MARKS = ('DATA_LOSS', 'NOT_FOUND', 'OUT_OF_RANGE', 'FAILED_PRECONDITION',
                        'TensorStore', 'Error reading', 'Error opening',
                        'not found in the checkpoint')


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


@dataclasses.dataclass(frozen=True)
class Damage:
    """Why a checkpoint step cannot be restored: a file-name-safe slug and a phrase for humans."""

    slug: str
    detail: str


@dataclasses.dataclass(frozen=True)
class Restored:
    """The newest intact checkpoint: its step, train state and JSON record."""

    step: int
    state: Any
    record: dict[str, Any]


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 sum of the leaf's 32-bit words, each times an odd, position-dependent weight.

    Odd weights are invertible mod 2**32, so changing any single word changes the sum; integer
    addition is associative, so the result does not depend on the sharding or reduction order.
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = x.reshape(-1)
    size = x.dtype.itemsize
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif size == 4:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif size < 4:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * size}')).astype(jnp.uint32)
    else:   # 8-byte values: two words each
        words = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    position = jnp.arange(words.shape[0], dtype=jnp.uint32)
    weights = (position * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(tree) -> list[jax.Array]:
    return [_leaf_checksum(x) for x in jax.tree.leaves(tree)]


def _path_name(path) -> str:
    # 'params/embed/kernel', whatever the containers (dataclass, dict, namedtuple, list), so a
    # state restored as plain dicts has the same names as the TrainState that was saved.
    parts = []
    for key in path:
        for attr in ('key', 'name', 'idx'):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return '/'.join(parts)


def state_checksums(state) -> dict[str, int]:
    """{tree path: checksum} of every leaf; one fused reduction pass over the state on device."""
    paths = [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    sums = jax.device_get(_checksums(state))
    return {path: int(value) for path, value in zip(paths, sums)}


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = (str(error).strip().splitlines() or [''])[0]
    text = text.split(' See full TensorStore details')[0]
    text = f'{type(error).__name__}: {text}'
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _json_damage(path: str, what: str, slug: str) -> Damage | None:
    """Damage if the JSON file at `path` is missing, empty or does not parse."""
    if not os.path.isfile(path):
        return Damage(f'{slug}-missing', f'{what} is missing')
    try:
        with open(path, encoding='utf-8') as f:
            json.load(f)
    except (OSError, ValueError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return Damage(f'{slug}-garbled', f'{what} is not readable JSON ({type(e).__name__})')
    return None


def is_storage_error(error: BaseException) -> bool:
    """Whether a restore failed on the checkpoint's files rather than on the caller's inputs."""
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
        return True
    message = str(error)
    return any(mark in message for mark in _STORAGE_ERROR_MARKS)


def check_writable(workdir: str) -> None:
    """Raises ConfigError (one line) unless a run could create files in `workdir`.

    Checks the workdir (or, if it does not exist yet, the nearest existing parent, where it would
    be created) and its checkpoints/ folder by creating and removing a probe file, which is what
    a write needs and what permission bits alone do not tell (read-only mounts, quotas, root).
    """
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f'--workdir={workdir} is a file, not a folder; pass a folder path.')
    targets = [path, os.path.join(path, 'checkpoints')]
    if not os.path.isdir(path):
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ConfigError(f'--workdir={workdir} cannot be created: {parent} is a file.')
        targets = [parent]
    for target in targets:
        if not os.path.isdir(target):
            continue
        try:
            fd, probe = tempfile.mkstemp(prefix='.write-probe-', dir=target)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f'--workdir={workdir} is not writable ({target}: {e.strerror}); '
                              'checkpoints and metrics need write access.') from None


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
        self._moved: list[int] = []   # steps this checkpointer moved aside as damaged

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
        """Saves `state`, the iterator and `record` plus checksums of the state's arrays."""
        record = dict(record, **{CHECKSUM_KEY: state_checksums(state)})
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

    def verify(self, step: int) -> Damage | None:
        """Cheap check of one step without reading arrays: None if nothing is visibly wrong.

        Every item folder present, the record, the iterator state and the array metadata
        parseable JSON, no empty file among the arrays. Damage inside array files shows only
        when they are read (`restore_latest`).
        """
        folder = self.path(step)
        if not os.path.isdir(folder):
            return Damage('missing', 'its folder is gone')
        if not os.listdir(folder):
            return Damage('empty', 'its folder is empty')
        for item in ITEMS:
            if not os.path.isdir(os.path.join(folder, item)):
                return Damage(f'{item}-missing', f'its {item}/ folder is missing')
        damage = _json_damage(os.path.join(folder, 'meta', 'metadata'), 'the record meta/metadata',
                              'record')
        if damage:
            return damage
        data_dir = os.path.join(folder, 'data')
        data_files = sorted(f for f in os.listdir(data_dir) if f.startswith('process_'))
        if not data_files:
            return Damage('data-missing', 'the data-iterator state data/process_*.json is missing')
        for name in data_files:
            damage = _json_damage(os.path.join(data_dir, name),
                                  f'the data-iterator state data/{name}', 'data')
            if damage:
                return damage
        state_dir = os.path.join(folder, 'state')
        damage = _json_damage(os.path.join(state_dir, '_METADATA'), 'state/_METADATA',
                              'state-metadata')
        if damage:
            return damage
        for dirpath, _, filenames in os.walk(state_dir):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if os.path.getsize(path) == 0:
                    return Damage('array-file-empty',
                                  f'array file {os.path.relpath(path, folder)} is empty')
        return None

    def _check_restored(self, state, record: dict[str, Any]) -> Damage | None:
        saved = record.get(CHECKSUM_KEY)
        if saved is None:   # written before checksums were recorded
            return None
        actual = state_checksums(state)
        wrong = [path for path, value in actual.items() if saved.get(path) != value]
        if not wrong:
            return None
        return Damage('checksum-mismatch', f'{len(wrong)} array(s) differ from their saved '
                      f'checksums, first {wrong[0]!r}')

    def move_aside(self, step: int, damage: Damage) -> str:
        """Moves a damaged step into damaged/<step>.<slug> (never deleted); returns the new path.

        In a multi-process run every process calls it; process 0 moves, the others wait.
        """
        target_dir = os.path.join(self.directory, DAMAGED_DIR)
        target = os.path.join(target_dir, f'{step}.{damage.slug}')
        suffix = 1
        while os.path.exists(target):   # the same step damaged again after an earlier move
            suffix += 1
            target = os.path.join(target_dir, f'{step}.{damage.slug}.{suffix}')
        if jax.process_index() == 0:
            os.makedirs(target_dir, exist_ok=True)
            os.rename(self.path(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'checkpoint_moved_aside_{step}')
        self.manager.reload()
        return target

    def _set_aside(self, step: int, damage: Damage, log: Callable[[str], None]) -> None:
        target = self.move_aside(step, damage)
        self._moved.append(step)
        older = [s for s in self.all_steps() if s < step]
        log(f'checkpoint step {step} in {self.directory} is damaged ({damage.detail}); moved '
            f'to {target}; ' + (f'trying step {max(older)}' if older else 'no older checkpoint'))

    def _none_intact(self) -> CheckpointError:
        return CheckpointError(
            f'no intact checkpoint in {self.directory}: the damaged steps {self._moved} were moved '
            f'to {os.path.join(self.directory, DAMAGED_DIR)}. Restore a good copy there, or use '
            'a new --workdir to start over.')

    def latest_verified(self, log: Callable[[str], None] = print
                        ) -> tuple[int, dict[str, Any]] | None:
        """(step, record) of the newest step that passes `verify`; None if there is no step.

        Cheap (no arrays are read), so a trainer can check the record (shapes, schedule) before
        any compute. Steps that fail are moved aside with one `log` line each; raises
        CheckpointError when steps existed and all failed.
        """
        for step in sorted(self.all_steps(), reverse=True):
            damage = self.verify(step)
            if damage is None:
                try:
                    return step, self.read_record(step)
                except Exception as e:   # noqa: BLE001 - classified; other errors re-raised
                    if not is_storage_error(e):
                        raise
                    damage = Damage('record-unreadable',
                                    f'reading its record failed: {_first_line(e)}')
            self._set_aside(step, damage, log)
        if self._moved:
            raise self._none_intact()
        return None

    def restore_latest(self, abstract_state, data_iter,
                       check_record: Callable[[dict[str, Any], int], None] | None = None,
                       log: Callable[[str], None] = print) -> Restored | None:
        """Restores the newest intact checkpoint; None if there is no checkpoint at all.

        Damaged steps, newest first, are moved aside with one `log` line each naming the step and
        the reason. `check_record(record, step)` runs before the arrays are read (e.g. shape and
        schedule checks); its ConfigError propagates, as does any error that is not about the
        files. Raises CheckpointError when every step is damaged.
        """
        while (found := self.latest_verified(log)) is not None:
            step, record = found
            if check_record is not None:
                check_record(record, step)
            try:
                state = self.restore(step, abstract_state, data_iter)
            except Exception as e:   # noqa: BLE001 - classified; other errors re-raised
                if not is_storage_error(e):
                    raise
                damage = Damage('unreadable', f'reading it failed: {_first_line(e)}')
            else:
                damage = self._check_restored(state, record)
                if damage is None:
                    return Restored(step, state, record)
            self._set_aside(step, damage, log)
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _saved_state(workdir: str, step: int | None) -> tuple[str, dict[str, Any], int]:
    """(state folder, JSON record, step) of a run's checkpoint (the latest by default)."""
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
    return state_dir, record, step


def restore_params(workdir: str, step: int | None = None,
                   device: jax.Device | None = None) -> tuple[Any, dict[str, Any], int]:
    """(params, JSON record, step) of a run's checkpoint (the latest by default), read-only.

    Only the model parameters are read, onto one device (the first local one by default): their
    shapes come from the checkpoint's own metadata, so no model or optimizer is rebuilt.
    """
    state_dir, record, step = _saved_state(workdir, step)
    reader = ocp.PyTreeCheckpointer()
    saved = reader.metadata(state_dir).item_metadata.tree['params']
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    target = {'params': jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), saved)}
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
    restored = reader.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    return restored['params'], record, step



@dataclasses.dataclass(frozen=True)
class ParamReader:
    """Reads a checkpoint's parameters one at a time (an export never holds the whole model).

    `shapes` maps each parameter's path (string keys) to its ShapeDtypeStruct, from the
    checkpoint's own metadata, in tree order; `read(path)` restores just that parameter onto
    `device`, from a checkpoint saved on any mesh.
    """

    state_dir: str
    record: dict[str, Any]
    step: int
    shapes: dict[tuple[str, ...], jax.ShapeDtypeStruct]
    keys: dict[tuple[str, ...], tuple]   # the tree's own keys (ints for list entries)
    device: jax.Device

    def read(self, path: tuple[str, ...]) -> jax.Array:
        sharding = jax.sharding.SingleDeviceSharding(self.device)
        shape = self.shapes[path]
        target: Any = jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)
        for key in reversed(self.keys[path]):
            target = {key: target}
        target = {'params': target}
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
        restored = ocp.PyTreeCheckpointer().restore(self.state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))['params']
        for key in self.keys[path]:
            restored = restored[key]
        return restored


def param_reader(workdir: str, step: int | None = None,
                 device: jax.Device | None = None) -> ParamReader:
    """A reader of the parameters of a run's checkpoint (the latest by default), read-only."""
    state_dir, record, step = _saved_state(workdir, step)
    saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree['params']
    shapes, keys = {}, {}
    for tree_path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]:
        own = tuple(getattr(k, 'key', k) for k in tree_path)
        path = tuple(str(k) for k in own)
        shapes[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        keys[path] = own
    return ParamReader(state_dir, record, step, shapes, keys, device or jax.local_devices()[0])

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
