"""Errors a user sees: bad configuration or input (before compute), and a diverged run."""

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config or input value that cannot work; raised before any compute."""


def check_choice(key: str, value: object, allowed: Iterable[object]) -> None:
    """Raises ConfigError naming `key`, the bad `value` and the allowed values."""
    allowed = list(allowed)
    if value in allowed:
        return
    hint = ''
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
        if close:
            hint = f' Did you mean {close[0]!r}?'
    raise ConfigError(f'{key}={value!r} is not allowed; choose one of {allowed}.{hint}')


class NonFiniteError(RuntimeError):
    """The loss or gradients became NaN/inf with train.nonfinite_policy='stop'.

    Not a ConfigError: it happens during compute. Nothing was saved after `step`; the run can be
    resumed (e.g. with a lower LR) from `checkpoint` (None if no checkpoint exists yet).
    """

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be restored (all damaged); not a config error."""


class DoesNotFitError(RuntimeError):
    """The TPU compiler refused the train step: it needs more HBM per chip than the chip has.

    An answer of a dry run (--dry_run_topology), not a crash: `compiler_message` is the
    compiler's own line (the memory it needed and had).
    """

    def __init__(self, message: str, compiler_message: str):
        super().__init__(message)
        self.compiler_message = compiler_message
