"""Hyper-parameter transfer: derive a target run's optimizer values from a reference run.

`scaling.rule` picks one rule; `apply(cfg, N)` returns the config values it sets and a
human-readable explanation (every input, the formula, every output). Units: batch sizes B and
training tokens D in tokens (sequences x seq_len), lambda torch-style (the coupled decay
coefficient of optax.adamw: p -= eta * lambda * p per step), N non-embedding parameters.
The target's D is train.steps * train.global_batch_size * data.seq_len.

Rules (k = B / B0, the target's batch over the reference's, in tokens):
- 'none':            nothing changes.
- 'sqrt_adam':       Malladi et al. 2022: lr x sqrt(k), (1 - b1) x k, (1 - b2) x k, eps / sqrt(k);
                     betas clamped into [0, BETA_MAX]. EMA momentum rho -> rho^k (Busbridge et
                     al. 2023) when scaling.ref_ema_momentum > 0. Weight decay is kept (then the
                     AdamW timescale tau = B / (eta lambda D) changes), or with
                     scaling.sqrt_adam_keep_timescale set so that tau is kept at the same D:
                     lambda x sqrt(k) (torch-style lambda), x k for 'independent' decay.
- 'linear_sgd':      lr x k (and the same EMA rule).
- 'adamw_timescale': Wang & Aitchison 2024, Bergsma et al. 2025: keeps tau = B / (eta lambda D)
                     and solves for the target's lambda; eta is the target's optim.lr. With
                     scaling.timescale_power = p != 0, tau follows tau ∝ (D/N)^p instead (Power
                     Lines report p ~ -0.5).
- 'step_law':        Li et al. 2025: eta = 1.79 N^-0.713 D^0.307, B = 0.58 D^0.571 tokens.
- 'deepseek':        DeepSeek LLM 2024: eta = 0.3118 C^-0.125, B = 0.2920 C^0.3271 tokens,
                     C = M D, M = 72 n_layers d^2 + 12 n_layers d seq_len (FLOPs per token).
The last two set the batch size in sequences (round(B / seq_len), at least 1, a multiple of
`batch_multiple`) and, with scaling.keep_tokens, train.steps so that the run still trains on
the D the law was evaluated at.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from pretrain.errors import ConfigError, check_choice
from pretrain.registry import Registry

# A beta of exactly 1 never forgets (and optim.validate rejects it); the sqrt rule at small k
# can round up to it.
BETA_MAX = 1.0 - 1e-6
# DeepSeek LLM's M counts the attention score/value matmuls per token with this coefficient
# (M = 72 n_layer d^2 + 12 n_layer d l_seq, their eq. for non-embedding FLOPs per token).
DEEPSEEK_ATTN_COEF = 12

# HParams field -> the config key it is written to (ema_momentum has no config key yet).
CONFIG_KEYS = {
    'lr': 'optim.lr',
    'weight_decay': 'optim.weight_decay',
    'b1': 'optim.b1',
    'b2': 'optim.b2',
    'eps': 'optim.eps',
    'global_batch_size': 'train.global_batch_size',
}


def default_config() -> dict:
    """The `scaling` config section; reference values of 0 mean 'not given'."""
    return dict(
        # 'none' | 'sqrt_adam' | 'linear_sgd' | 'adamw_timescale' | 'step_law' | 'deepseek'
        rule='none',
        ref_global_batch_size=0,   # reference batch, in sequences of ref_seq_len tokens
        ref_seq_len=0,             # 0 = the target's data.seq_len
        ref_lr=0.0,                # reference peak learning rate
        ref_weight_decay=0.0,      # reference lambda, torch-style (coupled, as optax.adamw)
        ref_b1=0.9,
        ref_b2=0.95,
        ref_eps=1e-8,
        ref_tokens=0,              # reference training tokens D0
        ref_params=0,              # reference non-embedding parameters N0
        ref_ema_momentum=0.0,      # reference EMA momentum rho; 0 = no EMA
        timescale_power=0.0,       # adamw_timescale: tau ∝ (D/N)^p; 0 = keep tau (-0.5 reported)
        keep_tokens=True,          # step_law/deepseek: also set train.steps to keep D
        sqrt_adam_keep_timescale=False,  # sqrt_adam: also scale weight decay to keep tau
    )


@dataclasses.dataclass(frozen=True)
class HParams:
    """Optimizer values of one run; global_batch_size in sequences."""
    lr: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    global_batch_size: int
    ema_momentum: float | None = None


def ema_momentum(rho: float, k: float) -> float:
    """EMA momentum for a batch k times larger (Busbridge et al. 2023): rho^k.

    k steps of rho at batch B see the same samples as one step at batch kB.
    """
    if not 0.0 <= rho < 1.0:
        raise ValueError(f'EMA momentum {rho} must be in [0, 1)')
    if k <= 0:
        raise ValueError(f'batch ratio k={k} must be > 0')
    return rho ** k


def reference_from_config(scaling_cfg) -> tuple[HParams, dict]:
    """The reference run: its HParams and {'seq_len', 'tokens', 'params'} (0 = not given)."""
    s = scaling_cfg
    ema = float(s.ref_ema_momentum) if s.ref_ema_momentum > 0 else None
    ref = HParams(lr=float(s.ref_lr), weight_decay=float(s.ref_weight_decay), b1=float(s.ref_b1),
                  b2=float(s.ref_b2), eps=float(s.ref_eps),
                  global_batch_size=int(s.ref_global_batch_size), ema_momentum=ema)
    return ref, dict(seq_len=int(s.ref_seq_len), tokens=int(s.ref_tokens), params=int(s.ref_params))


# Which reference values each rule reads (validated as > 0).
_NEEDS = {
    'none': (),
    'sqrt_adam': ('ref_global_batch_size', 'ref_lr', 'ref_eps'),
    'linear_sgd': ('ref_global_batch_size', 'ref_lr'),
    'adamw_timescale': ('ref_global_batch_size', 'ref_lr', 'ref_weight_decay', 'ref_tokens'),
    'step_law': (),
    'deepseek': (),
}


# The optimizers (optim.name) each rule has a meaning for, and why not the others.
_OPTIMIZERS = {
    'none': (('adamw', 'muon', 'adafactor'), ''),
    'sqrt_adam': (('adamw',), "it scales Adam's second-moment decay b2 and eps"),
    'linear_sgd': (('adamw',), 'it is an SGD rule, kept for AdamW only as a baseline'),
    # tau = B / (eta lambda D) is the timescale of decoupled decay p <- (1 - eta lambda) p,
    # whatever the update; every optimizer here decays that way.
    'adamw_timescale': (('adamw', 'muon', 'adafactor'), ''),
    'step_law': (('adamw',), 'its constants were fitted on AdamW runs'),
    'deepseek': (('adamw',), 'its constants were fitted on AdamW runs'),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(cfg) -> None:
    """Raises ConfigError naming the scaling key that the chosen rule needs and lacks."""
    s = cfg.scaling
    check_choice('scaling.rule', s.rule, RULES.names())
    for key in ('ref_global_batch_size', 'ref_seq_len', 'ref_tokens', 'ref_params'):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 0:
            raise ConfigError(f'scaling.{key}={s[key]!r} must be an integer >= 0 (0 = not given)')
    for key in ('ref_lr', 'ref_weight_decay', 'ref_eps', 'timescale_power'):
        if not _is_number(s[key]):
            raise ConfigError(f'scaling.{key}={s[key]!r} must be a finite number')
    for key in ('keep_tokens', 'sqrt_adam_keep_timescale'):
        if not isinstance(s[key], bool):
            raise ConfigError(f'scaling.{key}={s[key]!r} must be True or False')
    for key in ('ref_ema_momentum', 'ref_b1', 'ref_b2'):
        if not _is_number(s[key]) or not 0.0 <= s[key] < 1.0:
            raise ConfigError(f'scaling.{key}={s[key]!r} must be in [0, 1)')
    allowed, why = _OPTIMIZERS[s.rule]
    if cfg.optim.name not in allowed:
        raise ConfigError(f'scaling.rule={s.rule!r} cannot be used with optim.name='
                          f'{cfg.optim.name!r} ({why}); it allows optim.name in {list(allowed)}')
    needs = list(_NEEDS[s.rule])
    if s.rule == 'adamw_timescale' and s.timescale_power != 0:
        needs.append('ref_params')
    for key in needs:
        if not s[key] > 0:
            raise ConfigError(f"scaling.rule={s.rule!r} needs scaling.{key} > 0 (got {s[key]!r})")
    if s.rule == 'adamw_timescale' and not cfg.optim.lr > 0:
        raise ConfigError(f"scaling.rule='adamw_timescale' needs optim.lr > 0 (the target's "
                          f'eta; got {cfg.optim.lr!r})')


@dataclasses.dataclass(frozen=True)
class _Context:
    """Everything a rule reads, resolved from the config."""
    cfg: Any
    ref: HParams
    ref_seq_len: int       # resolved: the target's when scaling.ref_seq_len is 0
    ref_tokens: int
    ref_params: int
    target: HParams        # the target config's values before the rule
    seq_len: int
    tokens: int            # target D
    params: int            # target N (non-embedding)
    batch_multiple: int

    @property
    def ref_batch_tokens(self) -> int:
        return self.ref.global_batch_size * self.ref_seq_len

    @property
    def batch_tokens(self) -> int:
        return self.target.global_batch_size * self.seq_len


# A rule returns ({HParams field or 'train.steps': value}, explanation lines).
Rule = Callable[[_Context], tuple[dict[str, Any], list[str]]]
RULES: Registry[Rule] = Registry('scaling.rule')


def _g(x: float) -> str:
    return f'{x:.6g}'


@RULES.register('none')
def _none(c: _Context) -> tuple[dict[str, Any], list[str]]:
    return {}, ['no change: the config values are used as they are']


def _batch_ratio(c: _Context) -> tuple[float, list[str]]:
    k = c.batch_tokens / c.ref_batch_tokens
    r, t = c.ref, c.target
    return k, [f'B0 = {r.global_batch_size} seq x {c.ref_seq_len} tokens = '
               f'{c.ref_batch_tokens} tokens',
               f'B = {t.global_batch_size} seq x {c.seq_len} tokens = {c.batch_tokens} tokens',
               f'k = B / B0 = {_g(k)}']


def _ema(c: _Context, k: float) -> tuple[dict[str, Any], list[str]]:
    if c.ref.ema_momentum is None:
        return {}, []
    rho = ema_momentum(c.ref.ema_momentum, k)
    return {'ema_momentum': rho}, [
        f'ema_momentum = rho0^k = {_g(c.ref.ema_momentum)}^{_g(k)} = {_g(rho)} '
        '(Busbridge et al. 2023)']


def _scale_beta(name: str, beta0: float, k: float) -> tuple[float, list[str]]:
    raw = 1.0 - (1.0 - beta0) * k
    beta = min(max(raw, 0.0), BETA_MAX)
    line = f'{name} = 1 - (1 - {_g(beta0)}) * k = {_g(raw)}'
    if beta != raw:
        line += f' -> clamped to {_g(beta)} (must stay in [0, 1); the rule does not hold here)'
    return beta, [line]


@RULES.register('sqrt_adam')
def _sqrt_adam(c: _Context) -> tuple[dict[str, Any], list[str]]:
    k, lines = _batch_ratio(c)
    r = c.ref
    out = dict(lr=r.lr * math.sqrt(k), eps=r.eps / math.sqrt(k))
    lines.append(f'optim.lr = ref_lr * sqrt(k) = {_g(r.lr)} * {_g(math.sqrt(k))} = {_g(out["lr"])}')
    for name, beta0 in (('b1', r.b1), ('b2', r.b2)):
        out[name], beta_lines = _scale_beta(f'optim.{name}', beta0, k)
        lines += beta_lines
    lines.append(f'optim.eps = ref_eps / sqrt(k) = {_g(r.eps)} / {_g(math.sqrt(k))} = '
                 f'{_g(out["eps"])}')
    wd, wd_lines = _sqrt_adam_decay(c, k)
    ema, ema_lines = _ema(c, k)
    return out | wd | ema, lines + wd_lines + ema_lines


def _sqrt_adam_decay(c: _Context, k: float) -> tuple[dict[str, Any], list[str]]:
    """Weight decay under the square-root rule: kept, or scaled so that tau = B/(eta lambda D)
    stays at the same D (eta lambda x k per step: lambda x sqrt(k) when decay is coupled to the
    LR, x k when optim.weight_decay is itself the per-step fraction ('independent')."""
    wd0 = c.target.weight_decay
    independent = c.cfg.optim.weight_decay_mode == 'independent'
    factor, formula = (k, 'k') if independent else (math.sqrt(k), 'sqrt(k)')
    if not c.cfg.scaling.sqrt_adam_keep_timescale:
        return {}, [f'optim.weight_decay = {_g(wd0)} (kept: scaling.sqrt_adam_keep_timescale is '
                    f'False, so the AdamW timescale tau = B / (eta lambda D) changes by x '
                    f'{formula} = {_g(factor)})']
    wd = wd0 * factor
    why = ("weight_decay_mode='independent': lambda is the per-step decay" if independent
           else 'torch-style lambda, applied as eta * lambda per step')
    return {'weight_decay': wd}, [
        f'optim.weight_decay = weight_decay * {formula} = {_g(wd0)} * {_g(factor)} = {_g(wd)} '
        f'(keeps tau = B / (eta lambda D) at the same D; {why})']


@RULES.register('linear_sgd')
def _linear_sgd(c: _Context) -> tuple[dict[str, Any], list[str]]:
    k, lines = _batch_ratio(c)
    lr = c.ref.lr * k
    lines.append(f'optim.lr = ref_lr * k = {_g(c.ref.lr)} * {_g(k)} = {_g(lr)}')
    ema, ema_lines = _ema(c, k)
    return {'lr': lr} | ema, lines + ema_lines


@RULES.register('adamw_timescale')
def _adamw_timescale(c: _Context) -> tuple[dict[str, Any], list[str]]:
    r = c.ref
    b0, b = c.ref_batch_tokens, c.batch_tokens
    tau0 = b0 / (r.lr * r.weight_decay * c.ref_tokens)
    lines = [f'tau0 = B0 / (eta0 * lambda0 * D0) = {b0} / ({_g(r.lr)} * {_g(r.weight_decay)} * '
             f'{c.ref_tokens}) = {_g(tau0)}']
    tau = tau0
    p = c.cfg.scaling.timescale_power
    if p != 0:
        if c.params <= 0:
            raise ConfigError('scaling.timescale_power != 0 needs the non-embedding parameter '
                              f'count of the target model (got {c.params})')
        tpp0, tpp = c.ref_tokens / c.ref_params, c.tokens / c.params
        tau = tau0 * (tpp / tpp0) ** p
        lines.append(f'tau = tau0 * ((D/N) / (D0/N0))^p = {_g(tau0)} * ({_g(tpp)} / '
                     f'{_g(tpp0)})^{_g(p)} = {_g(tau)} (N0 = {c.ref_params}, N = {c.params})')
    else:
        lines.append(f'tau = tau0 = {_g(tau)} (scaling.timescale_power = 0: tau kept)')
    eta = c.target.lr
    per_step = b / (tau * c.tokens)  # eta * lambda: the fraction of the weights decayed per step
    mode = c.cfg.optim.weight_decay_mode
    if mode == 'independent':
        # This mode decays by lambda itself each step (not eta * lambda).
        wd = per_step
        lines.append(f'optim.weight_decay = B / (tau * D) = {b} / ({_g(tau)} * {c.tokens}) = '
                     f"{_g(wd)} (weight_decay_mode='independent': lambda is the per-step decay; "
                     f'torch-style {_g(per_step / eta)})')
    else:
        wd = per_step / eta
        note = (" (weight_decay_mode='auto': torch-style lambda, applied as eta * lambda per step)"
                if mode == 'auto' else '')
        lines.append(f'optim.weight_decay = B / (eta * tau * D) = {b} / ({_g(eta)} * {_g(tau)} * '
                     f'{c.tokens}) = {_g(wd)} (eta = the target optim.lr){note}')
    return {'weight_decay': wd}, lines


def _batch_from_tokens(c: _Context, b_opt: float) -> tuple[dict[str, Any], list[str]]:
    """Sequences per batch for B_opt tokens and, with keep_tokens, the steps that keep D."""
    m = c.batch_multiple
    seqs = max(m, m * round(b_opt / c.seq_len / m))
    out: dict[str, Any] = {'global_batch_size': seqs}
    lines = [f'train.global_batch_size = round(B_opt / seq_len) = round({_g(b_opt)} / {c.seq_len})'
             + (f' to a multiple of {m}' if m > 1 else '') + f' = {seqs} sequences']
    if c.cfg.scaling.keep_tokens:
        steps = max(1, round(c.tokens / (seqs * c.seq_len)))
        out['train.steps'] = steps
        lines.append(f'train.steps = round(D / (batch * seq_len)) = round({c.tokens} / ({seqs} * '
                     f'{c.seq_len})) = {steps} (keeps D; schedule step counts are not changed)')
    else:
        lines.append(f'train.steps = {c.cfg.train.steps} (kept: the run trains on '
                     f'{c.cfg.train.steps * seqs * c.seq_len} tokens, not D)')
    return out, lines


@RULES.register('step_law')
def _step_law(c: _Context) -> tuple[dict[str, Any], list[str]]:
    n, d = c.params, c.tokens
    if n <= 0:
        raise ConfigError(f"scaling.rule='step_law' needs the target's non-embedding parameter "
                          f'count (got {n})')
    lr = 1.79 * n ** -0.713 * d ** 0.307
    b_opt = 0.58 * d ** 0.571
    lines = [f'N = {n} non-embedding parameters, D = {d} tokens',
             f'optim.lr = 1.79 * N^-0.713 * D^0.307 = {_g(lr)}',
             f'B_opt = 0.58 * D^0.571 = {_g(b_opt)} tokens']
    batch, batch_lines = _batch_from_tokens(c, b_opt)
    return {'lr': lr} | batch, lines + batch_lines


def deepseek_flops_per_token(n_layers: int, d_model: int, seq_len: int) -> int:
    """DeepSeek LLM's M: non-embedding training FLOPs per token, attention included."""
    return 72 * n_layers * d_model ** 2 + DEEPSEEK_ATTN_COEF * n_layers * d_model * seq_len


@RULES.register('deepseek')
def _deepseek(c: _Context) -> tuple[dict[str, Any], list[str]]:
    n_layers, d_model, l_seq = c.cfg.model.n_layers, c.cfg.model.d_model, c.seq_len
    m = deepseek_flops_per_token(n_layers, d_model, l_seq)
    compute = m * c.tokens
    lr = 0.3118 * compute ** -0.125
    b_opt = 0.2920 * compute ** 0.3271
    a = DEEPSEEK_ATTN_COEF
    lines = [f'M = 72 * n_layers * d^2 + {a} * n_layers * d * seq_len = 72 * {n_layers} * '
             f'{d_model}^2 + {a} * {n_layers} * {d_model} * {l_seq} = {m} FLOPs/token',
             f'C = M * D = {m} * {c.tokens} = {_g(compute)} FLOPs',
             f'optim.lr = 0.3118 * C^-0.125 = {_g(lr)}',
             f'B_opt = 0.2920 * C^0.3271 = {_g(b_opt)} tokens']
    batch, batch_lines = _batch_from_tokens(c, b_opt)
    return {'lr': lr} | batch, lines + batch_lines


_CITATIONS = {
    'none': 'no scaling',
    'sqrt_adam': 'square-root rule for Adam, Malladi et al. 2022',
    'linear_sgd': 'linear rule for SGD',
    'adamw_timescale': 'AdamW timescale, Wang & Aitchison 2024; Bergsma et al. 2025',
    'step_law': 'Step Law, Li et al. 2025',
    'deepseek': 'DeepSeek LLM 2024 fitted laws',
}


def _context(cfg, non_embedding_params: int, batch_multiple: int) -> _Context:
    ref, info = reference_from_config(cfg.scaling)
    o, t, seq_len = cfg.optim, cfg.train, cfg.data.seq_len
    target = HParams(lr=o.lr, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                     global_batch_size=t.global_batch_size)
    return _Context(cfg=cfg, ref=ref, ref_seq_len=info['seq_len'] or seq_len,
                    ref_tokens=info['tokens'], ref_params=info['params'], target=target,
                    seq_len=seq_len, tokens=t.steps * t.global_batch_size * seq_len,
                    params=int(non_embedding_params), batch_multiple=batch_multiple)


def _derive(cfg, non_embedding_params: int, batch_multiple: int
            ) -> tuple[HParams, dict[str, Any], str]:
    validate(cfg)
    if not isinstance(batch_multiple, int) or batch_multiple < 1:
        raise ValueError(f'batch_multiple={batch_multiple!r} must be an integer >= 1')
    c = _context(cfg, non_embedding_params, batch_multiple)
    rule = cfg.scaling.rule
    changes, lines = RULES.get(rule, 'scaling.rule')(c)
    t = c.target
    header = [f"scaling rule '{rule}' ({_CITATIONS[rule]})",
              f'target config: N = {c.params}, D = {t.global_batch_size} seq x {c.seq_len} '
              f'tokens x {cfg.train.steps} steps = {c.tokens} tokens; lr = {_g(t.lr)}, '
              f'weight_decay = {_g(t.weight_decay)} ({cfg.optim.weight_decay_mode}), '
              f'b1 = {_g(t.b1)}, b2 = {_g(t.b2)}, eps = {_g(t.eps)}']
    if rule in ('sqrt_adam', 'linear_sgd', 'adamw_timescale'):
        r = c.ref
        header.append(f'reference: batch = {r.global_batch_size} seq x {c.ref_seq_len} tokens, '
                      f'lr = {_g(r.lr)}, weight_decay = {_g(r.weight_decay)}, b1 = {_g(r.b1)}, '
                      f'b2 = {_g(r.b2)}, eps = {_g(r.eps)}, D0 = {c.ref_tokens} tokens, '
                      f'N0 = {c.ref_params}, ema_momentum = {r.ema_momentum}')
    fields = {k: v for k, v in changes.items() if k in CONFIG_KEYS or k == 'ema_momentum'}
    result = dataclasses.replace(t, **fields)
    config_changes = {CONFIG_KEYS[k]: v for k, v in changes.items() if k in CONFIG_KEYS}
    config_changes |= {k: v for k, v in changes.items() if k.startswith('train.')}
    summary = ', '.join(f'{k} = {_g(v)}' for k, v in sorted(config_changes.items())) or 'nothing'
    if result.ema_momentum is not None:
        summary += f'; ema_momentum = {_g(result.ema_momentum)}'
    text = '\n'.join(header + ['  ' + line for line in lines] + [f'sets: {summary}'])
    return result, config_changes, text


def apply(cfg, non_embedding_params: int, *, batch_multiple: int = 1
          ) -> tuple[dict[str, Any], str]:
    """Runs cfg.scaling.rule on the target config; returns ({config key: value}, explanation).

    Keys are among CONFIG_KEYS' values and 'train.steps'; only what the rule sets is present.
    `batch_multiple` rounds a derived batch size to a multiple (e.g. the data-parallel size).
    The EMA momentum is not a config key: read it from `target_hparams` (or the explanation).
    """
    _, changes, text = _derive(cfg, non_embedding_params, batch_multiple)
    return changes, text


def target_hparams(cfg, non_embedding_params: int, *, batch_multiple: int = 1) -> HParams:
    """The target's full HParams after the rule, including the scaled EMA momentum."""
    return _derive(cfg, non_embedding_params, batch_multiple)[0]
