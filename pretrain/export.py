"""Export a run's checkpoint to the Hugging Face Llama layout (config.json + safetensors), with
its tokenizer where HF can load it.

    python -m pretrain.export --workdir=runs/tiny --format=hf --out=exported/tiny [--step=N]

Loads with `transformers.LlamaForCausalLM.from_pretrained(out)`. The parameters are restored
one at a time (`checkpoint.param_reader`, from a checkpoint of any mesh) onto one device and
converted on the host; host memory holds at most one safetensors shard (--max_shard_bytes) of
converted tensors, as the safetensors writer takes a shard's tensors together. Multipliers the Llama layout lacks are folded
into the weights where that is exact, else the export is refused (pretrain/hf_llama.py).
A mamba run (model.family='mamba') is written in the `MambaForCausalLM` (model.ssm.version=1)
or `Mamba2ForCausalLM` (version=2) layout instead, by the same command (pretrain/hf_mamba.py).

The tokenizer: `data.tokenizer='hf'` copies its tokenizer.json (`AutoTokenizer` loads it as a
`PreTrainedTokenizerFast`); 'sentencepiece' copies the .model file as tokenizer.model for a
`LlamaTokenizer`; both with a tokenizer_config.json. 'bytes' has no HF form: no tokenizer files.
`AutoTokenizer` gives the run's ids (tested with -m interop), with one known exception: for a
SentencePiece model trained with a dummy prefix (SentencePiece's default), a text that begins
with whitespace gets one space fewer from HF's Llama tokenizer.
"""

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

from pretrain import checkpoint as checkpoint_lib
from pretrain import cli_errors, hf_llama, hf_mamba, logs
from pretrain.data import tokenizers as tokenizers_lib
from pretrain.errors import ConfigError

FORMATS = ('hf',)
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
TOKENIZER_CONFIG = 'tokenizer_config.json'
BYTES_NOTE = ('no tokenizer files: the bytes tokenizer (ids 0-255 are the UTF-8 bytes, 256 is '
              'eos) has no Hugging Face form')


def _flat(shapes: dict[tuple[str, ...], Any]) -> list[tuple[tuple[str, ...], Any]]:
    """(path of string keys, shape) of every parameter, in the order the HF layout lists them."""
    return sorted(shapes.items(), key=lambda item: _order(item[0]))


def _order(path: tuple[str, ...]) -> tuple:
    if path[0] == 'embed':
        return (0,)
    if path[0] == 'blocks':
        return (1, int(path[1]), path[2:])
    return (2, path)


def _layout(cfg: Any, shapes: dict[tuple[str, ...], Any]) -> tuple[
        list[hf_mamba.HfTensor], Callable[[hf_mamba.HfTensor, list[np.ndarray]], np.ndarray],
        Callable[[str], dict[str, Any]]]:
    """(the HF tensors in file order, each with the parameters it is built from; the converter
    of those parameters' arrays to it; config.json from the dtype) of the run's family.

    Raises ConfigError for a run its HF layout cannot hold.
    """
    if cfg.model.family == 'mamba':
        layout = hf_mamba.Layout(cfg, shapes)
        return layout.tensors, layout.to_hf, lambda dtype: hf_mamba.hf_config(cfg, dtype)
    folds = hf_llama.folds(cfg)
    # Llama: one HF tensor per parameter (its HF shape is not needed to write it).
    tensors = [hf_mamba.HfTensor(hf_llama.hf_name(path), (), (path,)) for path, _ in _flat(shapes)]
    return (tensors, lambda tensor, arrays: hf_llama.to_hf(tensor.sources[0], arrays[0], folds)[1],
            lambda dtype: hf_llama.llama_config(cfg, dtype))


def _torch_dtype(dtype: np.dtype) -> str:
    names = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float16'}
    if str(dtype) not in names:
        raise ConfigError(f'parameters of dtype {dtype} cannot be exported; use float32 or bfloat16')
    return names[str(dtype)]


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f'--out={out} exists and is not an empty folder; give a new folder')


def tokenizer_files(cfg: Any) -> dict[str, Any]:
    """What the export writes for the run's tokenizer: {'copy': (source, name) or None,
    'config': the tokenizer_config.json dict or None, 'note': a line for the summary}.

    Reads the tokenizer file (so a moved or damaged file is a ConfigError before anything is
    written) and writes nothing. Training encoded documents without BOS and ended each with eos,
    so the configs add no special tokens of their own and name the eos the run used.
    """
    data_cfg = cfg.data
    max_length = int(data_cfg.seq_len)
    if data_cfg.tokenizer == 'hf':
        tokenizer = tokenizers_lib.HfTokenizer(data_cfg.tokenizer_path)
        config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': tokenizer.eos_token,
                  'model_max_length': max_length, 'clean_up_tokenization_spaces': False}
        return {'copy': (data_cfg.tokenizer_path, 'tokenizer.json'), 'config': config,
                'note': 'tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast)'}
    if data_cfg.tokenizer == 'sentencepiece':
        tokenizer = tokenizers_lib.SentencePieceTokenizer(data_cfg.tokenizer_path)
        config = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': False,
                  'add_eos_token': False, 'model_max_length': max_length,
                  # legacy: plain SentencePiece encoding, as the run's pipeline used it;
                  # add_prefix_space: the model's own choice (HF's default is to add one)
                  'legacy': True, 'clean_up_tokenization_spaces': False,
                  'add_prefix_space': tokenizer.adds_dummy_prefix()}
        config.update({f'{name}_token': piece
                       for name, piece in tokenizer.special_pieces().items()})
        return {'copy': (data_cfg.tokenizer_path, 'tokenizer.model'), 'config': config,
                'note': 'tokenizer.model + tokenizer_config.json (LlamaTokenizer)'}
    return {'copy': None, 'config': None, 'note': BYTES_NOTE}


