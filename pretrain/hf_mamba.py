"""The mamba family <-> the Hugging Face Mamba layouts (`MambaForCausalLM`, `Mamba2ForCausalLM`).

Several of our parameters make one HF tensor (HF fuses projections and the Mamba-2 conv over
(x, B, C)), so the unit here is the HF tensor: `Layout.tensors` lists each with the parameters
it is concatenated from (along its first axis), `Layout.to_hf` builds it from those arrays and
`Layout.from_hf` cuts one parameter back out. Nothing needs more than one HF tensor in memory.

Both layouts compute the same function as ours:

- Mamba-1: in_proj = [x; z]; conv1d is the same cross-correlation (torch pads K-1 on the left
  and keeps the first L outputs, so its tap k meets x[t-K+1+k], as in `causal_conv`);
  x_proj = [dt_low; B; C]; softplus(dt_proj(dt_low) + dt_proj.bias); A = -exp(A_log); D skip;
  y * silu(z); out_proj. HF Linear weights are [out, in], ours [in, out].
- Mamba-2: in_proj = [z; x; B; C; dt]; conv1d over [x; B; C]; heads h*P + p and groups g*N + n
  flatten as our [H, P] and [G, N] axes do; heads of group g are consecutive in both; the
  gated RMSNorm gates before normalising in both. HF normalises each of n_groups groups of the
  inner dimension separately and we normalise all of it, so only n_groups=1 is the same
  function. chunk_size is the SSD chunk length, which does not change the function (HF pads
  as we do), so it is written but not compared on import. HF's time_step_limit must be the
  identity clamp (0, inf).
- Multipliers HF lacks are folded as in pretrain/hf_llama.py: the depth-muP residual branch
  multiplier into out_proj (the mixer's last linear map, no bias), the readout multiplier into
  the final norm gain (it feeds only the readout), the embedding multiplier into an untied
  embedding table; a tied table with input_mult != 1 is refused.

Refused: hybrid attention blocks (model.ssm.attn_every > 0), Mamba-2 with n_groups != 1, a tied
table with input_mult != 1. HF's use_bias (in/out_proj) must be false and use_conv_bias true.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pretrain import parametrization as parametrization_lib
from pretrain.errors import ConfigError

ARCHITECTURES = {1: 'MambaForCausalLM', 2: 'Mamba2ForCausalLM'}
MODEL_TYPES = {1: 'mamba', 2: 'mamba2'}
FIXED_HF_KEYS = {'hidden_act': 'silu', 'use_bias': False, 'use_conv_bias': True}
# The defaults of transformers' MambaConfig / Mamba2Config for keys a config.json may omit.
HF_DEFAULTS = {
    1: {'state_size': 16, 'expand': 2, 'conv_kernel': 4, 'layer_norm_epsilon': 1e-5,
        'time_step_rank': 'auto', 'tie_word_embeddings': True},
    2: {'state_size': 128, 'expand': 2, 'conv_kernel': 4, 'layer_norm_epsilon': 1e-5,
        'n_groups': 8, 'head_dim': 64, 'num_heads': 128, 'tie_word_embeddings': False},
}
PathType = tuple[str, ...]

# How one of our arrays becomes a segment (rows along axis 0) of its HF tensor.
IN_FIRST = 'in_first'     # our [in, *out] -> [out, in] (an nn.Linear weight)
OUT_LAST = 'out_last'     # our [*in, out] -> [out, in]
CONV = 'conv'             # our [K, *channels] -> [channels, 1, K] (a depthwise nn.Conv1d)
FLAT = 'flat'             # per-channel values [*channels] -> [channels]
SAME = 'same'

# Per layer: the HF tensor (under backbone.layers.<i>.) and our block parameters, in the order
# HF concatenates them.
BLOCK_TENSORS = {
    1: [('norm.weight', ('norm/scale',)),
        ('mixer.A_log', ('mixer/A_log',)),
        ('mixer.D', ('mixer/D',)),
        ('mixer.conv1d.weight', ('mixer/conv_w',)),
        ('mixer.conv1d.bias', ('mixer/conv_b',)),
        ('mixer.in_proj.weight', ('mixer/w_x', 'mixer/w_z')),
        ('mixer.x_proj.weight', ('mixer/w_dt_low', 'mixer/w_B', 'mixer/w_C')),
        ('mixer.dt_proj.weight', ('mixer/w_dt',)),
        ('mixer.dt_proj.bias', ('mixer/dt_bias',)),
        ('mixer.out_proj.weight', ('mixer/w_out',))],
    2: [('norm.weight', ('norm/scale',)),
        ('mixer.dt_bias', ('mixer/dt_bias',)),
        ('mixer.A_log', ('mixer/A_log',)),
        ('mixer.D', ('mixer/D',)),
        ('mixer.conv1d.weight', ('mixer/conv_x_w', 'mixer/conv_B_w', 'mixer/conv_C_w')),
        ('mixer.conv1d.bias', ('mixer/conv_x_b', 'mixer/conv_B_b', 'mixer/conv_C_b')),
        ('mixer.in_proj.weight', ('mixer/w_z', 'mixer/w_x', 'mixer/w_B', 'mixer/w_C',
                                  'mixer/w_dt')),
        ('mixer.norm.weight', ('mixer/norm_scale',)),
        ('mixer.out_proj.weight', ('mixer/w_out',))],
}


@dataclasses.dataclass(frozen=True)
class Folds:
    """Factors folded into the HF weights (all 1.0 under SP at the base shape)."""

    residual: float   # residual branch multiplier, into out_proj
    readout: float    # readout multiplier, into the final norm gain
    embedding: float  # embedding multiplier, into the (untied) embedding table

    @property
    def identity(self) -> bool:
        return all(f == 1.0 for f in dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """One HF tensor: its name, shape, and our parameters it is concatenated from."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[PathType, ...]


