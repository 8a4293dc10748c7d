"""The sweep language: declare a study's runs once, as points over config overrides.

A sweep file (configs/sweeps/*.py) defines `get_sweep()` returning a `Sweep`: a base config file,
points (dicts of dotted overrides, built with `product` and `zipped`), overrides shared by all
points, an optional `derive(point)` for values that follow from the point (e.g. d_ff from
d_model), optional cooldown families, and optional held-out points that fits must not see.

Each run gets a stable name made of its point's values (`d_model=64,lr=0.003`), so adding points
never renames a run. With `Cooldowns`, each point becomes one constant-LR run ('parent') of the
longest budget plus one WSD cooldown per budget branched from its checkpoints
(`schedule.branch_from`); several `Cooldowns` (other fractions or shapes) share that parent.
"""

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pretrain import config as config_lib
from pretrain import schedules
from pretrain.errors import ConfigError

Point = dict[str, Any]
SPEC = 'sweep_run.json'          # a run's spec, written when it starts: its overrides are checked
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def product(*factors: Mapping[str, Sequence[Any]] | Sequence[Point]) -> list[Point]:
    """Cartesian product. A factor is {key: [values]} (a grid over its keys) or a list of points."""
    lists = []
    for f in factors:
        if isinstance(f, Mapping):
            keys = list(f)
            lists.append([dict(zip(keys, vals)) for vals in itertools.product(*f.values())])
        else:
            lists.append([dict(p) for p in f])
    return [{k: v for p in combo for k, v in p.items()} for combo in itertools.product(*lists)]


def zipped(values: Mapping[str, Sequence[Any]]) -> list[Point]:
    """Keys varied together: {'a': [1, 2], 'b': [3, 4]} -> [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]."""
    lengths = {k: len(v) for k, v in values.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f'zipped: all value lists must have the same length, got {lengths}')
    return [dict(zip(values, vals)) for vals in zip(*values.values())]


@dataclasses.dataclass(frozen=True)
class Cooldowns:
    """Per point: a constant-LR run of max(budgets) steps and a cooldown branched per budget."""

    budgets: Sequence[int]
    fraction: float = 0.2            # of each budget spent decaying
    shape: str = '1-sqrt'            # schedule.decay_shape of the cooldown
    heldout: bool = False            # run, but no fit sees them: laws fitted on the rest predict them


@dataclasses.dataclass(frozen=True)
class Sweep:
    base: str                                    # config file, relative to the repository root
    points: Sequence[Point] = ({},)
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    derive: Callable[[Point], Point] | None = None
    # Several Cooldowns (other fractions or shapes) share one parent per point.
    cooldowns: Cooldowns | Sequence[Cooldowns] | None = None
    heldout: Sequence[Point] = ()                # run like the others, excluded from fits


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    point: Point                    # the values that name it
    overrides: Point                # everything set on top of the base config
    kind: str = 'run'               # 'run' (a full schedule) | 'parent' (constant LR) | 'cooldown'
    parent: str | None = None       # the run a cooldown branches from, and where
    branch_step: int = 0
    heldout: bool = False

    def spec(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, 'g')
    return re.sub(r'[^A-Za-z0-9.+-]', '-', str(value))


def point_name(point: Point) -> str:
    """`d_model=64,lr=0.003`: the last part of each key, or the whole key where that is ambiguous."""
    if not point:
        return 'base'
    leaves = [k.rsplit('.', 1)[-1] for k in point]
    return ','.join(f'{leaf if leaves.count(leaf) == 1 else key}={_fmt(v)}'
                    for key, leaf, v in zip(point, leaves, point.values()))


def expand(sweep: Sweep) -> list[Run]:
    """The runs of a sweep, parents before their cooldowns; names are unique and stable."""
    runs: list[Run] = []
    for point, heldout in [(p, False) for p in sweep.points] + [(p, True) for p in sweep.heldout]:
        point = dict(point)
        overrides = {**sweep.fixed, **point, **(sweep.derive(point) if sweep.derive else {})}
        name = point_name(point)
        if sweep.cooldowns is None:
            runs.append(Run(name, point, overrides, heldout=heldout))
            continue
        families = ([sweep.cooldowns] if isinstance(sweep.cooldowns, Cooldowns)
                    else list(sweep.cooldowns))
        plans = [_cooldown_plan(cd, len(families) > 1) for cd in families]
        longest = max(b for plan in plans for b, _, _ in plan)
        every = math.gcd(*(branch for plan in plans for _, branch, _ in plan))
        overrides.update(_pinned_warmup(sweep, overrides, longest))
        parent = f'{name}.constant'
        runs.append(Run(parent, point, {
            **overrides, 'train.steps': longest, 'schedule.kind': 'constant',
            # Checkpoints at every branch step, kept for the cooldowns (also ones added later).
            'checkpoint.every_steps': every, 'checkpoint.keep_every': every},
            kind='parent', heldout=heldout))
        for cd, plan in zip(families, plans):
            for b, branch, suffix in plan:
                runs.append(Run(f'{name}.cooldown{b}{suffix}', point, {
                    **overrides, 'train.steps': b, 'schedule.kind': 'wsd',
                    'schedule.total_steps': b, 'schedule.decay_steps': b - branch,
                    'schedule.decay_shape': cd.shape},
                    kind='cooldown', parent=parent, branch_step=branch,
                    heldout=heldout or cd.heldout))
    seen: dict[str, Point] = {}
    for r in runs:
        if r.name in seen:
            raise ConfigError(f'two points of the sweep get the same run name {r.name!r}: {seen[r.name]} '
                              f'and {r.point}; make their values differ in the name')
        seen[r.name] = r.point
    return runs


