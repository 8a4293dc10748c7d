"""Branching a run from another run's checkpoint (e.g. a cooldown from a constant-LR run).

`schedule.branch_from = 'PARENT_WORKDIR@STEP'` starts a new workdir from the parent's full
state (params, optimizer, step, RNG, data position) at STEP. The branch is accepted only if the
parent was in its stable phase there (warmup over, no update yet decayed) and the child's
schedule gives exactly the parent's LR at every earlier step, so the child's history up to the
branch is the parent's. The lineage (parent run, step; and the parent's own lineage) is kept in
every checkpoint record of the child. `resolve` does all of it before anything is created.
"""

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from pretrain import checkpoint as checkpoint_lib
from pretrain import schedules
from pretrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Parent:
    """A checked branch point: the parent's checkpoints (read-only), the step, the lineage."""

    checkpointer: checkpoint_lib.Checkpointer
    step: int
    lineage: list[dict[str, Any]]   # the child's: the parent's own lineage + the parent

    def restore(self, abstract_state, data_iter):
        """The parent's state at `step` onto the shardings of `abstract_state`, and the data
        iterator's position; the parent's checkpoints are closed afterwards."""
        try:
            return self.checkpointer.restore(self.step, abstract_state, data_iter)
        finally:
            self.checkpointer.close()

    def describe(self) -> str:
        return f'branched from {self.checkpointer.path(self.step)}; lineage {self.lineage}'


def resolve(cfg, spec: schedules.ScheduleSpec, param_shapes: dict[str, list[int]]) -> Parent:
    """The checked branch point of cfg.schedule.branch_from (ConfigError before any compute)."""
    branch_from = cfg.schedule.branch_from
    parent_run, step = parse(branch_from)
    parent_dir = os.path.join(parent_run, 'checkpoints')
    if not os.path.isdir(parent_dir):
        raise ConfigError(f'schedule.branch_from={branch_from!r}: {parent_dir} does not exist')
    checkpointer = checkpoint_lib.Checkpointer(parent_dir, cfg.checkpoint, read_only=True)
    if step not in checkpointer.all_steps():
        raise ConfigError(f'schedule.branch_from={branch_from!r}: no checkpoint at step {step}; '
                          f'{parent_dir} has steps {checkpointer.all_steps()}')
    record = checkpointer.read_record(step)
    checkpoint_lib.check_shapes(record, param_shapes, parent_dir, step)
    lineage = check(record, parent_run, step, spec, cfg.train.steps)
    return Parent(checkpointer, step, lineage)


def parse(branch_from: str) -> tuple[str, int]:
    """'DIR@STEP' -> (absolute DIR, STEP)."""
    run, sep, step = branch_from.rpartition('@')
    if not sep or not run or not step.isdigit():
        raise ConfigError(f'schedule.branch_from={branch_from!r} must look like PARENT_WORKDIR@STEP, '
                          'e.g. runs/constant@2000')
    return os.path.abspath(run), int(step)


def check(parent: dict[str, Any], parent_run: str, step: int,
          child: schedules.ScheduleSpec, child_steps: int) -> list[dict[str, Any]]:
    """Validates a branch from a parent checkpoint record; returns the child's lineage."""
    where = f'{parent_run}@{step}'
    if child_steps <= step:
        raise ConfigError(f'train.steps={child_steps} must be larger than the branch step {step} '
                          f'of schedule.branch_from={where!r}')
    spec = schedules.ScheduleSpec.from_dict(parent['schedule'])
    # Update `step` is the child's first; the parent may have reached its decay start there.
    if not (spec.stable_phase(step) or step == spec.decay_start):
        raise ConfigError(f'schedule.branch_from={where!r}: the parent is not in its stable phase at '
                          f'step {step} ({schedules.describe(spec)}); branch from a step after its '
                          'warmup and before its decay')
    steps = jnp.arange(step, dtype=jnp.int32)
    ours, theirs = (np.asarray(schedules.make_schedule(s)(steps)) for s in (child, spec))
    bad = np.flatnonzero(ours != theirs)
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f'schedule.branch_from={where!r}: this schedule ({schedules.describe(child)}) '
                          f'gives lr {ours[i]:.6g} at step {i} where the parent used {theirs[i]:.6g}; '
                          'a branch must reproduce the parent up to the branch step (same peak lr '
                          'and warmup, decay starting at or after it)' + _warmup_hint(spec, child))
    return list(parent.get('lineage', [])) + [{'run': parent_run, 'step': step}]


def _warmup_hint(parent: schedules.ScheduleSpec, child: schedules.ScheduleSpec) -> str:
    # The usual cause: a warmup derived from train.steps, which differs between the two runs.
    if parent.warmup_steps == child.warmup_steps:
        return ''
    return (f'. The parent warmed up over {parent.warmup_steps} steps and this run over '
            f'{child.warmup_steps}: pass --config.schedule.warmup_steps={parent.warmup_steps}')