def write_tokenizer(plan: dict[str, Any], out: str) -> list[str]:
    """Writes the files `tokenizer_files` planned into `out`; returns their names."""
    if plan['copy'] is None:
        return []
    source, name = plan['copy']
    shutil.copyfile(source, os.path.join(out, name))
    with open(os.path.join(out, TOKENIZER_CONFIG), 'w') as f:
        json.dump(plan['config'], f, indent=2, sort_keys=True)
    return [name, TOKENIZER_CONFIG]


def export_hf(workdir: str, out: str, step: int | None = None,
              max_shard_bytes: int = 5_000_000_000) -> dict[str, Any]:
    """Writes the run's checkpoint at `step` (default latest) to `out` in the HF Llama layout.

    Returns {'step', 'files', 'config', 'tokenizer_files', 'tokenizer_note'}. Raises
    ConfigError (before writing anything) for a run the layout cannot hold, an unknown step, a
    non-empty `out` or a tokenizer file that is gone or unreadable.
    """
    from safetensors.numpy import save_file  # a project dependency; imported where used

    if max_shard_bytes < 1:
        raise ConfigError(f'--max_shard_bytes={max_shard_bytes} must be a positive integer')
    _check_out(out)
    reader = checkpoint_lib.param_reader(workdir, step)
    cfg = ml_collections.ConfigDict(reader.record['config'])
    hf_tensors, to_hf, hf_config = _layout(cfg, reader.shapes)   # refuses what it cannot hold
    tokenizer_plan = tokenizer_files(cfg)
    items = _flat(reader.shapes)
    dtypes = {str(leaf.dtype) for _, leaf in items}
    if len(dtypes) != 1:
        raise ConfigError(f'parameters of mixed dtypes {sorted(dtypes)} cannot be exported')
    config = hf_config(_torch_dtype(items[0][1].dtype))
    # Shards are planned from the shapes, before any array is copied to the host.
    total = sum(leaf.size * leaf.dtype.itemsize for _, leaf in items)
    shards: list[list[hf_mamba.HfTensor]] = [[]]
    size = 0
    for hf_tensor in hf_tensors:
        nbytes = sum(reader.shapes[path].size * reader.shapes[path].dtype.itemsize
                     for path in hf_tensor.sources)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(hf_tensor)
        size += nbytes
    os.makedirs(out, exist_ok=True)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
    weight_map = {}
    for file_name, shard in zip(names, shards):
        tensors = {}
        for hf_tensor in shard:
            arrays = [np.asarray(jax.device_get(reader.read(path))) for path in hf_tensor.sources]
            tensors[hf_tensor.name] = to_hf(hf_tensor, arrays)
            weight_map[hf_tensor.name] = file_name
            del arrays
        save_file(tensors, os.path.join(out, file_name), metadata={'format': 'pt'})
        del tensors
    if len(shards) > 1:
        with open(os.path.join(out, INDEX_FILE), 'w') as f:
            json.dump({'metadata': {'total_size': int(total)}, 'weight_map': weight_map}, f,
                      indent=2, sort_keys=True)
    with open(os.path.join(out, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2, sort_keys=True)
    written = write_tokenizer(tokenizer_plan, out)
    return {'step': reader.step, 'files': names, 'config': config, 'tokenizer_files': written,
            'tokenizer_note': tokenizer_plan['note']}


def summary(result: dict[str, Any], workdir: str, out: str) -> str:
    """The line the command prints after an export."""
    files = ', '.join(result['files'] + ['config.json'] + result['tokenizer_files'])
    line = f'exported step {result["step"]} of {workdir} to {out}: {files}'
    return line if result['tokenizer_files'] else f'{line}; {result["tokenizer_note"]}'


def define_flags() -> None:
    """The command line's flags (defined only when run as a program, so importing this module
    next to the trainer defines no second --workdir)."""
    flags.DEFINE_string('workdir', None, 'Run directory holding checkpoints/.')
    flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
    flags.DEFINE_string('format', 'hf', f'Output format: one of {FORMATS}.')
    flags.DEFINE_string('out', None, 'Output folder (created; must be empty if it exists).')
    flags.DEFINE_integer(
        'max_shard_bytes', 5_000_000_000, 'Write several model-0000i-of-0000n.safetensors files plus '
        'an index when the weights exceed this many bytes.')


def main(argv) -> None:
    f = flags.FLAGS
    logs.quiet_libraries()
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not f.workdir or not f.out:
        raise app.UsageError('--workdir and --out are required')
    try:
        if f.format not in FORMATS:
            raise ConfigError(f'--format={f.format!r} is not allowed; choose one of {list(FORMATS)}')
        result = export_hf(f.workdir, f.out, f.step, f.max_shard_bytes)
    except ConfigError as e:
        raise SystemExit(f'config error: {e}') from None
    print(summary(result, f.workdir, f.out))


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli_errors.parse_flags)
