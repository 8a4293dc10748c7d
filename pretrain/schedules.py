"""Learning-rate schedules as data: a `ScheduleSpec` with absolute step counts, made into a
jit-traceable function of the optimizer step.

Step convention: `schedule(step)` is the LR used by the optimizer update with 0-based counter
`step`, i.e. the update that turns the state after `step` updates into the one after `step + 1`.

Warmup convention: for step < warmup_steps, lr = peak * (step + 1) / warmup_steps, so the first
update already moves the weights (no wasted update at lr 0) and the last warmup update,
step = warmup_steps - 1, uses the full peak. warmup_steps = 0 means no warmup.

Decay convention: the decay starts at `decay_start` with lr = peak and reaches the floor
(peak * min_lr_ratio) at step = total_steps; later steps stay at the floor. Symmetric with the
warmup, the last update of a run of total_steps updates (step total_steps - 1) is just above it.

A spec holds absolute steps, never fractions of the run: a fraction would make a branch or an
extension of the run change the LR of steps already taken. The config may still give the warmup
and decay lengths as fractions of the run (`schedule.warmup_fraction`, `schedule.decay_fraction`)
or leave them unset (DEFAULT_FRACTIONS); `resolve_lengths` turns them into step counts before
the spec is built, so checkpoints, resume checks and branches only ever see absolute steps.
"""

import dataclasses
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pretrain.errors import ConfigError, check_choice
from pretrain.registry import Registry

# A decay shape maps progress p in [0, 1] through the decay to the fraction of (peak - floor)
# still left: 1 at p = 0, 0 at p = 1.
DecayShape = Callable[[jax.Array], jax.Array]
DECAY_SHAPES: Registry[DecayShape] = Registry('decay shape')


@DECAY_SHAPES.register('linear')
def _linear(p: jax.Array) -> jax.Array:
    return 1.0 - p


@DECAY_SHAPES.register('cosine')
def _cosine(p: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jnp.cos(jnp.pi * p))


@DECAY_SHAPES.register('1-sqrt')
def _one_minus_sqrt(p: jax.Array) -> jax.Array:
    return 1.0 - jnp.sqrt(p)


@dataclasses.dataclass(frozen=True)
class ScheduleKind:
    """Where a kind's decay starts (None: it never decays), which shape it uses, extra checks.

    Every kind is warmup -> peak -> decay to the floor at total_steps -> floor, so a new kind
    only has to place its decay.
    """

    decay_start: Callable[['ScheduleSpec'], int | None]
    decay_shape: Callable[['ScheduleSpec'], str]
    validate: Callable[['ScheduleSpec'], None] = lambda spec: None


SCHEDULES: Registry[ScheduleKind] = Registry('schedule kind')


def _check_wsd(spec: 'ScheduleSpec') -> None:
    if spec.decay_steps < 1:
        raise ConfigError(
            f'schedule.decay_steps={spec.decay_steps!r} is out of range; wsd needs '
            f'1 <= decay_steps <= total_steps - warmup_steps = '
            f'{spec.total_steps - spec.warmup_steps}.')
    if spec.warmup_steps + spec.decay_steps > spec.total_steps:
        raise ConfigError(
            f'schedule.decay_steps={spec.decay_steps!r} is out of range: warmup_steps '
            f'({spec.warmup_steps}) + decay_steps must be <= total_steps ({spec.total_steps}), '
            f'so decay_steps <= {spec.total_steps - spec.warmup_steps}.')


SCHEDULES.register('constant')(ScheduleKind(
    decay_start=lambda spec: None, decay_shape=lambda spec: 'linear'))
SCHEDULES.register('cosine')(ScheduleKind(
    decay_start=lambda spec: spec.warmup_steps, decay_shape=lambda spec: 'cosine'))
SCHEDULES.register('linear')(ScheduleKind(
    decay_start=lambda spec: spec.warmup_steps, decay_shape=lambda spec: 'linear'))
SCHEDULES.register('wsd')(ScheduleKind(
    decay_start=lambda spec: spec.total_steps - spec.decay_steps,
    decay_shape=lambda spec: spec.decay_shape,
    validate=_check_wsd))


