"""The transformer family <-> the Hugging Face Llama layout (`LlamaForCausalLM`), in numpy.

One parameter at a time: `to_hf` maps one of our parameters (by its path) to its HF tensor,
`from_hf` maps back. Both layouts compute the same function:

- RMSNorm, SwiGLU (gate/up/down), grouped-query attention: HF Linear weights are [out, in],
  ours [in, ...out axes], so each matrix is reshaped and transposed.
- RoPE: model_zoo.layers.rope rotates the pairs (i, i + K/2) with frequency theta^(-2i/K),
  which is HF's rotate-half convention, so the q/k rows need no permutation.
- Multipliers HF Llama does not have are folded into the weights where that is exact:
  the attention logit scale (HF uses 1/sqrt(head_dim)) into q_proj, the depth-muP residual
  branch multiplier into o_proj and down_proj, the readout multiplier (output_mult / m) into
  the final norm's gain (which feeds only the readout, tied or not), and the embedding
  multiplier (input_mult) into the embedding table when the readout is untied. With a tied
  table the embedding multiplier cannot be folded (the same table is the readout), so that
  export is refused. Unfolding divides by the same factor, which is bit-exact only when every
  factor is 1.
"""

import dataclasses
import math
from typing import Any

import numpy as np

from pretrain import parametrization as parametrization_lib
from pretrain.errors import ConfigError

ARCHITECTURE = 'LlamaForCausalLM'
# Keys of an HF config that must hold these values for the layout to be ours.
FIXED_HF_KEYS = {'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
                 'rope_scaling': None}


@dataclasses.dataclass(frozen=True)
class Folds:
    """Factors folded into the HF weights (all 1.0 under SP at the base shape)."""

    query: float      # our attention logit scale x sqrt(head_dim)
    residual: float   # residual branch multiplier
    readout: float    # readout multiplier, into the final norm gain
    embedding: float  # embedding multiplier, into the (untied) embedding table

    @property
    def identity(self) -> bool:
        return all(f == 1.0 for f in dataclasses.astuple(self))


def check_exportable(cfg) -> None:
    """Raises ConfigError (one line) for a run the Llama layout cannot hold."""
    if cfg.model.family != 'transformer':
        raise ConfigError(f'model.family={cfg.model.family!r}: only the transformer family has '
                          'a Hugging Face layout here (LlamaForCausalLM)')
    parametrization = parametrization_lib.from_config(cfg)
    if cfg.model.tie_embeddings and parametrization.embedding_mult() != 1.0:
        raise ConfigError(
            f'parametrization.input_mult={cfg.parametrization.input_mult} with '
            'model.tie_embeddings=True cannot be folded into the Llama layout (the tied table is '
            'also the readout); only input_mult=1.0 or an untied readout can be exported')


def folds(cfg) -> Folds:
    """The multipliers of the run `cfg` that its HF weights carry folded in."""
    check_exportable(cfg)
    parametrization = parametrization_lib.from_config(cfg)
    head_dim = cfg.model.d_model // cfg.model.n_heads
    query = parametrization.attn_logit_scale(head_dim) * math.sqrt(head_dim)
    if abs(query - 1.0) < 1e-12:   # SP: 1/sqrt(K) * sqrt(K) is 1 up to rounding
        query = 1.0
    return Folds(query=query, residual=parametrization.residual_mult(), readout=parametrization.readout_mult(),
                 embedding=parametrization.embedding_mult())


def llama_config(cfg, torch_dtype: str) -> dict[str, Any]:
    """The HF `config.json` (LlamaConfig fields) of the run `cfg`."""
    check_exportable(cfg)
    m = cfg.model
    return {
        'architectures': [ARCHITECTURE],
        'model_type': 'llama',
        'hidden_size': m.d_model,
        'intermediate_size': m.d_ff,
        'num_attention_heads': m.n_heads,
        'num_key_value_heads': m.n_kv_heads,
        'head_dim': m.d_model // m.n_heads,
        'num_hidden_layers': m.n_layers,
        'vocab_size': m.vocab_size,
        'rms_norm_eps': float(m.norm_eps),
        'rope_theta': float(m.rope_theta),
        'max_position_embeddings': cfg.data.seq_len,
        'tie_word_embeddings': bool(m.tie_embeddings),
        'torch_dtype': torch_dtype,
        **FIXED_HF_KEYS,
        'attention_dropout': 0.0,
        'initializer_range': float(m.init_std),
        'pretraining_tp': 1,
        'use_cache': True,
    }