def check_exportable(cfg) -> None:
    """Raises ConfigError (one line, naming the key) for a run the HF Mamba layouts cannot hold."""
    m = cfg.model
    if m.family != 'mamba':
        raise ConfigError(f'model.family={m.family!r}: only the mamba family maps to '
                          'MambaForCausalLM / Mamba2ForCausalLM')
    s = m.ssm
    if s.version not in ARCHITECTURES:
        raise ConfigError(f'model.ssm.version={s.version!r} has no HF layout; allowed: 1, 2')
    if s.attn_every:
        raise ConfigError(f'model.ssm.attn_every={s.attn_every}: hybrid attention blocks have no '
                          f'place in {ARCHITECTURES[s.version]}; only attn_every=0 can be exported')
    if s.version == 2 and s.n_groups != 1:
        raise ConfigError(f'model.ssm.n_groups={s.n_groups}: Mamba2ForCausalLM normalises each '
                          'group of the inner dimension separately in its gated RMSNorm, this '
                          'model the whole inner dimension; only n_groups=1 can be exported')
    parametrization = parametrization_lib.from_config(cfg)
    if m.tie_embeddings and parametrization.embedding_mult() != 1.0:
        raise ConfigError(
            f'parametrization.input_mult={cfg.parametrization.input_mult} with '
            'model.tie_embeddings=True cannot be folded into the HF Mamba layout (the tied table '
            'is also the readout); only input_mult=1.0 or an untied readout can be exported')


def folds(cfg) -> Folds:
    """The multipliers of the run `cfg` that its HF weights carry folded in."""
    check_exportable(cfg)
    parametrization = parametrization_lib.from_config(cfg)
    return Folds(residual=parametrization.residual_mult(),
                 readout=parametrization.readout_mult(),
                 embedding=parametrization.embedding_mult())


def _dt_rank(m) -> int:
    # model_zoo.mamba.dt_rank, repeated: pretrain/ imports nothing from model_zoo.
    return m.ssm.dt_rank or math.ceil(m.d_model / 16)


