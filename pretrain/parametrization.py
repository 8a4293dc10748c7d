"""SP, muP and depth-muP: what a parameter's role means for init, multipliers, LR and decay.

Width multiplier m = d_model / base_width; depth multiplier m_L = n_layers / base_depth.
Rules for Adam (Tensor Programs V; depth-muP with exponent alpha on top, alpha = 1/2 for
depth-muP, 1 for CompleteP). sigma is the init the model builds (model.init_std, or the
fan-in init of a `hidden_fan_in` matrix):

| role            | init          | forward mult    | LR                          | Adam eps       |
|-----------------|---------------|-----------------|-----------------------------|----------------|
| embedding       | sigma         | input_mult      | eta                         | eps/m          |
| hidden          | sigma/sqrt(m) | branch x m_L^-a | eta/m * m_L^(a-1)           | eps/m * m_L^-a |
| hidden_fan_in   | as built      | branch x m_L^-a | eta/m * m_L^(a-1)           | eps/m * m_L^-a |
| hidden_to_fixed | sigma/m       | -               | eta/m * m_L^(a-1)           | eps * m_L^-a   |
| readout         | sigma or 0    | output_mult/m   | eta                         | eps/m          |
| vector          | as built      | -               | eta (* m_L^(a-1) in blocks) | eps/m * m_L^-a |

a = alpha; the m_L factors apply under depth-muP only, and eps's m_L^-a only to parameters
inside the residual blocks.

- hidden_fan_in: a wide-to-wide matrix whose built init already scales as 1/sqrt(fan_in)
  (Mamba's dt projection, U(+-R^-0.5)); multiplying by 1/sqrt(m) again would shrink it twice.
- hidden_to_fixed: a wide-to-fixed matrix inside the network (Mamba's B and C projections,
  width -> state size N). It is an output layer in Tensor Programs V's sense, written in the
  form without a forward multiplier: init variance 1/fan_in^2 (sigma / m) and Adam LR 1/fan_in.
- Adam epsilon (scale_eps) follows each role's gradient size. Under muP the readout multiplier
  1/m makes the gradient reaching every hidden activation Theta(1/m), so the gradient of every
  parameter whose output has width in it (embedding, hidden, readout through its own 1/m
  multiplier, vectors) is Theta(1/m); a hidden_to_fixed matrix feeds a fixed-size output whose
  gradient sums over the width and stays Theta(1), so its gradient is Theta(1). Under depth-muP
  a residual branch multiplier m_L^-alpha scales the gradient of every parameter in the blocks
  by m_L^-alpha. eps is scaled by the same factors, so eps / |grad| stays at its base value.
  (A vector on a fixed-size path, e.g. Mamba-2's B/C conv, gets eps / m with a Theta(1)
  gradient: a smaller eps than needed, which is harmless; a larger one would damp updates.)

Muon (optim.name='muon') updates the matrices (hidden, hidden_fan_in, hidden_to_fixed) with
orthogonalised momentum times spectral_scale(); its spectral norm is set by that scale, not by
the gradient, so these roles drop the 1/m of the LR column (the depth factor m_L^(a-1) stays:
a block's update must still shrink with depth as under Adam) and their Adam eps does not apply.
The scale is sqrt(fan_out / fan_in) across widths (Yang, Simon & Bernstein 2023), normalised so
that at the base shape the update's RMS is optim.muon.update_rms (Liu et al. 2025). Embedding,
readout and vectors keep AdamW and the rows above. Adafactor's update is RMS-normalised like
Adam's, so it uses the Adam rows unchanged.

parametrization.role_lr_mult and role_init_mult multiply each role's LR and init columns by a
tuned constant (1.0 by default), under every parametrization: the per-layer constants that a
base-model tuning may set.

SP is the same table with m = m_L = 1 in every multiplier (input and output multipliers still
apply). Attention logits use 1/sqrt(d_head) under SP and sqrt(d_head_base)/d_head under muP,
where d_head_base is the base model's head dim: `base_head_dim`, or base_width / n_heads when
0 (the head count held fixed while widening). So the logits stay Theta(1) whether the head dim
or the head count grows, and at the base shape every multiplier is exactly 1.0 and muP
reproduces SP bit for bit (with the same weight-decay mode).
The rules read only roles (and whether a parameter sits in the residual blocks, i.e. under a
top-level 'blocks' entry), so they apply to every model family.

Weight-decay modes (optim.weight_decay_mode; lambda = optim.weight_decay):
- 'coupled' (optax adamw), 'independent' (lambda is the fraction removed per step at the peak,
  times eta_t / eta_peak), 'mup_scaled' (coupled with lambda x m for width-scaled matrices).
- 'auto' (the default): 'coupled' under SP; under muP 'independent' with the per-step fraction
  optim.lr x lambda. Coupled decay removes eta/m x lambda per step from a hidden matrix, which
  fades with width; 'auto' removes what coupled decay removes at the base width, at every width,
  and keeps lambda's torch-style meaning (lambda = 0.1 as an 'independent' value would remove
  10% of every weight per step).
"""

