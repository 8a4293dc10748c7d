"""TFDS plumbing shared by the text and image pipelines: prepare a local builder once, open an
ArrayRecord data source, and say clearly what is wrong when either fails."""

from typing import Any

from pretrain.errors import ConfigError


def prepare_once(builder: Any, wanted: dict[str, Any], data_dir_key: str, data_dir: str | None):
    """Prepares `builder` unless its data_dir holds it already; refuses a copy prepared from other
    inputs (`wanted` against the builder's stored metadata) instead of reading stale data."""
    if builder.is_prepared():
        stored = builder.info.metadata or {}
        got = {k: stored.get(k) for k in wanted}
        if got != wanted:
            raise ConfigError(
                f'{data_dir_key}={data_dir!r} already holds {builder.name} prepared from {got}, '
                f'not {wanted}; use another {data_dir_key} or delete {builder.data_dir!r}.')
        return builder
    builder.download_and_prepare()
    return builder


def open_array_record(name: str, split: str, data_dir: str, key_prefix: str):
    """tfds.data_source over ArrayRecord files; a failure names the config keys to fix."""
    import tensorflow_datasets as tfds
    try:
        # download=False: never fetch or prepare implicitly (offline, and tfrecord needs TF).
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:
        raise ConfigError(
            f'{key_prefix}tfds_name={name!r} ({key_prefix}tfds_data_dir={data_dir!r}, '
            f'split={split!r}) cannot be opened as an ArrayRecord data source: {e}. '
            "Prepare it first with download_and_prepare(file_format='array_record').") from e

