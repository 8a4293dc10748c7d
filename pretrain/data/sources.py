"""Document sources: random-access sequences of documents (bytes), split into train/eval."""

import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from pretrain.data.tokenizers import TOKENIZERS
from pretrain.errors import ConfigError, check_choice
from pretrain.registry import Registry

SPLITS = ('train', 'eval')
LOCAL_TFDS_NAME = 'local_text_files'  # the builder in tfds_text.py, prepared from data.text_dir
_SKIPPED_DIRS = ('site-packages', 'dist-packages')


class Documents(Sequence[bytes]):
    """A split's documents, read on access; `fingerprint` identifies the content cheaply."""

    fingerprint: str


class FileDocuments(Documents):
    """One document per file, read when indexed."""

    def __init__(self, root: str, relpaths: Sequence[str]):
        self.root = root
        self.relpaths = list(relpaths)
        # Path, size and mtime catch edits without reading the files.
        stats = []
        for rel in self.relpaths:
            st = os.stat(os.path.join(root, rel))
            stats.append((rel, st.st_size, st.st_mtime_ns))
        self.fingerprint = _digest({'root': os.path.abspath(root), 'files': stats})

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with open(os.path.join(self.root, self.relpaths[index]), 'rb') as f:
            return f.read()


class TfdsDocuments(Documents):
    """The text feature of a TFDS random-access (ArrayRecord) data source."""

    def __init__(self, source: Any, text_key: str, fingerprint: str):
        self._source = source
        self._key = text_key
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        # ArrayRecord raises ValueError out of range; Sequence iteration needs IndexError.
        index = range(len(self))[index]
        value = self._source[index][self._key]
        return value.encode('utf-8') if isinstance(value, str) else bytes(value)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def list_files(root: str, suffix: str = '') -> list[str]:
    """Sorted POSIX-style relative paths of regular files under `root` ending in `suffix`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so installed packages under the stdlib are never walked.
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(suffix) and os.path.isfile(path):
                found.append(os.path.relpath(path, root).replace(os.sep, '/'))
    return sorted(found)


def is_eval_file(relpath: str, eval_percent: int) -> bool:
    """The hash split: stable across runs, machines and file additions."""
    return zlib.crc32(relpath.encode('utf-8')) % 100 < eval_percent


def split_files(relpaths: Sequence[str], eval_percent: int) -> dict[str, list[str]]:
    """{'train': [...], 'eval': [...]} by path hash; if eval is empty, holds out the last file."""
    train = [p for p in relpaths if not is_eval_file(p, eval_percent)]
    held = [p for p in relpaths if is_eval_file(p, eval_percent)]
    if not held and eval_percent > 0 and len(relpaths) >= 2:
        # Tiny folders can hash entirely into train; keep eval usable.
        held = [relpaths[-1]]
        train = list(relpaths[:-1])
    return {'train': train, 'eval': held}


def stdlib_root() -> str:
    return sysconfig.get_paths()['stdlib']


def _first_file(root: str) -> str | None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if os.path.isfile(os.path.join(dirpath, name)):
                return name
    return None


def check_text_dir(text_dir: str) -> None:
    """Raises ConfigError unless `text_dir` is a folder holding at least one file."""
    if not text_dir:
        raise ConfigError('data.text_dir is empty; set it to a folder of text files.')
    if not os.path.isdir(text_dir) or _first_file(text_dir) is None:
        raise ConfigError(f'data.text_dir={text_dir!r} contains no files (or is not a folder).')


# A text folder whose sample has more undecodable bytes than this is refused: it is binary data,
# and a byte-level model would train on it without a word (random bytes: ~40%; Latin-1 prose,
# which is text in another encoding, stays well below). Above WARN_UNDECODABLE_FRACTION a
# warning gives the fraction.
MAX_UNDECODABLE_FRACTION = 0.2
WARN_UNDECODABLE_FRACTION = 0.01
_SAMPLE_FILES = 32
_SAMPLE_BYTES_PER_FILE = 1 << 16


def undecodable_fraction(data: bytes) -> float:
    """Fraction of `data` that is not valid UTF-8 (one replacement per bad byte run, roughly)."""
    if not data:
        return 0.0
    text = data.decode('utf-8', errors='replace')
    bad = text.count('\ufffd') - data.decode('utf-8', errors='ignore').count('\ufffd')
    return bad / len(data)


def check_text_encoding(text_dir: str, max_files: int = 0) -> float:
    """Reads a sample (up to 32 files x 64 KiB) of `text_dir` and refuses undecodable data.

    Raises ConfigError naming the folder, the fraction and the worst file when more than
    MAX_UNDECODABLE_FRACTION of the sampled bytes are not UTF-8; returns the fraction otherwise.
    A file cut in the middle of a multi-byte character counts as at most one bad run.
    """
    files = list_files(text_dir)
    if max_files > 0:
        files = files[:max_files]
    step = max(1, len(files) // _SAMPLE_FILES)
    total = bad = 0
    worst = (0.0, '')
    for rel in files[::step][:_SAMPLE_FILES]:
        with open(os.path.join(text_dir, rel), 'rb') as f:
            data = f.read(_SAMPLE_BYTES_PER_FILE)
        fraction = undecodable_fraction(data)
        total += len(data)
        bad += fraction * len(data)
        worst = max(worst, (fraction, rel))
    fraction = bad / total if total else 0.0
    if fraction > MAX_UNDECODABLE_FRACTION:
        raise ConfigError(
            f'data.text_dir={text_dir!r}: {100 * fraction:.0f}% of the sampled bytes are not '
            f'UTF-8 text (most in {worst[1]!r}: {100 * worst[0]:.0f}%); the folder must hold '
            f'text files (at most {100 * MAX_UNDECODABLE_FRACTION:.0f}% undecodable bytes).')
    if fraction > WARN_UNDECODABLE_FRACTION:
        logging.warning('data.text_dir=%r: %.1f%% of the sampled bytes are not UTF-8 (most in %r)',
                        text_dir, 100 * fraction, worst[1])
    return fraction


def _file_documents(root: str, suffix: str, data_cfg: Any, split: str) -> FileDocuments:
    files = list_files(root, suffix)
    if data_cfg.max_files > 0:
        files = files[:data_cfg.max_files]
    return FileDocuments(root, split_files(files, data_cfg.eval_percent)[split])


SOURCES: Registry[Callable[[Any, str], Documents]] = Registry('data source')


@SOURCES.register('stdlib')
def _stdlib_documents(data_cfg: Any, split: str) -> Documents:
    # Contents depend on the Python version; the fingerprint keeps caches apart.
    return _file_documents(stdlib_root(), '.py', data_cfg, split)


@SOURCES.register('text_files')
def _text_file_documents(data_cfg: Any, split: str) -> Documents:
    check_text_dir(data_cfg.text_dir)
    return _file_documents(data_cfg.text_dir, '', data_cfg, split)


@SOURCES.register('tfds')
def _tfds_documents(data_cfg: Any, split: str) -> Documents:
    # Imported here: TFDS costs ~1 s to import and only this source needs it.
    from pretrain.data import tfds_local, tfds_text  # tfds_text registers LOCAL_TFDS_NAME

    name = data_cfg.tfds_name
    data_dir = data_cfg.tfds_data_dir or None
    if name == LOCAL_TFDS_NAME and data_cfg.text_dir:
        tfds_text.prepare_local_text(data_cfg.text_dir, data_dir,
                                     eval_percent=data_cfg.eval_percent)
    tfds_split = data_cfg.tfds_train_split if split == 'train' else data_cfg.tfds_eval_split
    source = tfds_local.open_array_record(name, tfds_split, data_cfg.tfds_data_dir, 'data.')
    fingerprint = _digest({
        'name': name,
        'data_dir': os.path.abspath(data_dir) if data_dir else '',
        'split': tfds_split,
        'version': str(source.dataset_info.version),
        'length': len(source),
        'key': data_cfg.tfds_text_key,
    })
    docs = TfdsDocuments(source, data_cfg.tfds_text_key, fingerprint)
    if len(docs) and data_cfg.tfds_text_key not in source[0]:
        raise ConfigError(
            f'data.tfds_text_key={data_cfg.tfds_text_key!r} is not a feature of {name!r}; '
            f'it has {sorted(source[0])}.')
    return docs


def make_documents(data_cfg: Any, split: str) -> Documents:
    """The documents of `split` ('train' or 'eval') of the configured source."""
    check_choice('split', split, SPLITS)
    return SOURCES.get(data_cfg.source, 'data.source')(data_cfg, split)


def check_data_config(data_cfg: Any) -> None:
    """Every check that needs no corpus reading; raises ConfigError on the first problem."""
    check_choice('data.source', data_cfg.source, SOURCES.names())
    check_choice('data.tokenizer', data_cfg.tokenizer, TOKENIZERS.names())
    if not isinstance(data_cfg.seq_len, int) or data_cfg.seq_len < 1:
        raise ConfigError(f'data.seq_len={data_cfg.seq_len!r} must be an integer >= 1.')
    if not 0 <= data_cfg.eval_percent <= 100:
        raise ConfigError(f'data.eval_percent={data_cfg.eval_percent!r} must be in [0, 100].')
    if data_cfg.max_files < 0:
        raise ConfigError(f'data.max_files={data_cfg.max_files!r} must be >= 0 (0 = all files).')
    if data_cfg.source == 'text_files':
        check_text_dir(data_cfg.text_dir)
        check_text_encoding(data_cfg.text_dir, data_cfg.max_files)
    if data_cfg.source == 'tfds':
        if not data_cfg.tfds_name:
            raise ConfigError("data.tfds_name is empty; it is required when data.source='tfds'.")
        if data_cfg.tfds_name == LOCAL_TFDS_NAME and data_cfg.text_dir:
            check_text_dir(data_cfg.text_dir)
            check_text_encoding(data_cfg.text_dir, data_cfg.max_files)
    if data_cfg.tokenizer == 'sentencepiece' and not os.path.isfile(data_cfg.tokenizer_path):
        raise ConfigError(
            f'data.tokenizer_path={data_cfg.tokenizer_path!r}: no such SentencePiece model file.')
    if data_cfg.cache_dir and os.path.exists(data_cfg.cache_dir) and not os.path.isdir(
            data_cfg.cache_dir):
        raise ConfigError(f'data.cache_dir={data_cfg.cache_dir!r} exists and is not a folder.')