def check_hf_config(hf: dict[str, Any], cfg) -> None:
    """Raises ConfigError naming every HF config value that differs from the run `cfg`."""
    want = llama_config(cfg, hf.get('torch_dtype', 'float32'))
    if ARCHITECTURE not in (hf.get('architectures') or [ARCHITECTURE]):
        raise ConfigError(f'the HF config names architectures={hf.get("architectures")}; only '
                          f'{ARCHITECTURE} can be imported')
    head_dim = hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads']
    checked = {'hidden_size': 'model.d_model', 'intermediate_size': 'model.d_ff',
               'num_attention_heads': 'model.n_heads', 'num_key_value_heads': 'model.n_kv_heads',
               'num_hidden_layers': 'model.n_layers', 'vocab_size': 'model.vocab_size',
               'rms_norm_eps': 'model.norm_eps', 'rope_theta': 'model.rope_theta',
               'tie_word_embeddings': 'model.tie_embeddings'}
    defaults = {'num_key_value_heads': hf.get('num_attention_heads'), 'rope_theta': 10000.0,
                'tie_word_embeddings': False, 'rms_norm_eps': 1e-6}
    diffs = []
    for key, ours in checked.items():
        theirs = hf.get(key, defaults.get(key))
        if theirs != want[key]:
            diffs.append(f'{key}={theirs!r} vs {ours}={want[key]!r}')
    if head_dim != want['head_dim']:
        diffs.append(f'head_dim={head_dim} vs model.d_model/model.n_heads={want["head_dim"]}')
    for key, value in FIXED_HF_KEYS.items():
        if hf.get(key, value) != value:
            diffs.append(f'{key}={hf[key]!r} (only {value!r} has a counterpart here)')
    if diffs:
        raise ConfigError('the HF checkpoint does not match the config: ' + '; '.join(diffs))


def hf_name(path: tuple[str, ...]) -> str:
    """The HF tensor name of our parameter at `path` (e.g. ('blocks', '0', 'attn', 'wq'))."""
    if path == ('embed', 'table'):
        return 'model.embed_tokens.weight'
    if path == ('final_norm', 'scale'):
        return 'model.norm.weight'
    if path == ('head',):
        return 'lm_head.weight'
    if len(path) == 4 and path[0] == 'blocks':
        layer, module, name = path[1], path[2], path[3]
        prefix = f'model.layers.{int(layer)}.'
        names = {('attn_norm', 'scale'): 'input_layernorm.weight',
                 ('mlp_norm', 'scale'): 'post_attention_layernorm.weight',
                 ('attn', 'wq'): 'self_attn.q_proj.weight',
                 ('attn', 'wk'): 'self_attn.k_proj.weight',
                 ('attn', 'wv'): 'self_attn.v_proj.weight',
                 ('attn', 'wo'): 'self_attn.o_proj.weight',
                 ('mlp', 'w_gate'): 'mlp.gate_proj.weight',
                 ('mlp', 'w_up'): 'mlp.up_proj.weight',
                 ('mlp', 'w_down'): 'mlp.down_proj.weight'}
        if (module, name) in names:
            return prefix + names[(module, name)]
    raise ConfigError(f'parameter {"/".join(path)} has no place in the Llama layout')


def _factor(path: tuple[str, ...], f: Folds) -> float:
    """The multiplier folded into the parameter at `path`."""
    if path == ('embed', 'table'):
        return f.embedding
    if path == ('final_norm', 'scale'):
        return f.readout
    if path[-1] == 'wq':
        return f.query
    if path[-1] in ('wo', 'w_down'):
        return f.residual
    return 1.0


def _scaled(x: np.ndarray, factor: float) -> np.ndarray:
    # In float32 (or the parameter's dtype): multiplying by exactly 1.0 is skipped.
    return x if factor == 1.0 else (x * np.asarray(factor, x.dtype)).astype(x.dtype)


def to_hf(path: tuple[str, ...], x: np.ndarray, f: Folds) -> tuple[str, np.ndarray]:
    """(HF name, HF tensor) of our parameter `x` at `path`, its multiplier folded in."""
    name = hf_name(path)
    leaf = path[-1]
    if leaf in ('wq', 'wk', 'wv'):        # [D, H, K] -> [H*K, D]
        out = x.reshape(x.shape[0], -1).T
    elif leaf == 'wo':                    # [H, K, D] -> [D, H*K]
        out = x.reshape(-1, x.shape[-1]).T
    elif leaf in ('w_gate', 'w_up', 'w_down', 'head'):   # [in, out] -> [out, in]
        out = x.T
    else:                                 # norms [D], the embedding table [V, D]
        out = x
    return name, np.ascontiguousarray(_scaled(out, _factor(path, f)))


def from_hf(path: tuple[str, ...], hf: np.ndarray, shape: tuple[int, ...], f: Folds) -> np.ndarray:
    """Our parameter at `path` (of `shape`) from its HF tensor, the folded multiplier removed."""
    leaf = path[-1]
    if leaf in ('wq', 'wk', 'wv', 'wo'):   # [H*K, D] -> [D, H, K]; [D, H*K] -> [H, K, D]
        out = hf.T.reshape(shape)
    elif leaf in ('w_gate', 'w_up', 'w_down', 'head'):
        out = hf.T
    else:
        out = hf
    if tuple(out.shape) != tuple(shape):
        raise ConfigError(f'HF tensor {hf_name(path)} has shape {list(hf.shape)}; parameter '
                          f'{"/".join(path)} needs {list(shape)}')
    factor = _factor(path, f)
    if factor != 1.0:
        out = (out / np.asarray(factor, out.dtype)).astype(out.dtype)
    return np.ascontiguousarray(out)
