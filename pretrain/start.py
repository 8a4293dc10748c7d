"""Where a run starts: its own latest checkpoint (resume), a parent's (branch), or a fresh init.

`plan` makes every check (shapes, schedule, branch point) before anything is created or
computed; `Start.state` then builds the first train state onto the setup's shardings. A damaged
checkpoint step (a truncated array file, a garbled record, ...) is moved aside with one log line
and the newest intact step is used instead (pretrain/checkpoint.py).
"""

import dataclasses
import os
from collections.abc import Callable
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

    def finished(self, total_steps: int) -> bool:
        """True when the run's own latest checkpoint is already at (or past) `total_steps`."""
        return self.resume_step is not None and self.resume_step >= total_steps

    def finished_line(self, workdir: str, total_steps: int) -> str:
        """The one line a re-run of a finished run prints instead of restoring and compiling."""
        return (f'{workdir} is already finished: its latest checkpoint is step {self.resume_step} '
                f'(train.steps={total_steps}). To train further, raise --config.train.steps and '
                'pass --config.schedule.allow_resume_change=True; to start over, use a new --workdir.')

    def open_checkpointer(self, checkpoint_cfg) -> checkpoint_lib.Checkpointer:
        """The run's own checkpointer (created now for a run that has none yet)."""
        return self.checkpointer or checkpoint_lib.Checkpointer(self.checkpoint_dir, checkpoint_cfg)

    def state(self, setup: setup_lib.Setup, checkpointer: checkpoint_lib.Checkpointer,
              data_iter, log: Callable[[str], None]) -> 'Started':
        """The first train state; restores move `data_iter` to their step.

        A resume falls back to an older step when the newest turns out damaged while reading its
        arrays. Call inside `setup.activate()`.
        """
        if self.resume_step is not None:
            restored = checkpointer.restore_latest(
                setup.restore_target(), data_iter,
                check_record=record_checker(setup, self.checkpoint_dir), log=log)
            if restored is None:   # every step vanished between plan() and now
                raise ConfigError(f'{self.checkpoint_dir}: the checkpoints disappeared while '
                                  'starting; restart the run')
            return Started(restored.state, restored.step,
                           f'resumed from step {restored.step} in {self.checkpoint_dir}',
                           int(restored.record.get('skipped_steps', 0)),
                           tuple(restored.record.get('lineage', [])))
        if self.parent is not None:
            return Started(self.parent.restore(setup.restore_target(), data_iter), self.parent.step,
                           self.parent.describe(), 0, tuple(self.parent.lineage))
        return Started(setup.init_state(), 0, None)


@dataclasses.dataclass(frozen=True)
class Started:
    """The first train state and what it continues: the step the metrics resume from (0 for a
    fresh run), a line for the log, skipped updates so far and the lineage."""
    state: state_lib.TrainState
    step: int
    note: str | None
    skipped_steps: int = 0
    lineage: tuple[dict[str, Any], ...] = ()


def record_checker(setup: setup_lib.Setup, checkpoint_dir: str) -> Callable[[dict, int], None]:
    """(record, step) -> None or ConfigError: the shapes and schedule a resume must match."""
    allow = setup.cfg.schedule.allow_resume_change

    def check(record: dict, step: int) -> None:
        checkpoint_lib.check_shapes(record, setup.param_shapes, checkpoint_dir, step)
        check_schedule(record, setup.schedule_spec, allow, f'{checkpoint_dir} step {step}')

    return check


def plan(setup: setup_lib.Setup, workdir: str, log: Callable[[str], None]) -> Start:
    """Resume when the workdir has an intact checkpoint, else branch when schedule.branch_from is
    set, else start fresh; raises ConfigError for an incompatible checkpoint and CheckpointError
    when every step is damaged. Only damaged steps are touched on disk (moved aside)."""
    cfg = setup.cfg
    checkpoint_dir = os.path.join(workdir, 'checkpoints')
    if os.path.isdir(checkpoint_dir):
        checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, cfg.checkpoint)
        found = checkpointer.latest_verified(log=log)   # cheap: no arrays are read
        if found is not None:
            latest, record = found
            record_checker(setup, checkpoint_dir)(record, latest)
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