def _as_steps(key: str, value: Any) -> int:
    """An int >= 0; integral floats (1e3 from a command line) are accepted."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ConfigError(f'{key}={value!r} must be an integer >= 0.') from None
    if value < 0:
        raise ConfigError(f'{key}={value!r} is negative; it must be an integer >= 0.')
    return value


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f'{key}={value!r} must be a number.')
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f'{key}={value!r} must be a number.') from None


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """A schedule with absolute step counts; validated on construction."""

    kind: str
    peak: float
    warmup_steps: int
    total_steps: int
    decay_steps: int = 0            # wsd only: length of the final decay
    decay_shape: str = 'linear'     # wsd only
    min_lr_ratio: float = 0.0       # floor = peak * min_lr_ratio

    def __post_init__(self) -> None:
        # Normalise types so to_dict/from_dict and equality see one representation.
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_('peak', _as_float('optim.lr', self.peak))
        set_('min_lr_ratio', _as_float('schedule.min_lr_ratio', self.min_lr_ratio))
        for name in ('warmup_steps', 'total_steps', 'decay_steps'):
            set_(name, _as_steps(f'schedule.{name}', getattr(self, name)))
        kind = SCHEDULES.get(self.kind, key='schedule.kind')
        check_choice('schedule.decay_shape', self.decay_shape, DECAY_SHAPES.names())
        if not (self.peak > 0 and math.isfinite(self.peak)):
            raise ConfigError(f'optim.lr={self.peak!r} is out of range; the peak learning rate '
                              f'must be finite and > 0.')
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f'schedule.min_lr_ratio={self.min_lr_ratio!r} is out of range; '
                              f'it must be in [0, 1].')
        if self.warmup_steps > self.total_steps:
            raise ConfigError(
                f'schedule.warmup_steps={self.warmup_steps!r} is out of range; it must be '
                f'<= total_steps ({self.total_steps}).')
        kind.validate(self)

    @property
    def floor(self) -> float:
        return self.peak * self.min_lr_ratio

    @property
    def decay_start(self) -> int | None:
        """First step of the decay (lr = peak there); None for a schedule that never decays."""
        return SCHEDULES.get(self.kind).decay_start(self)

    def stable_phase(self, step: int) -> bool:
        """True iff `step` is past warmup and before the decay: a point to branch a cooldown."""
        start = self.decay_start
        return step >= self.warmup_steps and (start is None or step < start)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; `from_dict` inverts it exactly."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'ScheduleSpec':
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f'schedule spec has unknown keys {unknown}; known: {sorted(fields)}.')
        return cls(**d)


def peak_inputs(spec: ScheduleSpec) -> dict[str, np.float32]:
    """The schedule's LR levels as float32 scalars computed in double on the host, exactly the
    values that Python constants would take in the graph: passed to a jitted step as inputs,
    runs that differ only in optim.lr share one compiled program, with bit-identical LRs."""
    return {'peak': np.float32(spec.peak), 'floor': np.float32(spec.floor),
            'span': np.float32(spec.peak - spec.floor)}


def make_schedule(spec: ScheduleSpec,
                  levels: Mapping[str, Any] | None = None) -> Callable[[jax.Array | int], jax.Array]:
    """The float32 LR as a jit-traceable function of the 0-based optimizer step. `levels`
    (peak_inputs, possibly traced) replaces the spec's peak and floor."""
    peak, floor = spec.peak, spec.floor
    span = peak - floor
    if levels is not None:
        peak, floor, span = levels['peak'], levels['floor'], levels['span']
    warmup, total = spec.warmup_steps, spec.total_steps
    start = spec.decay_start
    shape = DECAY_SHAPES.get(SCHEDULES.get(spec.kind).decay_shape(spec))

    def schedule(step: jax.Array | int) -> jax.Array:
        # float32 holds every integer step exactly up to 2**24, far beyond any run here.
        t = jnp.asarray(step).astype(jnp.float32)
        lr = jnp.full_like(t, peak)
        if start is not None:
            length = total - start
            if length > 0:
                p = jnp.clip((t - start) / length, 0.0, 1.0)
                lr = floor + span * shape(p)
            else:
                # Warmup ends exactly at total_steps: nothing to decay through.
                lr = jnp.where(t >= start, jnp.asarray(floor, jnp.float32), lr)
        if warmup > 0:
            # The ramp fraction first: the same float32 ops whether peak is a constant or an input.
            lr = jnp.where(t < warmup, peak * ((t + 1.0) / warmup), lr)
        return lr.astype(jnp.float32)

    return schedule


