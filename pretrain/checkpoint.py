"""Orbax checkpoints: train state + data-iterator state + a JSON record (config, schedule, shapes).

Saves are atomic (orbax writes to a temporary directory and renames on commit), so a kill
during a save leaves the previous checkpoint intact, and `latest_step` only sees committed ones.
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from pretrain.errors import ConfigError


class Checkpointer:
    """Keeps the last `keep_last` checkpoints and every `keep_every`-th step."""

    def __init__(self, directory: str, ckpt_cfg):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_cfg.keep_last,
            keep_period=ckpt_cfg.keep_every or None,
            save_interval_steps=ckpt_cfg.every_steps,
            enable_async_checkpointing=ckpt_cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_record(self, step: int) -> dict[str, Any]:
        """The JSON record of a checkpoint (cheap: no arrays are read)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

    def save(self, step: int, state, data_iter, record: dict[str, Any], force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iter),
                                  meta=ocp.args.JsonSave(record))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iter):
        """Restores onto the shardings in `abstract_state` (any mesh) and the iterator in place."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
        return out['state']

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
