"""Export a run's checkpoint to the Hugging Face Llama layout (config.json + safetensors).

    python -m pretrain.export --workdir=runs/tiny --format=hf --out=exported/tiny [--step=N]

Loads with `transformers.LlamaForCausalLM.from_pretrained(out)`. The parameters are restored
one at a time (`checkpoint.param_reader`, from a checkpoint of any mesh) onto one device and
converted on the host; host memory holds at most one safetensors shard (--max_shard_bytes) of
converted tensors, as the safetensors writer takes a shard's tensors together. Multipliers the Llama layout lacks are folded
into the weights where that is exact, else the export is refused (pretrain/hf_llama.py).
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

from pretrain import checkpoint as checkpoint_lib
from pretrain import cli_errors, hf_llama, logs
from pretrain.errors import ConfigError

FORMATS = ('hf',)
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


def _flat(shapes: dict[tuple[str, ...], Any]) -> list[tuple[tuple[str, ...], Any]]:
    """(path of string keys, shape) of every parameter, in the order the HF layout lists them."""
    return sorted(shapes.items(), key=lambda item: _order(item[0]))


def _order(path: tuple[str, ...]) -> tuple:
    if path[0] == 'embed':
        return (0,)
    if path[0] == 'blocks':
        return (1, int(path[1]), path[2:])
    return (2, path)


def _torch_dtype(dtype: np.dtype) -> str:
    names = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float16'}
    if str(dtype) not in names:
        raise ConfigError(f'parameters of dtype {dtype} cannot be exported; use float32 or bfloat16')
    return names[str(dtype)]


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f'--out={out} exists and is not an empty folder; give a new folder')


def export_hf(workdir: str, out: str, step: int | None = None,
              max_shard_bytes: int = 5_000_000_000) -> dict[str, Any]:
    """Writes the run's checkpoint at `step` (default latest) to `out` in the HF Llama layout.

    Returns {'step', 'files', 'config'}. Raises ConfigError (before writing anything) for a run
    the layout cannot hold, an unknown step or a non-empty `out`.
    """
    from safetensors.numpy import save_file  # a project dependency; imported where used

    if max_shard_bytes < 1:
        raise ConfigError(f'--max_shard_bytes={max_shard_bytes} must be a positive integer')
    _check_out(out)
    reader = checkpoint_lib.param_reader(workdir, step)
    cfg = ml_collections.ConfigDict(reader.record['config'])
    folds = hf_llama.folds(cfg)   # refuses what the layout cannot hold
    items = _flat(reader.shapes)
    dtypes = {str(leaf.dtype) for _, leaf in items}
    if len(dtypes) != 1:
        raise ConfigError(f'parameters of mixed dtypes {sorted(dtypes)} cannot be exported')
    config = hf_llama.llama_config(cfg, _torch_dtype(items[0][1].dtype))
    # Shards are planned from the shapes, before any array is copied to the host.
    total = sum(leaf.size * leaf.dtype.itemsize for _, leaf in items)
    shards: list[list[tuple[tuple[str, ...], Any]]] = [[]]
    size = 0
    for path, leaf in items:
        nbytes = leaf.size * leaf.dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((path, leaf))
        size += nbytes
    os.makedirs(out, exist_ok=True)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
    weight_map = {}
    for file_name, shard in zip(names, shards):
        tensors = {}
        for path, leaf in shard:
            name, tensor = hf_llama.to_hf(path, np.asarray(jax.device_get(reader.read(path))),
                                          folds)
            tensors[name] = tensor
            weight_map[name] = file_name
        save_file(tensors, os.path.join(out, file_name), metadata={'format': 'pt'})
        del tensors
    if len(shards) > 1:
        with open(os.path.join(out, INDEX_FILE), 'w') as f:
            json.dump({'metadata': {'total_size': int(total)}, 'weight_map': weight_map}, f,
                      indent=2, sort_keys=True)
    with open(os.path.join(out, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return {'step': reader.step, 'files': names, 'config': config}


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
    print(f'exported step {result["step"]} of {f.workdir} to {f.out}: '
          f'{", ".join(result["files"])} + config.json')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli_errors.parse_flags)