# Lengths used when neither a count nor a fraction is given, as fractions of total_steps.
DEFAULT_FRACTIONS = {'warmup': 0.1, 'decay': 0.2}
UNSET = -1   # the config value of a count or fraction that is not given


def _is_unset(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == UNSET


def resolve_length(schedule_cfg: Any, phase: str, total_steps: int) -> tuple[int, str]:
    """The `phase` ('warmup' or 'decay') length in steps and a phrase saying where it came from.

    `schedule.<phase>_steps` (a count) and `schedule.<phase>_fraction` (of total_steps) are
    exclusive; with neither, DEFAULT_FRACTIONS applies. A fraction rounds half up, and a
    non-zero decay fraction gives at least one step (a tiny WSD run still decays).
    """
    count_key, fraction_key = f'{phase}_steps', f'{phase}_fraction'
    count = schedule_cfg.get(count_key, UNSET)
    fraction = schedule_cfg.get(fraction_key, UNSET)
    if not _is_unset(count) and not _is_unset(fraction):
        raise ConfigError(
            f'schedule.{count_key}={count!r} and schedule.{fraction_key}={fraction!r} are both '
            f'given; set one of them (the other to -1, unset).')
    if not _is_unset(count):
        steps = _as_steps(f'schedule.{count_key}', count)
        return steps, f'schedule.{count_key}={steps}'
    source = f'schedule.{fraction_key}={fraction!r}'
    if _is_unset(fraction):
        fraction = DEFAULT_FRACTIONS[phase]
        source = f'the default {phase} fraction {fraction}'
    fraction = _as_float(f'schedule.{fraction_key}', fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f'schedule.{fraction_key}={fraction!r} is out of range; it must be in '
                          f'[0, 1] (a fraction of total_steps), or -1 for unset.')
    steps = math.floor(fraction * total_steps + 0.5)
    if phase == 'decay' and fraction > 0 and total_steps > 0:
        steps = max(steps, 1)
    return steps, f'{source} ({steps} of {total_steps} steps)'


def spec_from_config(schedule_cfg: Any, lr: float, train_steps: int) -> ScheduleSpec:
    """Builds a validated spec from `config.schedule`, `optim.lr` and `train.steps`.

    Every length is made an absolute step count here (`resolve_length`); errors about a
    length derived from a fraction name the fraction.
    """
    get = lambda key, default: schedule_cfg.get(key, default)
    total = get('total_steps', -1)
    if total == -1:
        total = _as_steps('train.steps', train_steps)
    elif isinstance(total, (int, float)) and not isinstance(total, bool) and total < 0:
        raise ConfigError(f'schedule.total_steps={total!r} is negative; use an integer >= 0, '
                          f'or -1 for train.steps.')
    total = _as_steps('schedule.total_steps', total)
    kind = get('kind', 'constant')
    warmup, warmup_source = resolve_length(schedule_cfg, 'warmup', total)
    decay, decay_source = resolve_length(schedule_cfg, 'decay', total)
    derived = 'fraction' in warmup_source or 'fraction' in decay_source
    if derived and warmup > total:
        raise ConfigError(f'the warmup, {warmup_source}, is longer than the run '
                          f'({total} steps).')
    if derived and kind == 'wsd' and warmup + decay > total:
        raise ConfigError(
            f'the warmup, {warmup_source}, and the decay, {decay_source}, add up to more than '
            f'the run ({total} steps); lower one of them.')
    return ScheduleSpec(
        kind=kind,
        peak=lr,
        warmup_steps=warmup,
        total_steps=total,
        decay_steps=decay,
        decay_shape=get('decay_shape', 'linear'),
        min_lr_ratio=get('min_lr_ratio', 0.0),
    )


def describe(spec: ScheduleSpec) -> str:
    """One line for logs."""
    head = f'{spec.kind} lr: peak {spec.peak:g}, warmup {spec.warmup_steps} steps'
    if spec.kind == 'constant':
        return f'{head}, then constant'
    start = spec.decay_start
    if spec.kind == 'wsd':
        body = (f', stable to step {start}, {spec.decay_shape} decay over '
                f'{spec.decay_steps} steps')
    else:
        body = f', {SCHEDULES.get(spec.kind).decay_shape(spec)} decay from step {start}'
    return f'{head}{body} to floor {spec.floor:g} at step {spec.total_steps}'
