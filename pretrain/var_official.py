"""Official VAR weights (Tian et al. 2024) -> step-0 runs that model_zoo.var_sample samples from.

    python -m pretrain.var_official --vae=vae_ch160v4096z32.pth --var=var_d16.pth \
        --config=configs/var_d16.py --workdir=runs/var_d16_official
    python -m model_zoo.var_sample --workdir=runs/var_d16_official --cfg_scale=4 --top_k=900

The two PyTorch state dicts are read with torch.load(..., weights_only=True) only (tensors and
plain containers; no object of the file is ever unpickled). Two runs are written, each a
checkpoint at step 0 with the trainer's own record, like pretrain/import_hf.py:

    WORKDIR/tokenizer   the VQ-VAE as a var_tokenizer run (model.var.tokenizer_arch='published')
    WORKDIR             the transformer as a var run (model.var.arch='published'), whose
                        data.image.tokenizer_dir names WORKDIR/tokenizer

Both configs are the given one (its model.var and data.image describe both stages), with
data.image.tokenizer_dir pointed at the converted tokenizer. The config must use the published
block, tokenizer layout and phi rule and SP multipliers of 1 (VAR has none). Optimizer moments
start fresh and the data position is that of a fresh run.

The name table (`vae_entry`, `var_entry`) follows the reference code
(github.com/FoundationVision/VAR at 78b9539: models/basic_vae.py, vqvae.py, quant.py, var.py,
basic_var.py, __init__.py). It was checked against the state_dict keys and shapes of the
reference modules built at the d16 / ch160 v4096 z32 sizes (every key placed or a known buffer),
and a small random-weight reference model converted with it computed the reference forward
(encoder, quantizer codes and f_hat, decoder, teacher inputs, logits) to about 3e-6. It has not
been run on the released .pth files themselves; a name or shape that differs is reported as a
ConfigError naming the tensor before anything is written.
"""

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from model_zoo import FAMILIES
from pretrain import checkpoint as checkpoint_lib
from pretrain import config as config_lib
from pretrain import import_hf
from pretrain import parametrization as parametrization_lib
from pretrain import setup as setup_lib
from pretrain.errors import ConfigError

Path = tuple[str, ...]
Transform = Callable[[np.ndarray], np.ndarray]

# Buffers of the reference modules that are saved with the weights but hold nothing to learn:
# codebook usage statistics, the level of each token, the block-causal mask, the zero k bias.
IGNORED = (re.compile(r'quantize\.ema_vocab_hit_SV'), re.compile(r'lvl_1L'),
           re.compile(r'attn_bias_for_masking'), re.compile(r'blocks\.\d+\.attn\.zero_k_bias'))

# The reference's AdaLN chunks are (gamma1, gamma2, scale1, scale2, shift1, shift2); ours are
# (shift1, scale1, gate1, shift2, scale2, gate2): our chunk n is the reference's chunk BLOCK_ADA[n].
BLOCK_ADA = (4, 2, 0, 5, 3, 1)
# The head's AdaLN: reference (scale, shift), ours (shift, scale).
HEAD_ADA = (1, 0)


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one of our parameters comes from: an official tensor and the layout change."""

    name: str
    transform: Transform


# ----------------------------------------------------------------------------- layout changes

def conv(weight_OIHW: np.ndarray) -> np.ndarray:
    """PyTorch conv [out, in, kh, kw] -> ours [kh, kw, in, out]."""
    return weight_OIHW.transpose(2, 3, 1, 0)


def linear(weight_OI: np.ndarray) -> np.ndarray:
    """PyTorch Linear [out, in] -> ours [in, out]."""
    return weight_OI.T


def identity(x: np.ndarray) -> np.ndarray:
    return x


def _drop_leading_one(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[1:])


def _qkv(which: int, heads: int) -> Transform:
    """mat_qkv.weight [3C, C] (rows: q, k, v, each heads x head_dim) -> ours [C, heads, head_dim]."""
    def take(w: np.ndarray) -> np.ndarray:
        C = w.shape[1]
        return w.reshape(3, heads, C // heads, C)[which].transpose(2, 0, 1)
    return take


def _per_head(heads: int) -> Transform:
    return lambda x: x.reshape(heads, -1)


def _out_projection(heads: int) -> Transform:
    """proj.weight [C, C] (input index head x head_dim) -> ours [heads, head_dim, C]."""
    return lambda w: w.T.reshape(heads, w.shape[1] // heads, w.shape[0])


def _ada_weight(order: Sequence[int]) -> Transform:
    """ada_lin.1.weight [n C, D] -> ours [D, n, C] with the chunks in our order."""
    def take(w: np.ndarray) -> np.ndarray:
        n = len(order)
        return w.reshape(n, w.shape[0] // n, w.shape[1])[list(order)].transpose(2, 0, 1)
    return take


def _ada_bias(order: Sequence[int]) -> Transform:
    return lambda b: b.reshape(len(order), -1)[list(order)]


# ----------------------------------------------------------------------------- name tables

def _vae_module(parts: Sequence[str], side: str) -> str:
    """Our module path inside the encoder / decoder -> the reference's."""
    out, i = [], 0
    while i < len(parts):
        part = parts[i]
        if part == 'levels':
            out += ['down' if side == 'encoder' else 'up', parts[i + 1]]
            i += 2
            continue
        if part == 'resample':
            out += ['downsample' if side == 'encoder' else 'upsample', 'conv']
        else:
            out.append({'blocks': 'block', 'attns': 'attn', 'skip': 'nin_shortcut',
                        'proj': 'proj_out'}.get(part, part))
        i += 1
    return '.'.join(out)