def _pinned_warmup(sweep: Sweep, overrides: Point, parent_steps: int) -> Point:
    """A parent and its cooldowns must share one warmup; a warmup given as a fraction (or left to
    the default) would follow each run's own length, so it is pinned to the parent's steps."""
    if overrides.get('schedule.warmup_steps', schedules.UNSET) != schedules.UNSET:
        return {}
    base = sweep.base if os.path.isabs(sweep.base) else os.path.join(ROOT, sweep.base)
    cfg = config_lib.with_overrides(_import(base, 'sweep_base_config').get_config(),
                                    {**overrides, 'train.steps': parent_steps})
    if cfg.schedule.warmup_steps != schedules.UNSET:   # a count in the base config: shared already
        return {}
    steps, _ = schedules.resolve_length(cfg.schedule, 'warmup', parent_steps)
    return {'schedule.warmup_steps': steps, 'schedule.warmup_fraction': float(schedules.UNSET)}


def _cooldown_plan(cd: Cooldowns, suffixed: bool) -> list[tuple[int, int, str]]:
    """(budget, branch step, name suffix) per budget; the suffix names the shape and fraction
    when a sweep has several Cooldowns, so that their runs' names differ."""
    budgets = sorted(set(int(b) for b in cd.budgets))
    if not budgets or budgets[0] < 2 or not 0 < cd.fraction < 1:
        raise ConfigError(f'Cooldowns(budgets={list(cd.budgets)}, fraction={cd.fraction}): '
                          'budgets must be integers >= 2 and fraction in (0, 1)')
    suffix = f'-{_fmt(cd.shape)}-{_fmt(float(cd.fraction))}' if suffixed else ''
    return [(b, b - max(1, round(cd.fraction * b)), suffix) for b in budgets]


def load(path: str) -> Sweep:
    """Imports a sweep file and calls its get_sweep()."""
    if not os.path.isfile(path):
        raise ConfigError(f'--sweep={path!r}: no such file')
    try:
        module = _import(path, 'sweep_definition')
    except SyntaxError as e:
        raise ConfigError(f'--sweep={path!r}: syntax error at line {e.lineno}: {e.msg}') from None
    if not hasattr(module, 'get_sweep'):
        raise ConfigError(f'--sweep={path!r} must define get_sweep() returning pretrain.study.sweep.Sweep')
    sweep = module.get_sweep()
    if not isinstance(sweep, Sweep):
        raise ConfigError(f'{path}: get_sweep() returned {type(sweep).__name__}, expected Sweep')
    return sweep


def _import(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_config(sweep: Sweep, run: Run, workdir: str):
    """The run's locked config; a cooldown's branch_from points at its parent's workdir."""
    base = sweep.base if os.path.isabs(sweep.base) else os.path.join(ROOT, sweep.base)
    if not os.path.isfile(base):
        raise ConfigError(f'Sweep.base={sweep.base!r}: no such config file')
    overrides = dict(run.overrides)
    if run.parent:
        overrides['schedule.branch_from'] = f'{run_dir(workdir, run.parent)}@{run.branch_step}'
    try:
        return config_lib.with_overrides(_import(base, 'sweep_base_config').get_config(), overrides)
    except (AttributeError, KeyError) as e:
        raise ConfigError(f'run {run.name!r}: an override names no config key ({e}); '
                          f'overrides: {sorted(overrides)}') from None


def check(sweep: Sweep, runs: Sequence[Run], workdir: str, num_devices: int) -> None:
    """Every run's config is valid and no existing run changed: before anything trains."""
    from model_zoo import FAMILIES   # the study layer sits above the families

    for r in runs:
        cfg = config_lib.finalize(run_config(sweep, r, workdir))
        try:
            config_lib.validate(cfg, FAMILIES.get(cfg.model.family, 'model.family'),
                                num_devices=num_devices)
        except ConfigError as e:
            raise ConfigError(f'run {r.name!r}: {e}') from None
        path = os.path.join(run_dir(workdir, r.name), SPEC)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            if old['overrides'] != r.spec()['overrides']:
                raise ConfigError(
                    f'run {r.name!r} in {workdir} was started with other overrides: {old["overrides"]} '
                    f'(now {r.spec()["overrides"]}). Use a new --workdir, or delete that run')


def shard(runs: Sequence[Run], index: int, count: int) -> list[Run]:
    """Shard `index` of `count`: whole families (a parent with its cooldowns) round robin."""
    families = list(dict.fromkeys(r.parent or r.name for r in runs))
    mine = set(families[index::count])
    return [r for r in runs if (r.parent or r.name) in mine]

def only(runs: Sequence[Run], pattern: str) -> list[Run]:
    """The runs whose name contains a match of the regular expression `pattern`, with the parents
    of the cooldowns among them (a cooldown needs its parent's checkpoint), in sweep order."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f'--only={pattern!r} is not a regular expression: {e}') from None
    chosen = {r.name for r in runs if regex.search(r.name)}
    chosen |= {r.parent for r in runs if r.name in chosen and r.parent}
    if not chosen:
        raise ConfigError(f'--only={pattern!r} matches no run of the sweep; its first runs: '
                          + ', '.join(r.name for r in runs[:3]))
    return [r for r in runs if r.name in chosen]


def run_dir(workdir: str, name: str) -> str:
    """WORKDIR/runs/NAME: where a run trains, checkpoints and leaves its result."""
    return os.path.join(os.path.abspath(workdir), 'runs', name)


