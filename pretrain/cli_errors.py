"""Command-line mistakes as one line: a mistyped --config.KEY, a missing or broken config file.

absl parses the flags before `main` runs, and ml_collections' config flags raise plain Python
errors there (AttributeError for an unknown key, OSError for a missing file, SyntaxError), which
absl does not catch: the user gets a 40-55-line traceback that never names the flag. `parse_flags`
is the flags parser for `app.run`; it turns those errors into one line naming the flag or file.
"""

import difflib
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable

from absl import app, flags

_CONFIG_FLAG = 'config'


def _config_path(argv: list[str]) -> str | None:
    """The value of --config in argv (either '--config=PATH' or '--config PATH')."""
    for i, arg in enumerate(argv):
        for prefix in (f'--{_CONFIG_FLAG}=', f'-{_CONFIG_FLAG}='):
            if arg.startswith(prefix):
                return arg[len(prefix):]
        if arg in (f'--{_CONFIG_FLAG}', f'-{_CONFIG_FLAG}') and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _override_keys(argv: list[str]) -> list[str]:
    """Dotted keys of the --config.KEY[=VALUE] flags, in order."""
    keys = []
    for arg in argv:
        for prefix in (f'--{_CONFIG_FLAG}.', f'-{_CONFIG_FLAG}.'):
            if arg.startswith(prefix):
                keys.append(arg[len(prefix):].split('=', 1)[0])
    return keys


def config_keys(path: str | None = None) -> list[str]:
    """Every dotted key a config can set: those of the config file at `path` (it holds the
    trainer's keys and every family's section), or the trainer's own keys without one."""
    config = None
    if path is not None and os.path.isfile(path):
        try:
            spec = importlib.util.spec_from_file_location('config_for_key_names', path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            config = module.get_config()
        except Exception:   # noqa: BLE001 - a broken file is reported elsewhere; fall back
            config = None
    if config is None:
        from pretrain.config import core_config
        config = core_config()

    def walk(prefix: str, node) -> Iterable[str]:
        for name, value in node.items():
            key = f'{prefix}{name}'
            if isinstance(value, dict):
                yield from walk(f'{key}.', value)
            else:
                yield key

    return sorted(walk('', config.to_dict()))


def unknown_key_message(key: str, known: list[str]) -> str:
    """'--config.train.step: no such config key; did you mean train.steps?'."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:   # a mistyped section: match on the part after the last dot instead
        leaf = key.rsplit('.', 1)[-1]
        close = [k for k in known if k.rsplit('.', 1)[-1] == leaf][:1]
    hint = f'did you mean {close[0]}?' if close else 'see pretrain/config.py for the keys'
    return f'--{_CONFIG_FLAG}.{key}: no such config key; {hint}'


def _chain(error: BaseException) -> list[BaseException]:
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _line_in(error: BaseException, path: str) -> int | None:
    """The last line of `path` in the traceback of `error`, if the error passed through it."""
    target = os.path.abspath(path)
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(frame.filename) == target]
    return lines[-1] if lines else None


def describe(argv: list[str], error: BaseException) -> str:
    """One line saying which flag or file `error` (raised while parsing `argv`) is about."""
    path = _config_path(argv)
    chain = _chain(error)
    for e in chain:
        if isinstance(e, SyntaxError):
            same = e.filename and path and os.path.abspath(e.filename) == os.path.abspath(path)
            where = None if same or not e.filename else e.filename
            return (f'--{_CONFIG_FLAG}={path}: syntax error at line {e.lineno}'
                    + (f' of {where}' if where else '') + f': {e.msg}')
    if path is not None and not os.path.isfile(path):
        return f'--{_CONFIG_FLAG}={path}: no such file'
    if any(isinstance(e, (AttributeError, KeyError)) for e in chain):
        known = config_keys(path)
        unknown = [k for k in _override_keys(argv) if k not in known
                   and not any(c.startswith(f'{k}.') for c in known)]
        if unknown:
            return unknown_key_message(unknown[0], known)
    line = None if path is None else next(
        (n for e in chain if (n := _line_in(e, path)) is not None), None)
    first = (str(error).strip().splitlines() or [''])[0]
    if line is not None:
        return (f'--{_CONFIG_FLAG}={path}: loading it raised {type(error).__name__} at line '
                f'{line}: {first}')
    return f'bad command line: {type(error).__name__}: {first}'


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags parser for app.run, with config-file and config-key errors in one line.

    Exits 1 (as a config error does) with 'config error: ...' on stderr.
    """
    try:
        rest = app.parse_flags_with_usage(argv)
        if _CONFIG_FLAG in flags.FLAGS and flags.FLAGS[_CONFIG_FLAG].value is not None:
            # A config file that failed to load is reported only when the config is first
            # used (config_flags defers the error): use it now, while we can name the file.
            flags.FLAGS[_CONFIG_FLAG].value.to_dict()
        return rest
    except (AttributeError, KeyError, OSError, SyntaxError, ImportError, NameError, TypeError,
            ValueError) as error:
        sys.exit(f'config error: {describe(argv, error)}')
