"""SP, muP and depth-muP: what a parameter's role means for init, multipliers, LR and decay.

Width multiplier m = d_model / base_width; depth multiplier m_L = n_layers / base_depth.
Rules for Adam (Tensor Programs V; depth-muP with exponent alpha on top, alpha = 1/2 for
depth-muP, 1 for CompleteP):

| role      | init            | forward multiplier     | LR                             |
|-----------|-----------------|------------------------|--------------------------------|
| embedding | sigma           | input_mult             | eta                            |
| hidden    | sigma / sqrt(m) | branch x m_L^-alpha    | eta / m * m_L^(alpha - 1)      |
| readout   | sigma or 0      | output_mult / m        | eta                            |
| vector    | (as built)      | -                      | eta (* m_L^(alpha-1) in blocks)|

SP is the same table with m = m_L = 1 in every multiplier (input and output multipliers still
apply). Attention logits use 1/sqrt(d_head) under SP and sqrt(d_head_base)/d_head under muP, so
at m = 1 every multiplier is exactly 1.0 and muP reproduces SP bit for bit.
The rules read only roles (and whether a parameter sits in the residual blocks, i.e. under a
top-level 'blocks' entry), so they apply to every model family.
"""

import dataclasses

import jax

from pretrain.errors import ConfigError, check_choice

NAMES = ('sp', 'mup', 'depth_mup')
WEIGHT_DECAY_MODES = ('coupled', 'independent', 'mup_scaled')
BLOCKS_KEY = 'blocks'


@dataclasses.dataclass(frozen=True)
class Parametrization:
    name: str = 'sp'
    width_mult: float = 1.0      # m
    depth_mult: float = 1.0      # m_L
    depth_alpha: float = 0.5
    input_mult: float = 1.0
    output_mult: float = 1.0
    zero_readout: bool = False
    scale_eps: bool = True       # Adam eps / m for hidden matrices (avoids underflow at width)

    @property
    def mup(self) -> bool:
        return self.name in ('mup', 'depth_mup')

    @property
    def _m(self) -> float:
        return self.width_mult if self.mup else 1.0

    @property
    def _depth_lr(self) -> float:
        return self.depth_mult ** (self.depth_alpha - 1.0) if self.name == 'depth_mup' else 1.0

    # Forward multipliers (read by the model).
    def embedding_mult(self) -> float:
        return self.input_mult

    def readout_mult(self) -> float:
        return self.output_mult / self._m

    def residual_mult(self) -> float:
        return self.depth_mult ** -self.depth_alpha if self.name == 'depth_mup' else 1.0

    def attn_logit_scale(self, head_dim: int) -> float:
        # Under muP the head dim grows with m (fixed head count): 1/d_head, anchored at the base.
        return head_dim ** -0.5 * (1.0 / self._m) ** 0.5

    # Per-parameter rules (read by init and the optimizer).
    def init_mult(self, role: str) -> float:
        if role == 'readout' and self.zero_readout:
            return 0.0
        return self._m ** -0.5 if role == 'hidden' else 1.0

    def lr_mult(self, role: str, in_block: bool) -> float:
        if role == 'hidden':
            return self._depth_lr / self._m
        if role == 'vector' and in_block:
            return self._depth_lr
        return 1.0

    def eps_mult(self, role: str) -> float:
        return 1.0 / self._m if role == 'hidden' and self.scale_eps else 1.0

    def wd_mult(self, role: str, mode: str) -> float:
        """Relative weight decay: 0 for vectors; x m for hidden under 'mup_scaled'."""
        if role == 'vector':
            return 0.0
        return self._m if mode == 'mup_scaled' and role == 'hidden' else 1.0


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
    return Parametrization(name=p.name, width_mult=width / base_width, depth_mult=depth / base_depth,
                           depth_alpha=p.depth_alpha, input_mult=p.input_mult,
                           output_mult=p.output_mult, zero_readout=p.zero_readout,
                           scale_eps=p.scale_eps)


def _in_block(path) -> bool:
    return bool(path) and getattr(path[0], 'key', None) == BLOCKS_KEY


def per_param(info, fn):
    """A tree like `info` of fn(role, in_block) for every parameter."""
    return jax.tree_util.tree_map_with_path(lambda path, i: fn(i.role, _in_block(path)), info)


def scale_init(params, info, p13n: Parametrization):
    """Applies the init multipliers to freshly built parameters (multiplying by 1.0 is exact)."""
    mults = per_param(info, lambda role, _: p13n.init_mult(role))
    return jax.tree.map(lambda x, s: x * s if s != 1.0 else x, params, mults)
