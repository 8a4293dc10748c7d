"""Where a run starts: its own latest checkpoint (resume), a parent's (branch), or a fresh init.

`plan` makes every check (shapes, schedule, branch point) before anything is created or
computed; `Start.state` then builds the first train state onto the setup's shardings.
"""

import dataclasses
import os
from typing import Any

from pretrain import branching
from pretrain import checkpoint as checkpoint_lib
from pretrain import schedules
from pretrain import setup as setup_lib
from pretrain import state as state_lib
from pretrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Start:
    checkpoint_dir: str
    checkpointer: checkpoint_lib.Checkpointer | None   # the run's own, if it had checkpoints
    resume_step: int | None                            # its latest step, if any
    parent: branching.Parent | None                    # the branch point, for a new branch
    skipped_steps: int = 0                             # skipped non-finite updates so far
    lineage: tuple[dict[str, Any], ...] = ()           # runs this one branched from

    def open_checkpointer(self, checkpoint_cfg) -> checkpoint_lib.Checkpointer:
        """The run's own checkpointer (created now for a run that has none yet)."""
        return self.checkpointer or checkpoint_lib.Checkpointer(self.checkpoint_dir, checkpoint_cfg)

    def state(self, setup: setup_lib.Setup, checkpointer: checkpoint_lib.Checkpointer,
              data_iter) -> tuple[state_lib.TrainState, str | None]:
        """(first train state, a line for the log); restores move `data_iter` to their step.

        Call inside `setup.activate()`.
        """
        if self.resume_step is not None:
            state = checkpointer.restore(self.resume_step, setup.restore_target(), data_iter)
            return state, f'resumed from step {self.resume_step} in {self.checkpoint_dir}'
        if self.parent is not None:
            return self.parent.restore(setup.restore_target(), data_iter), self.parent.describe()
        return setup.init_state(), None


def plan(setup: setup_lib.Setup, workdir: str) -> Start:
    """Resume when the workdir has a checkpoint, else branch when schedule.branch_from is set,
    else start fresh; raises ConfigError (changing nothing on disk) for an incompatible one."""
    cfg = setup.cfg
    checkpoint_dir = os.path.join(workdir, 'checkpoints')
    if os.path.isdir(checkpoint_dir):
        checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, cfg.checkpoint)
        latest = checkpointer.latest_step()
        if latest is not None:
            record = checkpointer.read_record(latest)
            checkpoint_lib.check_shapes(record, setup.param_shapes, checkpoint_dir, latest)
            check_schedule(record, setup.schedule_spec, cfg.schedule.allow_resume_change,
                           f'{checkpoint_dir} step {latest}')
            return Start(checkpoint_dir, checkpointer, latest, None,
                         int(record.get('skipped_steps', 0)), tuple(record.get('lineage', [])))
    else:
        checkpointer = None
    if cfg.schedule.branch_from:
        parent = branching.resolve(cfg, setup.schedule_spec, setup.param_shapes)
        return Start(checkpoint_dir, checkpointer, None, parent, 0, tuple(parent.lineage))
    return Start(checkpoint_dir, checkpointer, None, None)


def check_schedule(record: dict, spec: schedules.ScheduleSpec, allow_change: bool, where: str) -> None:
    """Refuses to resume under a schedule unlike the checkpoint's (unless allowed)."""
    saved = record.get('schedule')
    if saved is None or saved == spec.to_dict() or allow_change:
        return
    diffs = {k: (saved.get(k), v) for k, v in spec.to_dict().items() if saved.get(k) != v}
    raise ConfigError(f'the schedule differs from the one saved in {where}: '
                      + ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in diffs.items())
                      + '. Resuming would silently change the learning rate of a running job; '
                      'restore the saved values or pass --config.schedule.allow_resume_change=True.')
