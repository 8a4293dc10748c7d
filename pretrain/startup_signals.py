"""SIGTERM/SIGINT during start-up: recorded, not fatal, so a stopped job still exits 75.

A scheduler that preempts a job sends SIGTERM whenever it likes, also while the trainer is still
importing, parsing its config, reading data, restoring or compiling. Python's default would kill
the process with signal 15 (or raise KeyboardInterrupt), which a launcher that requeues on exit
code 75 treats as a failure. `install()` runs first thing in the entry point and only records
the signal; `preemption.Watcher` takes the record over when the loop starts, and the loop stops
before its first step. Nothing is lost: no step was taken since the last checkpoint.

This module imports nothing heavy, so it can be installed before JAX is imported.
"""

import os
import signal
import sys
import threading

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". Distinct from 0
# (finished) and 1 (error), so a launcher or scheduler can requeue the job on this code.
EXIT_PREEMPTED = 75

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[str] = []           # names of the signals seen since install()
_previous: dict[int, object] = {}   # the handlers install() replaced


def install() -> None:
    """Records SIGTERM/SIGINT from now on instead of dying; a second signal acts as before."""
    if threading.current_thread() is not threading.main_thread():
        return   # Python allows signal handlers only on the main thread
    for sig in _SIGNALS:
        _previous[sig] = signal.signal(sig, _record)


def _record(signum: int, frame: object) -> None:
    _received.append(signal.Signals(signum).name)
    if len(_received) > 1:
        # Twice (e.g. Ctrl-C again): the user means it; restore the defaults and deliver it.
        uninstall()
        os.kill(os.getpid(), signum)


def uninstall() -> None:
    """Puts back the handlers install() replaced."""
    for sig, handler in _previous.items():
        if signal.getsignal(sig) is _record:
            signal.signal(sig, handler)
    _previous.clear()


def act_at_once() -> None:
    """Gives SIGTERM and SIGINT their operating-system default: end the process now.

    For runs that write nothing (a dry run): their compile can take minutes inside XLA, where a
    Python-level handler (the recorder, or Python's own KeyboardInterrupt) runs only once the
    compiler returns, so a stop would otherwise wait for the whole compile."""
    if threading.current_thread() is not threading.main_thread():
        return
    uninstall()
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def received() -> str | None:
    """The name of the first signal recorded since install(), or None."""
    return _received[0] if _received else None


def exit_if_received(stage: str) -> None:
    """Exits 75 with one line if a signal arrived before `stage` ('the first step', ...)."""
    name = received()
    if name is None:
        return
    print(f'stopped by {name} during start-up, before {stage}; nothing to save. Exit '
          f'{EXIT_PREEMPTED}: restart the same command to continue.', file=sys.stderr, flush=True)
    raise SystemExit(EXIT_PREEMPTED)


def clear() -> None:
    """Forgets the recorded signals (once the loop's watcher has taken them over)."""
    _received.clear()
