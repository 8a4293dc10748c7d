"""Preemption: SIGTERM or SIGINT makes every process stop at the same step, after a save.

Single process: a Python signal handler sets a flag that the loop reads after every step.

Several processes (jax.distributed initialised): JAX's preemption sync manager installs its own
SIGTERM handler, spreads the notice through the coordination service, and
`reached_preemption_sync_point(step)` turns True on every process at the same step (one past
the largest step any process had reached). It costs about a microsecond per step while no
notice is pending. SIGINT is re-sent as SIGTERM so that it joins the same protocol. We must not
install a Python SIGTERM handler there: it would replace the sync manager's.

If the preemption service is disabled (`jax_enable_preemption_service=False`), local flags are
OR-ed across processes by `agree` at the steps the loop already synchronises on.

A signal that arrived during start-up (recorded by `startup_signals`) is taken over by the
Watcher: `should_stop` answers True from the first call, so a loop that asks it once before its
first step stops there with nothing to save.
"""

import os
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from pretrain import startup_signals
from pretrain.startup_signals import EXIT_PREEMPTED  # noqa: F401 - the trainer's exit code


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _sync_manager_active() -> bool:
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class Watcher:
    """Context manager: installs the signal handlers; `should_stop(step)` after every step."""

    def __init__(self) -> None:
        # First signal this process received, also one during start-up, before the loop.
        self.signal_name: str | None = startup_signals.received()
        self._previous: dict[int, object] = {}
        self._use_sync = _sync_manager_active()

    @property
    def needs_agreement(self) -> bool:
        """True when the local flag must be OR-ed across processes with `agree`."""
        return jax.process_count() > 1 and not self._use_sync

    def __enter__(self) -> 'Watcher':
        if threading.current_thread() is not threading.main_thread():
            logging.warning('not on the main thread: SIGTERM/SIGINT will not save a checkpoint')
            return self
        signals = (signal.SIGINT,) if self._use_sync else _SIGNALS
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.signal_name is not None:
            startup_signals.clear()   # taken over: acted on by this watcher
            if self._use_sync:   # JAX's notifier did not see it: tell it, as `_handle` does
                os.kill(os.getpid(), signal.SIGTERM)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        # A second signal gets the previous behaviour (e.g. Ctrl-C twice interrupts at once).
        self._restore()
        if self._use_sync:
            os.kill(os.getpid(), signal.SIGTERM)   # hand it to JAX's preemption notifier

    @property
    def local_flag(self) -> bool:
        return self.signal_name is not None

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; the same answer on every process.

        Must be called by every process after every step, with increasing steps.
        """
        if self._use_sync:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self.local_flag
        return False   # multi-process without the sync manager: decided by `agree`


def agree(stop: bool, save_due: bool) -> tuple[bool, bool]:
    """(any process wants to stop, process 0 wants a time-based save); one tiny collective.

    Every process must call it at the same steps. Process 0's clock decides time-based saves, so
    clock skew or uneven step times cannot make processes disagree (a save is collective).
    """
    if jax.process_count() == 1:
        return stop, save_due
    flags = multihost_utils.process_allgather(np.array([stop, save_due], np.int32))
    return bool(flags[:, 0].any()), bool(flags[0, 1])