def hf_config(cfg, torch_dtype: str) -> dict[str, Any]:
    """The HF `config.json` (MambaConfig or Mamba2Config fields) of the run `cfg`."""
    check_exportable(cfg)
    m, s = cfg.model, cfg.model.ssm
    d_inner = s.expand * m.d_model
    config = {
        'architectures': [ARCHITECTURES[s.version]],
        'model_type': MODEL_TYPES[s.version],
        'hidden_size': m.d_model,
        'num_hidden_layers': m.n_layers,
        'vocab_size': m.vocab_size,
        'state_size': s.d_state,
        'expand': s.expand,
        'conv_kernel': s.d_conv,
        'layer_norm_epsilon': float(m.norm_eps),
        'tie_word_embeddings': bool(m.tie_embeddings),
        'torch_dtype': torch_dtype,
        **FIXED_HF_KEYS,
        # Init-only keys, for a model HF would initialise like ours.
        'time_step_min': float(s.dt_min),
        'time_step_max': float(s.dt_max),
        'time_step_floor': float(s.dt_floor),
        'initializer_range': float(m.init_std),
        'rescale_prenorm_residual': False,
        'residual_in_fp32': True,
        'use_cache': True,
    }
    if s.version == 1:
        config.update(intermediate_size=d_inner, time_step_rank=_dt_rank(m))
    else:
        config.update(num_heads=d_inner // s.headdim, head_dim=s.headdim, n_groups=s.n_groups,
                      chunk_size=s.chunk_size)
    return config


def check_hf_config(hf: dict[str, Any], cfg) -> None:
    """Raises ConfigError naming every HF config value that differs from the run `cfg`."""
    m, s = cfg.model, cfg.model.ssm
    version = s.version
    want_type = MODEL_TYPES.get(version)
    if hf.get('model_type') != want_type:
        raise ConfigError(f'the HF config has model_type={hf.get("model_type")!r}; '
                          f'model.family={m.family!r} with model.ssm.version={version!r} needs '
                          f'model_type={want_type!r}')
    want = hf_config(cfg, hf.get('torch_dtype', 'float32'))
    if want['architectures'][0] not in (hf.get('architectures') or want['architectures']):
        raise ConfigError(f'the HF config names architectures={hf.get("architectures")}; only '
                          f'{want["architectures"][0]} can be imported')
    checked = {'hidden_size': 'model.d_model', 'num_hidden_layers': 'model.n_layers',
               'vocab_size': 'model.vocab_size', 'state_size': 'model.ssm.d_state',
               'expand': 'model.ssm.expand', 'conv_kernel': 'model.ssm.d_conv',
               'layer_norm_epsilon': 'model.norm_eps',
               'tie_word_embeddings': 'model.tie_embeddings'}
    if version == 1:
        checked['time_step_rank'] = 'model.ssm.dt_rank'
    else:
        checked.update(head_dim='model.ssm.headdim', num_heads='d_inner/model.ssm.headdim',
                       n_groups='model.ssm.n_groups')
    defaults = HF_DEFAULTS[version]
    diffs = []
    for key, ours in checked.items():
        theirs = hf.get(key, defaults.get(key))
        if key == 'time_step_rank' and theirs == 'auto':
            theirs = math.ceil(hf.get('hidden_size', 0) / 16)
        if theirs != want[key]:
            diffs.append(f'{key}={theirs!r} vs {ours}={want[key]!r}')
    for key, value in FIXED_HF_KEYS.items():
        if hf.get(key, value) != value:
            diffs.append(f'{key}={hf[key]!r} (only {value!r} has a counterpart here)')
    limit = hf.get('time_step_limit')
    if version == 2 and limit is not None and (
            len(limit) != 2 or limit[0] != 0.0 or limit[1] != math.inf):
        diffs.append(f'time_step_limit={limit!r} (only [0.0, inf], no clamp, has a counterpart '
                     'here)')
    if diffs:
        raise ConfigError('the HF checkpoint does not match the config: ' + '; '.join(diffs))


def _kind(path: PathType) -> str:
    leaf = path[-1]
    if path in (('embed', 'table'), ('final_norm', 'scale')) or leaf == 'A_log':
        return SAME
    if leaf in ('head', 'w_out'):
        return OUT_LAST
    if leaf.startswith('w_'):
        return IN_FIRST
    if leaf.startswith('conv') and leaf.endswith('w'):
        return CONV
    return FLAT


def _segment(kind: str, x: np.ndarray) -> np.ndarray:
    """Our array -> its rows of the HF tensor."""
    if kind == IN_FIRST:
        return x.reshape(x.shape[0], -1).T
    if kind == OUT_LAST:
        return x.reshape(-1, x.shape[-1]).T
    if kind == CONV:
        return x.reshape(x.shape[0], -1).T[:, None, :]
    if kind == FLAT:
        return x.reshape(-1)
    return x


