"""Finished runs of other sweeps that are the same experiment as a run of this one.

Two sweeps often share points: the optimizer sweep's AdamW runs are the µTransfer sweep's µP
runs; a depth sweep's base-depth runs are a width sweep's base-width runs. Training is a pure
function of the config (the data order is a function of seed and step), so a finished run whose
resolved config equals this run's is this run's result: bit for bit when both trained on the
same code, and up to floating-point chaos when the code changed between them (a change in the
order of floating-point operations grows over a thousand steps like a different seed, only
smaller: at the µTransfer base model, runs adopted from a sweep trained at an earlier commit
differ from later ones by up to 0.012 nats, against a seed-to-seed spread of 0.016).
`--reuse_from=DIR,...` adopts such runs instead of training them again: their result.json
(renamed to this sweep's run, with `reused_from` naming the source and `code_version` the commit
it trained at), metrics and config are copied; checkpoints are not. Adopting a run trained at
another commit than the current one says so.

"Equal" compares the flattened resolved configs key by key. A key that only one side has (a
config option added to the code after the other run trained) must hold the value it has in the
sweep's base config there, so that the run without it behaved as if it had that value. Runs
that branch from a parent (cooldowns) are never adopted.
"""

import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pretrain import config as config_lib
from pretrain.errors import ConfigError
from pretrain.study import results
from pretrain.study.sweep import SPEC, Run, Sweep, run_config, run_dir

COPIED = ('metrics.jsonl', 'config.json')


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def _comparable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def same_experiment(a: Mapping[str, Any], b: Mapping[str, Any], defaults: Mapping[str, Any]) -> bool:
    """Flattened configs `a` and `b` describe the same run (see the module docstring)."""
    for key in a.keys() | b.keys():
        missing = object()
        va, vb = a.get(key, missing), b.get(key, missing)
        if va is missing or vb is missing:
            present = vb if va is missing else va
            if key not in defaults or _comparable(present) != _comparable(defaults[key]):
                return False
        elif _comparable(va) != _comparable(vb):
            return False
    return True


def finished_runs(dirs: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    """(run folder, result) of every finished, non-diverged run under each DIR/runs/."""
    found = []
    for sweep_dir in dirs:
        runs_dir = os.path.join(sweep_dir, 'runs')
        if not os.path.isdir(runs_dir):
            raise ConfigError(f'--reuse_from={sweep_dir!r}: no runs/ folder there (a sweep '
                              'workdir holds runs/NAME/result.json)')
        for name in sorted(os.listdir(runs_dir)):
            path = os.path.join(runs_dir, name)
            if results.is_done(path):
                row = results.read_json(os.path.join(path, results.RESULT))
                if row.get('status') == 'done' and isinstance(row.get('config'), dict):
                    found.append((path, row))
    return found


def adopt(sweep: Sweep, runs: Sequence[Run], workdir: str, dirs: Sequence[str],
          say: Callable[[str], None] = print) -> list[str]:
    """Copies, for each unfinished run without a parent, a finished equal run of `dirs`; returns
    the names adopted."""
    todo = [r for r in runs if not r.parent and not results.is_done(run_dir(workdir, r.name))]
    if not todo or not dirs:
        return []
    candidates = [(path, row, flatten(row['config'])) for path, row in finished_runs(dirs)
                  if os.path.abspath(os.path.dirname(os.path.dirname(path))) != os.path.abspath(workdir)]
    base = Run(name='', point={}, overrides={}, kind='run', parent=None, branch_step=0,
               heldout=False)
    defaults = flatten(config_lib.finalize(run_config(sweep, base, workdir)).to_dict())
    adopted = []
    for run in todo:
        wanted = flatten(config_lib.finalize(run_config(sweep, run, workdir)).to_dict())
        match = next((c for c in candidates if same_experiment(wanted, c[2], defaults)), None)
        if match is None:
            continue
        source, row, _ = match
        path = run_dir(workdir, run.name)
        os.makedirs(path, exist_ok=True)
        for name in COPIED:
            if os.path.exists(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
        spec = run.spec()
        results.write_json(os.path.join(path, SPEC), spec)
        row = {**row, 'name': run.name, 'kind': run.kind, 'heldout': run.heldout,
               'point': run.point, 'parent': None, 'branch_step': None,
               'overrides': spec['overrides'], 'reused_from': os.path.relpath(source, path)}
        results.write_json(os.path.join(path, results.RESULT), row)   # last: marks it done
        adopted.append(run.name)
        trained_at, now = row.get('code_version', 'unknown'), results.code_version()
        say(f'[sweep] {run.name}: reused from {source}' + (
            '' if trained_at == now else
            f' (trained at code {trained_at}, this is {now}: equal up to floating-point chaos)'))
    return adopted