import dataclasses
import math

import jax

from pretrain.errors import ConfigError, check_choice

NAMES = ('sp', 'mup', 'depth_mup')
WEIGHT_DECAY_MODES = ('auto', 'coupled', 'independent', 'mup_scaled')
BLOCKS_KEY = 'blocks'


@dataclasses.dataclass(frozen=True)
class RoleRule:
    """A role's init, LR and Adam-eps multipliers as powers of m under muP."""
    init: float
    lr: float
    eps: float
    width_scaled: bool   # a matrix with the muP LR eta/m (decays like one)
    fan_out_scaled: bool  # its output size grows with the width (read by Muon's update scale)


ROLE_RULES = {
    'embedding': RoleRule(init=0.0, lr=0.0, eps=-1.0, width_scaled=False, fan_out_scaled=True),
    'hidden': RoleRule(init=-0.5, lr=-1.0, eps=-1.0, width_scaled=True, fan_out_scaled=True),
    'hidden_fan_in': RoleRule(init=0.0, lr=-1.0, eps=-1.0, width_scaled=True, fan_out_scaled=True),
    'hidden_to_fixed': RoleRule(init=-1.0, lr=-1.0, eps=0.0, width_scaled=True,
                                fan_out_scaled=False),
    'readout': RoleRule(init=0.0, lr=0.0, eps=-1.0, width_scaled=False, fan_out_scaled=False),
    'vector': RoleRule(init=0.0, lr=0.0, eps=-1.0, width_scaled=False, fan_out_scaled=False),
}
ROLES = tuple(ROLE_RULES)


@dataclasses.dataclass(frozen=True)
class Parametrization:
    name: str = 'sp'
    width_mult: float = 1.0      # m
    depth_mult: float = 1.0      # m_L
    depth_alpha: float = 0.5
    input_mult: float = 1.0
    output_mult: float = 1.0
    zero_readout: bool = False
    zero_query: bool = False     # attention query projections start at 0 (uniform attention)
    scale_eps: bool = True       # Adam eps follows each role's gradient size (table above)
    base_head_dim: float = 0.0   # d_head of the base model; 0 = this head dim / m, which is
                                 # base_width / n_heads with the head count held fixed
    role_lr: tuple[float, ...] = (1.0,) * len(ROLE_RULES)   # per-role LR multiplier, ROLES order
    role_init: tuple[float, ...] = (1.0,) * len(ROLE_RULES)  # per-role init multiplier

    @property
    def mup(self) -> bool:
        return self.name in ('mup', 'depth_mup')

    @property
    def _m(self) -> float:
        return self.width_mult if self.mup else 1.0

    @property
    def _depth_mup(self) -> bool:
        return self.name == 'depth_mup'

    @property
    def _depth_lr(self) -> float:
        return self.depth_mult ** (self.depth_alpha - 1.0) if self._depth_mup else 1.0

    # Forward multipliers (read by the model).
    def embedding_mult(self) -> float:
        return self.input_mult

    def readout_mult(self) -> float:
        return self.output_mult / self._m

    def residual_mult(self) -> float:
        return self.depth_mult ** -self.depth_alpha if self._depth_mup else 1.0

    def residual_init_depth(self, n_layers: int) -> float:
        """The depth in a residual output's sigma / sqrt(depth) init: this model's under SP and
        muP, the base model's under depth-muP (whose branch multiplier already scales depth)."""
        return n_layers / self.depth_mult if self._depth_mup else float(n_layers)

    def attn_logit_scale(self, head_dim: int) -> float:
        """1/sqrt(d_head) under SP; sqrt(d_head_base) / d_head under muP (= SP at the base)."""
        if not self.mup:
            return head_dim ** -0.5
        base = self.base_head_dim or head_dim / self.width_mult
        return head_dim ** -0.5 * math.sqrt(base / head_dim)

    # Per-parameter rules (read by init and the optimizer).
    def init_mult(self, role: str) -> float:
        if role == 'readout' and self.zero_readout:
            return 0.0
        return self.role_init[ROLES.index(role)] * self._m ** ROLE_RULES[role].init

    def lr_mult(self, role: str, in_block: bool, spectral: bool = False) -> float:
        """`spectral`: the parameter is updated by Muon, whose update scale (spectral_scale)
        already carries the width, so only the depth factor is left."""
        tuned = self.role_lr[ROLES.index(role)]
        if ROLE_RULES[role].width_scaled:
            width = 1.0 if spectral else self._m ** ROLE_RULES[role].lr
            return tuned * self._depth_lr * width
        if role == 'vector' and in_block:
            return tuned * self._depth_lr
        return tuned

    def spectral_scale(self, role: str, fan_in: int, fan_out: int, update_rms: float) -> float:
        """Muon's multiplier of an orthogonalised update of a fan_in x fan_out matrix.

        update_rms * sqrt(max(fan_in, fan_out)) at the base shape (Liu et al. 2025: the update's
        RMS matches AdamW's, so one LR serves both), and under muP proportional to
        sqrt(fan_out / fan_in) across widths (the spectral condition of Yang, Simon & Bernstein
        2023), so the update's spectral norm does not grow with the width and the LR transfers.
        Under SP the base shape is this shape. Exactly equal under SP and muP at the base shape.
        """
        m = self._m
        fan_in_base = fan_in / m
        fan_out_base = fan_out / m if ROLE_RULES[role].fan_out_scaled else float(fan_out)
        # (fan_out / fan_in) / (fan_out_base / fan_in_base), written so that it is exactly 1.0
        # at the base shape.
        ratio = (fan_out * fan_in_base) / (fan_in * fan_out_base)
        return update_rms * math.sqrt(max(fan_in_base, fan_out_base)) * math.sqrt(ratio)

    def eps_mult(self, role: str, in_block: bool) -> float:
        if not self.scale_eps:
            return 1.0
        depth = self.residual_mult() if in_block else 1.0
        return self._m ** ROLE_RULES[role].eps * depth

    def weight_decay_mode(self, mode: str) -> str:
        """optim.weight_decay_mode with 'auto' resolved: 'independent' under muP, else 'coupled'."""
        if mode != 'auto':
            return mode
        return 'independent' if self.mup else 'coupled'

    def wd_mult(self, role: str, mode: str) -> float:
        """Relative weight decay: 0 for vectors; x m for width-scaled matrices under 'mup_scaled'."""
        if role == 'vector':
            return 0.0
        return self._m if mode == 'mup_scaled' and ROLE_RULES[role].width_scaled else 1.0


