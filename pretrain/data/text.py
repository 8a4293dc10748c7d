"""Text pipeline: tokenize a split into one stream, cut fixed windows, shuffle them with grain.

Contract the trainer relies on:
- The stream is every document's tokens followed by eos, concatenated. Window i is
  stream[i*L : i*L + L + 1]; inputs = w[:-1], targets = w[1:].
- Training order is a pure function of (seed, step): global batch b is elements
  [b*G, (b+1)*G) of the shuffled, repeated windows, whatever the process count; process p
  reads rows [p*G/P, (p+1)*G/P) of it.
"""

import hashlib
import json
import operator
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from pretrain.data.sources import check_data_config, make_documents
from pretrain.data.tokenizers import Tokenizer, make_tokenizer
from pretrain.errors import ConfigError

_CACHE_FORMAT = 1
_ENCODE_CHUNK = 256  # documents per tokenizer call: batched, but bounded memory


def build_stream(docs: Sequence[bytes], tokenizer: Tokenizer) -> np.ndarray:
    """All documents' tokens, each followed by eos, as one int32 array."""
    eos = np.array([tokenizer.eos_id], np.int32)
    pieces = []
    for start in range(0, len(docs), _ENCODE_CHUNK):
        batch = [docs[i] for i in range(start, min(start + _ENCODE_CHUNK, len(docs)))]
        for ids in tokenizer.encode_batch(batch):
            pieces.append(ids)
            pieces.append(eos)
    if not pieces:
        return np.zeros(0, np.int32)
    return np.concatenate(pieces).astype(np.int32, copy=False)


def load_stream(data_cfg: Any, tokenizer: Tokenizer, split: str) -> np.ndarray:
    """The token stream of `split`, from `data.cache_dir` (memory-mapped) when cached there."""
    docs = make_documents(data_cfg, split)
    if not data_cfg.cache_dir:
        return build_stream(docs, tokenizer)
    key = hashlib.sha256(json.dumps({
        'format': _CACHE_FORMAT,
        'source': data_cfg.source,
        'split': split,
        'documents': docs.fingerprint,
        'tokenizer': tokenizer.fingerprint,
    }, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(data_cfg.cache_dir, f'tokens-{data_cfg.source}-{split}-{key}.npy')
    if not os.path.exists(path):
        stream = build_stream(docs, tokenizer)
        os.makedirs(data_cfg.cache_dir, exist_ok=True)
        # Write then rename, so concurrent processes never see a half-written file.
        tmp = f'{path}.{os.getpid()}.tmp'
        with open(tmp, 'wb') as f:
            np.save(f, stream)
        os.replace(tmp, path)
    return np.load(path, mmap_mode='r')


class Windows:
    """Random-access training examples: fixed windows of L + 1 tokens over a stream."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len
        self._len = max(0, (len(stream) - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = operator.index(index)
        if not 0 <= index < self._len:
            raise IndexError(f'window {index} out of range [0, {self._len})')
        start = index * self.seq_len
        # A copy: the stream may be a memory map, and batches must own their data.
        w = np.array(self.stream[start:start + self.seq_len + 1], dtype=np.int32)
        return {'inputs': w[:-1], 'targets': w[1:]}


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def shuffled_epochs(source: Any, seed: int) -> grain.MapDataset:
    """`source` repeated without end in practice, each epoch a fresh permutation."""
    # shuffle() BEFORE repeat(): in grain 0.2.18 repeat forwards indices past the first epoch
    # to the shuffle, which reseeds with (seed + epoch), so every epoch is a fresh permutation
    # of all examples. repeat().shuffle() would instead shuffle one infinite index range and
    # not give per-epoch permutations. The per-dataset seed is derived by grain from .seed(),
    # so seeds s and s + 1 do not share shifted epochs. The epoch count is finite (~1e12
    # examples, never reached): grain's infinite length, sys.maxsize, overflows len() of a
    # batched slice when the local batch is 1.
    epochs = max(1, 2 ** 40 // len(source))
    return grain.MapDataset.source(source).seed(seed).shuffle().repeat(epochs)


class TextPipeline:
    """Train and eval batches of one process: {'inputs', 'targets'}: int32[local_batch, L]."""

    def __init__(self, tokenizer: Tokenizer, train_windows: Windows,
                 eval_windows: Windows | None, *, global_batch_size: int,
                 num_eval_batches: int, seed: int, process_index: int, process_count: int):
        self.tokenizer = tokenizer
        self.train_windows = train_windows
        self.eval_windows = eval_windows
        self.seq_len = train_windows.seq_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.num_eval_batches = num_eval_batches
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count

    def train_iterator(self) -> grain.DatasetIterator:
        """Infinite shuffled batches; get_state()/set_state() resume exactly."""
        ds = shuffled_epochs(self.train_windows, self.seed)
        # Batch element k holds shuffled rows [k*B_local, (k+1)*B_local); global batch b is
        # batch elements [b*P, (b+1)*P), and this process takes the p-th of them.
        ds = ds.batch(self.local_batch_size)[self.process_index::self.process_count]
        # Small prefetch: batches are cheap slices, and the default buffer (500) would hold
        # hundreds of large batches in memory.
        options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
        return iter(ds.to_iter_dataset(options))

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of the first `num_eval_batches` global eval batches, in order."""
        if self.num_eval_batches == 0:
            return
        n = len(self.eval_windows)
        start = self.process_index * self.local_batch_size
        for b in range(self.num_eval_batches):
            first = b * self.global_batch_size + start
            # Wrap around: small eval splits still fill every batch.
            yield _stack([self.eval_windows[(first + r) % n]
                          for r in range(self.local_batch_size)])


def _windows(data_cfg: Any, tokenizer: Tokenizer, split: str) -> Windows:
    windows = Windows(load_stream(data_cfg, tokenizer, split), data_cfg.seq_len)
    if len(windows) == 0:
        raise ConfigError(
            f'The {split!r} split of data.source={data_cfg.source!r} has '
            f'{len(windows.stream)} tokens, smaller than one sequence '
            f'(data.seq_len={data_cfg.seq_len} + 1); use more data or a shorter seq_len.')
    return windows


def make_text_pipeline(data_cfg: Any, *, global_batch_size: int, num_eval_batches: int,
                       seed: int, process_index: int = 0,
                       process_count: int = 1) -> TextPipeline:
    """Checks the config, tokenizes the train (and, if used, eval) split, returns the pipeline."""
    if global_batch_size < 1:
        raise ConfigError(f'train.global_batch_size={global_batch_size} must be >= 1.')
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(f'process_index={process_index} must be in [0, {process_count}).')
    if global_batch_size % process_count:
        raise ConfigError(
            f'train.global_batch_size={global_batch_size} is not divisible by the process '
            f'count {process_count}.')
    if num_eval_batches < 0:
        raise ConfigError(f'train.eval_batches={num_eval_batches} must be >= 0.')
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f'seed={seed!r} must be an integer >= 0.')
    check_data_config(data_cfg)
    tokenizer = make_tokenizer(data_cfg)
    train = _windows(data_cfg, tokenizer, 'train')
    held_out = _windows(data_cfg, tokenizer, 'eval') if num_eval_batches else None
    return TextPipeline(tokenizer, train, held_out, global_batch_size=global_batch_size,
                        num_eval_batches=num_eval_batches, seed=seed,
                        process_index=process_index, process_count=process_count)
