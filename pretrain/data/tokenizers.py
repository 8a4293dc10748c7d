"""Tokenizers: raw bytes or a SentencePiece model, behind one small interface."""

import abc
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pretrain.errors import ConfigError
from pretrain.registry import Registry

# SentencePiece's word-boundary marker; it stands for one space in the original text.
_SPACE_META = '\u2581'


class Tokenizer(abc.ABC):
    """Maps text to int32 token ids and back.

    `byte_lengths[i]` is how many UTF-8 bytes of (normalized) text token `i` stands for,
    0 for special tokens, so summing it over targets gives the byte count for bits-per-byte.
    """

    vocab_size: int
    eos_id: int
    byte_lengths: np.ndarray

    @abc.abstractmethod
    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids (int32) of one document, without eos."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; special tokens are dropped."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever the same text would encode differently (cache key)."""

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        """Encodes many documents; subclasses override when batching is faster."""
        return [self.encode(t) for t in texts]


class BytesTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes; 256 is eos."""

    vocab_size = 257
    eos_id = 256

    def __init__(self) -> None:
        lengths = np.ones(self.vocab_size, np.int32)
        lengths[self.eos_id] = 0
        self.byte_lengths = lengths

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, str):
            text = text.encode('utf-8')
        return np.frombuffer(text, np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, np.int64).reshape(-1)
        data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
        return data.decode('utf-8', errors='replace')

    @property
    def fingerprint(self) -> str:
        return 'bytes-v1'


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece `.model` file; its eos piece ends every document."""

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        if not path or not os.path.isfile(path):
            raise ConfigError(f'data.tokenizer_path={path!r}: no such SentencePiece model file.')
        try:
            with open(path, 'rb') as f:
                model = f.read()
            self._sp = spm.SentencePieceProcessor(model_proto=model)
        except (OSError, RuntimeError) as e:
            raise ConfigError(
                f'data.tokenizer_path={path!r}: cannot load a SentencePiece model ({e}).') from e
        self._fingerprint = 'sentencepiece-' + hashlib.sha256(model).hexdigest()
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ConfigError(
                f'data.tokenizer_path={path!r}: the model has no eos piece, which the '
                'pipeline needs to separate documents; train it with eos_id >= 0.')
        self.byte_lengths = self._piece_byte_lengths()

    def _piece_byte_lengths(self) -> np.ndarray:
        sp = self._sp
        lengths = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            if sp.is_byte(i):
                lengths[i] = 1
            else:
                lengths[i] = len(sp.id_to_piece(i).replace(_SPACE_META, ' ').encode('utf-8'))
        return lengths

    @staticmethod
    def _as_str(text: str | bytes) -> str:
        # SentencePiece needs str; undecodable bytes (rare in real corpora) become U+FFFD.
        return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self._sp.encode(self._as_str(text)), np.int32)

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        ids = self._sp.encode([self._as_str(t) for t in texts])
        return [np.asarray(x, np.int32) for x in ids]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    @property
    def fingerprint(self) -> str:
        return self._fingerprint


TOKENIZERS: Registry[Callable[[Any], Tokenizer]] = Registry('tokenizer')
TOKENIZERS.register('bytes')(lambda data_cfg: BytesTokenizer())
TOKENIZERS.register('sentencepiece')(
    lambda data_cfg: SentencePieceTokenizer(data_cfg.tokenizer_path))


def make_tokenizer(data_cfg: Any) -> Tokenizer:
    """The tokenizer named by `data.tokenizer`."""
    return TOKENIZERS.get(data_cfg.tokenizer, 'data.tokenizer')(data_cfg)