def from_config(cfg) -> Parametrization:
    """The parametrization of a full config (cfg.parametrization and cfg.model)."""
    p = cfg.parametrization
    check_choice('parametrization.name', p.name, NAMES)
    width, depth = cfg.model.d_model, cfg.model.n_layers
    base_width = p.base_width or width
    base_depth = p.base_depth or depth
    if base_width < 1 or base_depth < 1:
        raise ConfigError(f'parametrization.base_width={p.base_width} and base_depth={p.base_depth} '
                          'must be positive (0 = this model)')
    if p.depth_alpha < 0:
        raise ConfigError(f'parametrization.depth_alpha={p.depth_alpha} must be >= 0')
    if p.zero_readout and cfg.model.tie_embeddings:
        raise ConfigError('parametrization.zero_readout=True needs an untied readout, but '
                          'model.tie_embeddings=True: a zero readout would zero the embedding')
    return Parametrization(name=p.name, width_mult=width / base_width, depth_mult=depth / base_depth,
                           depth_alpha=p.depth_alpha, input_mult=p.input_mult,
                           output_mult=p.output_mult, zero_readout=p.zero_readout,
                           zero_query=p.zero_query, scale_eps=p.scale_eps,
                           base_head_dim=_base_head_dim(cfg),
                           role_lr=_per_role(p, 'role_lr_mult', zero_ok=False),
                           role_init=_per_role(p, 'role_init_mult', zero_ok=True))


def _per_role(p, key: str, zero_ok: bool) -> tuple[float, ...]:
    """parametrization.<key> (role -> multiplier) as a tuple in ROLES order."""
    given = dict(p.get(key, {}))
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise ConfigError(f'parametrization.{key} has unknown roles {unknown}; the roles are '
                          f'{list(ROLES)}')
    out = []
    for role in ROLES:
        value = given.get(role, 1.0)
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if not number or not (0 <= value if zero_ok else 0 < value) or not value < math.inf:
            raise ConfigError(f'parametrization.{key}.{role}={value!r} must be a '
                              f'{"non-negative" if zero_ok else "positive"} number')
        out.append(float(value))
    return tuple(out)


def _base_head_dim(cfg) -> float:
    """parametrization.base_head_dim (0: attn_logit_scale derives base_width / n_heads)."""
    given = cfg.parametrization.base_head_dim
    if not isinstance(given, int) or isinstance(given, bool) or given < 0:
        raise ConfigError(f'parametrization.base_head_dim={given!r} must be an integer >= 0 '
                          '(0 = base_width / model.n_heads: the head count held fixed)')
    return float(given)


def in_block(path) -> bool:
    return bool(path) and getattr(path[0], 'key', None) == BLOCKS_KEY


def per_param(info, fn):
    """A tree like `info` of fn(role, in_block) for every parameter."""
    return jax.tree_util.tree_map_with_path(lambda path, i: fn(i.role, in_block(path)), info)


def scale_init(params, info, parametrization: Parametrization):
    """Applies the init multipliers to freshly built parameters (multiplying by 1.0 is exact)."""
    mults = per_param(info, lambda role, _: parametrization.init_mult(role))
    return jax.tree.map(lambda x, s: x * s if s != 1.0 else x, params, mults)