def _unsegment(kind: str, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The rows of an HF tensor -> our array of `shape` (the inverse of `_segment`)."""
    if kind in (IN_FIRST, OUT_LAST):
        return rows.T.reshape(shape)
    if kind == CONV:
        return rows[:, 0, :].T.reshape(shape)
    return rows.reshape(shape)


def _segment_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    size = math.prod(shape)
    if kind == IN_FIRST:
        return (size // shape[0], shape[0])
    if kind == OUT_LAST:
        return (shape[-1], size // shape[-1])
    if kind == CONV:
        return (size // shape[0], 1, shape[0])
    if kind == FLAT:
        return (size,)
    return tuple(shape)


def _scaled(x: np.ndarray, factor: float) -> np.ndarray:
    # In the parameter's dtype: multiplying by exactly 1.0 is skipped, so SP stays bit-exact.
    return x if factor == 1.0 else (x * np.asarray(factor, x.dtype)).astype(x.dtype)


class Layout:
    """The HF tensors of one mamba run, built from its parameter shapes {path: shape}."""

    def __init__(self, cfg, shapes: Mapping[PathType, Any]):
        self.folds = folds(cfg)   # refuses what the layout cannot hold
        shape_of = {tuple(path): tuple(getattr(shape, 'shape', shape))
                    for path, shape in shapes.items()}
        m = cfg.model
        plan: list[tuple[str, tuple[PathType, ...]]] = [
            ('backbone.embeddings.weight', (('embed', 'table'),))]
        for layer in range(m.n_layers):
            for name, sources in BLOCK_TENSORS[m.ssm.version]:
                plan.append((f'backbone.layers.{layer}.{name}',
                             tuple(('blocks', str(layer), *source.split('/'))
                                   for source in sources)))
        plan.append(('backbone.norm_f.weight', (('final_norm', 'scale'),)))
        if not m.tie_embeddings:
            plan.append(('lm_head.weight', (('head',),)))
        planned = {path for _, sources in plan for path in sources}
        missing, extra = sorted(planned - set(shape_of)), sorted(set(shape_of) - planned)
        if missing or extra:
            raise ConfigError(
                f'the parameters do not match the HF {ARCHITECTURES[m.ssm.version]} layout: '
                f'missing {["/".join(p) for p in missing[:3]]}, without an HF place '
                f'{["/".join(p) for p in extra[:3]]}')
        self.tensors: list[HfTensor] = []
        self._place: dict[PathType, tuple[HfTensor, int, int]] = {}
        for name, sources in plan:
            segments = [_segment_shape(_kind(path), shape_of[path]) for path in sources]
            rows = sum(segment[0] for segment in segments)
            tensor = HfTensor(name, (rows, *segments[0][1:]), sources)
            start = 0
            for path, segment in zip(sources, segments):
                self._place[path] = (tensor, start, segment[0])
                start += segment[0]
            self.tensors.append(tensor)

    def _factor(self, path: PathType) -> float:
        if path == ('embed', 'table'):
            return self.folds.embedding
        if path == ('final_norm', 'scale'):
            return self.folds.readout
        if path[-1] == 'w_out':
            return self.folds.residual
        return 1.0

    def hf_name(self, path: PathType) -> str:
        """The name of the HF tensor our parameter at `path` is part of."""
        if path not in self._place:
            raise ConfigError(f'parameter {"/".join(path)} has no place in the HF Mamba layout')
        return self._place[path][0].name

    def to_hf(self, tensor: HfTensor, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """The HF tensor from our arrays of `tensor.sources` (in that order), multipliers folded."""
        segments = [_scaled(_segment(_kind(path), array), self._factor(path))
                    for path, array in zip(tensor.sources, arrays, strict=True)]
        out = segments[0] if len(segments) == 1 else np.concatenate(segments, axis=0)
        return np.ascontiguousarray(out)

    def from_hf(self, path: PathType, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Our parameter at `path` (of `shape`) cut out of its HF tensor, multiplier removed."""
        tensor, start, rows = self._place[path]
        if tuple(hf.shape) != tensor.shape:
            raise ConfigError(f'HF tensor {tensor.name} has shape {list(hf.shape)}; the config '
                              f'needs {list(tensor.shape)}')
        out = _unsegment(_kind(path), hf[start:start + rows], tuple(shape))
        factor = self._factor(path)
        if factor != 1.0:
            out = (out / np.asarray(factor, out.dtype)).astype(out.dtype)
        return np.ascontiguousarray(out)