def vae_entry(path: Path) -> Entry:
    """The official VQ-VAE tensor of one of our var_tokenizer (published) parameters."""
    if tuple(path) == ('quantizer', 'codebook'):
        return Entry('quantize.embedding.weight', identity)
    *module, leaf = path
    transform = conv if leaf == 'kernel' else identity
    leaf = {'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)
    if module[:2] == ['quantizer', 'phi']:
        return Entry(f'quantize.quant_resi.qresi_ls.{module[2]}.{leaf}', transform)
    side, rest = module[0], module[1:]
    if rest in (['quant_conv'], ['post_quant_conv']):   # top-level modules in the reference
        return Entry(f'{rest[0]}.{leaf}', transform)
    return Entry(f'{side}.{_vae_module(rest, side)}.{leaf}', transform)


def var_entry(path: Path, heads: int) -> Entry:
    """The official VAR tensor of one of our var (published) parameters."""
    if path[0] == 'blocks':
        i, rest = path[1], path[2:]
        prefix = f'blocks.{i}'
        table = {
            ('ada', 'w'): Entry(f'{prefix}.ada_lin.1.weight', _ada_weight(BLOCK_ADA)),
            ('ada', 'b'): Entry(f'{prefix}.ada_lin.1.bias', _ada_bias(BLOCK_ADA)),
            ('attn', 'wq'): Entry(f'{prefix}.attn.mat_qkv.weight', _qkv(0, heads)),
            ('attn', 'wk'): Entry(f'{prefix}.attn.mat_qkv.weight', _qkv(1, heads)),
            ('attn', 'wv'): Entry(f'{prefix}.attn.mat_qkv.weight', _qkv(2, heads)),
            ('attn', 'q_bias'): Entry(f'{prefix}.attn.q_bias', _per_head(heads)),
            ('attn', 'v_bias'): Entry(f'{prefix}.attn.v_bias', _per_head(heads)),
            ('attn', 'log_logit_scale'): Entry(f'{prefix}.attn.scale_mul_1H11',
                                               lambda x: x.reshape(-1)),
            ('attn', 'wo'): Entry(f'{prefix}.attn.proj.weight', _out_projection(heads)),
            ('attn', 'out_bias'): Entry(f'{prefix}.attn.proj.bias', identity),
            ('mlp', 'w1'): Entry(f'{prefix}.ffn.fc1.weight', linear),
            ('mlp', 'b1'): Entry(f'{prefix}.ffn.fc1.bias', identity),
            ('mlp', 'w2'): Entry(f'{prefix}.ffn.fc2.weight', linear),
            ('mlp', 'b2'): Entry(f'{prefix}.ffn.fc2.bias', identity),
        }
    else:
        rest = path
        table = {
            ('class_emb',): Entry('class_emb.weight', identity),
            ('pos_start',): Entry('pos_start', _drop_leading_one),
            ('pos_emb',): Entry('pos_1LC', _drop_leading_one),
            ('level_emb',): Entry('lvl_embed.weight', identity),
            ('word_w',): Entry('word_embed.weight', linear),
            ('word_b',): Entry('word_embed.bias', identity),
            ('head_ada', 'w'): Entry('head_nm.ada_lin.1.weight', _ada_weight(HEAD_ADA)),
            ('head_ada', 'b'): Entry('head_nm.ada_lin.1.bias', _ada_bias(HEAD_ADA)),
            ('head',): Entry('head.weight', linear),
            ('head_bias',): Entry('head.bias', identity),
        }
    if tuple(rest) not in table:
        raise ConfigError(f'no official tensor is known for our parameter {".".join(path)}')
    return table[tuple(rest)]


# ----------------------------------------------------------------------------- reading

def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict file, as float32 (or integer) numpy arrays.

    torch.load runs with weights_only=True: only tensors and plain containers are rebuilt.
    """
    import torch

    if not os.path.isfile(path):
        raise ConfigError(f'{path} does not exist')
    try:
        loaded = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:   # a pickle with objects, or not a torch file
        raise ConfigError(f'{path}: not a plain PyTorch state dict ({type(e).__name__}: '
                          f'{str(e).splitlines()[0][:200]})') from None
    if not isinstance(loaded, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise ConfigError(f'{path}: expected a mapping of names to tensors (a state_dict)')
    return {name: (t.detach().float() if t.is_floating_point() else t.detach()).numpy()
            for name, t in loaded.items()}


def _keys(path) -> Path:
    return tuple(str(getattr(k, 'key', k)) for k in path)


def convert_params(tensors: Mapping[str, np.ndarray], shapes: Any,
                   entry: Callable[[Path], Entry], what: str) -> dict[Path, np.ndarray]:
    """Our parameters (by path) from the official tensors; every check before any write.

    Raises ConfigError for a missing official tensor, a shape that differs after the layout
    change, or an official tensor that nothing uses (other than the known buffers)."""
    out, used = {}, set()
    for tree_path, shape in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = _keys(tree_path)
        found = entry(path)
        if found.name not in tensors:
            raise ConfigError(f'{what}: no tensor {found.name!r} (for our {".".join(path)})')
        value = np.ascontiguousarray(found.transform(tensors[found.name]))
        if value.shape != tuple(shape.shape):
            raise ConfigError(f'{what}: {found.name!r} of shape {tuple(tensors[found.name].shape)} '
                              f'gives {value.shape} for our {".".join(path)}, which is '
                              f'{tuple(shape.shape)}')
        out[path] = value.astype(shape.dtype)
        used.add(found.name)
    unused = sorted(n for n in tensors if n not in used and not any(p.fullmatch(n) for p in IGNORED))
    if unused:
        raise ConfigError(f'{what}: {len(unused)} tensor(s) the layout does not place, e.g. '
                          f'{unused[:5]}; is the config the checkpoint\'s size?')
    return out


# ----------------------------------------------------------------------------- writing

def check_config(cfg: ml_collections.ConfigDict) -> None:
    """The run config must describe the published model, with every multiplier 1."""
    v = cfg.model.var
    for key in ('arch', 'tokenizer_arch', 'phi_rule'):
        if v[key] != 'published':
            raise ConfigError(f'model.var.{key}={v[key]!r}: the official weights need '
                              "'published' (see configs/var_d16.py)")
    parametrization = parametrization_lib.from_config(cfg)
    multipliers = {'embedding': parametrization.embedding_mult(),
                   'readout': parametrization.readout_mult(),
                   'residual': parametrization.residual_mult()}
    off = {k: m for k, m in multipliers.items() if m != 1.0}
    if off:
        raise ConfigError(f'parametrization multipliers {off} are not 1: VAR has none, so the '
                          'official weights compute another function under them; use SP at the '
                          'base shape')


def stage_configs(config: ml_collections.ConfigDict, workdir: str
                  ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(tokenizer run config, var run config) from the stage-2 config."""
    var_cfg = ml_collections.ConfigDict(config.to_dict())
    var_cfg.model.family = 'var'
    var_cfg.data.image.tokenizer_dir = os.path.abspath(os.path.join(workdir, 'tokenizer'))
    tok_cfg = ml_collections.ConfigDict(var_cfg.to_dict())
    tok_cfg.model.family = 'var_tokenizer'
    tok_cfg.data.image.tokenizer_dir = ''
    return tok_cfg, var_cfg


def _fresh_data_position():
    """A grain iterator at position 0: the data item of a run that has read nothing yet. The
    data itself is not opened (the official weights come without it)."""
    import grain
    return iter(grain.MapDataset.range(1).to_iter_dataset())


def write_run(cfg: ml_collections.ConfigDict, workdir: str, params: dict[Path, np.ndarray],
              source: list[dict[str, str]], devices: Sequence[jax.Device]) -> dict[str, Any]:
    """`params` as step 0 of the run `cfg` in `workdir`; returns the saved record."""
    setup = setup_lib.build(cfg, devices, families=FAMILIES, check_data=False)
    cfg = setup.cfg

    def place(tree_path, shape, sharding):
        value = params[_keys(tree_path)]
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    placed = jax.tree_util.tree_map_with_path(place, setup.model_def.shapes,
                                              setup.state_shardings.params)
    return import_hf.save_step_zero(setup, workdir, placed, _fresh_data_position(), source)


def _abstract_params(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> Any:
    return setup_lib.build(cfg, devices, families=FAMILIES, check_data=False).model_def.shapes


def convert(vae_path: str, var_path: str, config: ml_collections.ConfigDict, workdir: str,
            devices: Sequence[jax.Device] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Writes the official VQ-VAE and VAR files as the runs WORKDIR/tokenizer and WORKDIR.

    Returns the two saved records (tokenizer, var). Every tensor of both files is read and
    checked before anything is written.
    """
    devices = list(devices or jax.devices())
    tok_cfg, var_cfg = stage_configs(config, workdir)
    check_config(config_lib.finalize(var_cfg))
    for folder in (workdir, os.path.join(workdir, 'tokenizer')):
        ckpt = os.path.join(folder, 'checkpoints')
        if os.path.isdir(ckpt) and os.listdir(ckpt):
            raise ConfigError(f'--workdir={workdir}: {ckpt} already has checkpoints; convert '
                              'into a new workdir')
    heads = int(var_cfg.model.n_heads)
    vae_params = convert_params(read_state_dict(vae_path), _abstract_params(tok_cfg, devices),
                                vae_entry, f'--vae={vae_path}')
    var_params = convert_params(read_state_dict(var_path), _abstract_params(var_cfg, devices),
                                lambda path: var_entry(path, heads), f'--var={var_path}')
    tok_record = write_run(tok_cfg, os.path.join(workdir, 'tokenizer'), vae_params,
                           [{'source': 'var_official', 'path': os.path.abspath(vae_path)}], devices)
    del vae_params
    var_record = write_run(var_cfg, workdir, var_params,
                           [{'source': 'var_official', 'path': os.path.abspath(var_path)}], devices)
    return tok_record, var_record


def main(argv) -> None:
    from absl import app, flags

    from pretrain import logs

    f = flags.FLAGS
    logs.quiet_libraries()
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if f.config is None or not f.vae or not f.var or not f.workdir:
        raise app.UsageError('--vae, --var, --config and --workdir are required')
    try:
        checkpoint_lib.check_writable(f.workdir)
        convert(f.vae, f.var, f.config, f.workdir)
    except ConfigError as e:
        raise SystemExit(f'config error: {e}') from None
    print(f'converted {f.vae} -> {f.workdir}/tokenizer and {f.var} -> {f.workdir} (step 0); '
          f'sample with python -m model_zoo.var_sample --workdir={f.workdir}')


if __name__ == '__main__':
    from absl import app, flags
    from ml_collections import config_flags

    from pretrain import cli_errors

    config_flags.DEFINE_config_file('config', None, 'Stage-2 config (e.g. configs/var_d16.py).',
                                    lock_config=True)
    flags.DEFINE_string('vae', None, 'The official VQ-VAE state dict (e.g. vae_ch160v4096z32.pth).')
    flags.DEFINE_string('var', None, 'The official VAR state dict (e.g. var_d16.pth).')
    flags.DEFINE_string('workdir', None, 'New folder: the var run (and its tokenizer run inside).')
    app.run(main, flags_parser=cli_errors.parse_flags)
