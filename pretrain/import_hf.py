"""Import a Hugging Face Llama checkpoint as step 0 of a run the trainer resumes from.

    python -m pretrain.import_hf --hf_dir=exported/tiny --config=configs/lm_tiny.py \
        --workdir=runs/continued
    python -m pretrain.train --config=configs/lm_tiny.py --workdir=runs/continued

A mamba run imports a MambaForCausalLM / Mamba2ForCausalLM folder the same way
(pretrain/hf_mamba.py); the layout follows the run config's model.family and must match the HF
config's model_type.

The HF config must match the run config (shapes, heads, theta, eps, tying). The trainer's own
setup builds a fresh state (optimizer moments fresh, step 0) onto the configured mesh; each
parameter is read lazily from the safetensors files, converted and placed onto its sharding one
at a time, and the state is saved by the trainer's Checkpointer with a record whose lineage
names the source ({'source': 'hf', 'path': ...}).
"""

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from model_zoo import FAMILIES
from pretrain import checkpoint as checkpoint_lib
from pretrain import cli_errors, hf_llama, hf_mamba, logs
from pretrain import config as config_lib
from pretrain import data as data_lib
from pretrain import setup as setup_lib
from pretrain.errors import ConfigError
from pretrain.registry import Registry


class _Tensors:
    """Lazy reader of the tensors of an HF folder, one file open at a time."""

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, 'model.safetensors.index.json')
        single = os.path.join(hf_dir, 'model.safetensors')
        if os.path.isfile(index):
            with open(index) as f:
                self.files = {name: os.path.join(hf_dir, file)
                              for name, file in json.load(f)['weight_map'].items()}
        elif os.path.isfile(single):
            from safetensors import safe_open
            with safe_open(single, framework='np') as f:
                self.files = {name: single for name in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        else:
            raise ConfigError(f'--hf_dir={hf_dir} holds neither model.safetensors nor '
                              'model.safetensors.index.json')

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open
        if name not in self.files:
            raise ConfigError(f'the HF checkpoint has no tensor {name!r}')
        with safe_open(self.files[name], framework='np') as f:
            return f.get_tensor(name)


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, 'config.json')
    if not os.path.isfile(path):
        raise ConfigError(f'--hf_dir={hf_dir} has no config.json')
    with open(path) as f:
        return json.load(f)


def _layout(hf_config: dict[str, Any], cfg: ml_collections.ConfigDict, shapes: Any) -> tuple[
        Callable[[tuple[str, ...]], str],
        Callable[[tuple[str, ...], np.ndarray, tuple[int, ...]], np.ndarray]]:
    """(our parameter path -> the name of the HF tensor holding it, (path, that tensor, shape)
    -> our parameter) for the run's family, after the HF config is checked against `cfg`.

    Dispatches on the run's model.family; each layout checks the HF model_type/architectures.
    """
    if cfg.model.family == 'mamba':
        hf_mamba.check_hf_config(hf_config, cfg)
        flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
        layout = hf_mamba.Layout(cfg, {_keys(path): shape.shape for path, shape in flat})
        return layout.hf_name, layout.from_hf
    hf_llama.check_hf_config(hf_config, cfg)
    folds = hf_llama.folds(cfg)
    return hf_llama.hf_name, lambda path, hf, shape: hf_llama.from_hf(path, hf, shape, folds)


def import_hf(hf_dir: str, config: ml_collections.ConfigDict, workdir: str,
              devices: Sequence[jax.Device] | None = None, *,
              families: Registry = FAMILIES) -> dict[str, Any]:
    """Writes the HF checkpoint in `hf_dir` as step 0 of the run `config` in `workdir`.

    Returns the saved record. Raises ConfigError, before writing anything, when the HF config
    does not match `config`, a tensor is missing or misshapen, or `workdir` has checkpoints.
    """
    devices = list(devices or jax.devices())
    setup = setup_lib.build(config, devices, families=families)
    cfg = setup.cfg
    hf_config = read_hf_config(hf_dir)
    hf_name, from_hf = _layout(hf_config, cfg, setup.model_def.shapes)
    checkpoint_dir = os.path.join(workdir, 'checkpoints')
    if os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir):
        raise ConfigError(f'--workdir={workdir} already has checkpoints; import into a new workdir')
    tensors = _Tensors(hf_dir)
    shardings = setup.state_shardings.params
    flat_shapes = jax.tree_util.tree_flatten_with_path(setup.model_def.shapes)[0]
    # Every tensor is checked before the state is built or anything is written.
    for path, shape in flat_shapes:
        name = hf_name(_keys(path))
        if name not in tensors:
            raise ConfigError(f'the HF checkpoint has no tensor {name!r}')

    def load(path, shape, sharding):
        keys = _keys(path)
        value = from_hf(keys, tensors.get(hf_name(keys)), shape.shape)
        if value.dtype != shape.dtype:
            value = value.astype(shape.dtype)
        # Each device (of any process) takes its own slice of the host copy.
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    with setup.activate():
        params = jax.tree_util.tree_map_with_path(load, setup.model_def.shapes, shardings)
        pipeline = data_lib.make_pipeline(
            cfg, setup.family, global_batch_size=cfg.train.global_batch_size,
            num_eval_batches=cfg.train.eval_batches, seed=cfg.seed,
            process_index=jax.process_index(), process_count=jax.process_count())
        return save_step_zero(setup, workdir, params, pipeline.train_iterator(),
                              [{'source': 'hf', 'path': os.path.abspath(hf_dir)}])


def save_step_zero(setup: setup_lib.Setup, workdir: str, params: Any, data_position: Any,
                   lineage: list[dict[str, str]]) -> dict[str, Any]:
    """`params` (placed on the setup's mesh) as step 0 of a run in `workdir`: a fresh optimizer
    state, the run's config.json and a checkpoint whose lineage names the source. Returns the
    saved record."""
    cfg = setup.cfg
    with setup.activate():
        state = setup.init_state().replace(params=params)
        record = {'step': 0, 'config': cfg.to_dict(), 'schedule': setup.schedule_spec.to_dict(),
                  'param_shapes': setup.param_shapes, 'skipped_steps': 0, 'lineage': lineage}
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, 'config.json'), 'w') as f:
                f.write(config_lib.to_json(cfg))
        checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                                   cfg.checkpoint)
        try:
            checkpointer.save(0, state, data_position, record, force=True)
        finally:
            checkpointer.close()
    return record


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, 'key', k)) for k in path)


def define_flags() -> None:
    """The command line's flags (defined only when run as a program, so importing this module
    next to the trainer defines no second --config or --workdir)."""
    config_flags.DEFINE_config_file('config', None, 'Config file of the run (configs/*.py).',
                                    lock_config=True)
    flags.DEFINE_string('hf_dir', None, 'Folder with config.json and model.safetensors '
                        '(or model-*.safetensors + model.safetensors.index.json).')
    flags.DEFINE_string('workdir', None, 'New run directory (must hold no checkpoint).')


def main(argv) -> None:
    f = flags.FLAGS
    logs.quiet_libraries()
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if f.config is None or not f.hf_dir or not f.workdir:
        raise app.UsageError('--hf_dir, --config and --workdir are required')
    try:
        checkpoint_lib.check_writable(f.workdir)
        import_hf(f.hf_dir, f.config, f.workdir)
    except ConfigError as e:
        raise SystemExit(f'config error: {e}') from None
    print(f'imported {f.hf_dir} as step 0 of {f.workdir}; resume it with '
          f'python -m pretrain.train --config=... --workdir={f.workdir}')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli_errors.parse_flags)
