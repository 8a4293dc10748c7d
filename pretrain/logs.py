"""Quiet console by default: known library chatter is dropped unless --verbosity is raised.

Entry points call `quiet_libraries()` once at start (after absl parsed the flags); launchers
that forward a child's raw output drop `native_noise` lines. Each hidden message is listed here
with the reason it says nothing a user can act on. `--verbosity=1` (absl's flag, also `-v 1`)
shows everything again, together with absl's DEBUG logs.
"""

import logging
import os
import re

from absl import logging as absl_logging

# Starts of Python log messages hidden at the default verbosity.
PYTHON_NOISE = (
    # jax probing for accelerator plugins that are not installed (every CPU-only run).
    'Unable to initialize backend',
    # orbax overriding retention options of a read-only manager (a branch parent, a stage-1
    # tokenizer, a sampled run): reading never deletes checkpoints anyway.
    'CheckpointManagerOptions.read_only=True, setting',
    'Given directory is read only=',
    # jax's own lines about the coordination service; pretrain.distributed logs who joined.
    'Starting JAX distributed service on',
    'Connecting to JAX distributed service on',
)

# Lines of native (C++) output hidden by launch.local at the default verbosity.
NATIVE_NOISE = (
    # gloo's CPU collectives announcing each rank's connections (launch.local, CPU only).
    # '[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1'
    # Ranks write these from several threads at once, so a line may hold pieces of two.
    re.compile(r'is connected to \d+ peer ranks'),
)


def verbose() -> bool:
    """True when absl's --verbosity is raised above its default (INFO)."""
    return absl_logging.get_verbosity() > absl_logging.INFO


def native_noise(line: str) -> bool:
    """True for a line of a child's raw output that the default verbosity hides."""
    return any(pattern.search(line) for pattern in NATIVE_NOISE)


class _QuietFilter(logging.Filter):
    """Drops PYTHON_NOISE and orbax's INFO chatter (one line per save and restore step)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():   # read per record: the verbosity may change after installation
            return True
        if record.levelno <= logging.INFO and f'{os.sep}orbax{os.sep}' in record.pathname:
            return False
        message = record.getMessage()
        return not any(message.startswith(start) for start in PYTHON_NOISE)


_FILTER = _QuietFilter()


def quiet_libraries() -> None:
    """Installs the filter on absl's handler and on the root logger's handlers (idempotent)."""
    handlers = [absl_logging.get_absl_handler(), *logging.getLogger().handlers]
    for handler in handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
