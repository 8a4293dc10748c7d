"""Tokenizers: raw bytes, a SentencePiece model or a Hugging Face tokenizer.json, behind one
small interface."""

import abc
import hashlib
import json
import os
import re
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

    def special_pieces(self) -> dict[str, str]:
        """The pieces of the special ids the model defines: {'eos': '</s>', 'unk': ...}."""
        sp = self._sp
        ids = {'eos': sp.eos_id(), 'bos': sp.bos_id(), 'unk': sp.unk_id(), 'pad': sp.pad_id()}
        return {name: sp.id_to_piece(index) for name, index in ids.items() if index >= 0}

    def adds_dummy_prefix(self) -> bool:
        """Whether the model prepends a space to every text (its add_dummy_prefix option)."""
        return self._sp.encode('x', out_type=str)[0].startswith(_SPACE_META)

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


# End-of-text tokens of common Hugging Face tokenizers, tried in this order when no
# tokenizer_config.json next to the tokenizer.json names the eos token.
HF_EOS_CANDIDATES = ('<|endoftext|>', '</s>', '<eos>', '<|end_of_text|>', '<|eos|>', '[SEP]')
_BYTE_PIECE = re.compile(r'<0x[0-9A-Fa-f]{2}>')


def _decoder_steps(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The decoders of a tokenizer.json `decoder` entry, a Sequence flattened, in order."""
    if not decoder:
        return []
    if decoder.get('type') == 'Sequence':
        return [step for inner in decoder.get('decoders', []) for step in _decoder_steps(inner)]
    return [decoder]


def _hf_eos_token(path: str, vocab: dict[str, int]) -> str | None:
    """The eos token: the one a tokenizer_config.json beside `path` names, else a known name."""
    config_path = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding='utf-8') as f:
                named = json.load(f).get('eos_token')
        except (OSError, ValueError, AttributeError):
            named = None
        if isinstance(named, dict):   # transformers writes AddedToken objects as dicts
            named = named.get('content')
        if isinstance(named, str) and named in vocab:
            return named
    return next((token for token in HF_EOS_CANDIDATES if token in vocab), None)


class HfTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library); eos ends every document.

    Documents are encoded without the post-processor's special tokens (no BOS), as the
    SentencePiece tokenizer does, so the pipeline's eos is the only special token in the stream.
    """

    def __init__(self, path: str) -> None:
        if not path or not os.path.isfile(path):
            raise ConfigError(
                f'data.tokenizer_path={path!r}: no such file; data.tokenizer=\'hf\' needs the path '
                'of a Hugging Face tokenizer.json.')
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError as e:
            raise ConfigError("data.tokenizer='hf' needs the tokenizers package "
                              "(pip install 'tokenizers>=0.15').") from e
        try:
            with open(path, 'rb') as f:
                raw = f.read()
            text = raw.decode('utf-8')
            spec = json.loads(text)
            self._tokenizer = RustTokenizer.from_str(text)
        except Exception as e:   # the Rust loader raises a bare Exception for a bad file
            reason = (str(e) or type(e).__name__).splitlines()[0]
            raise ConfigError(f'data.tokenizer_path={path!r}: cannot load a Hugging Face '
                              f'tokenizer.json ({reason}).') from e
        self.path = path
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        # Ids may leave gaps (added tokens placed past the model's range): the largest id
        # bounds the vocabulary, so every id indexes byte_lengths and the model's table.
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        eos = _hf_eos_token(path, vocab)
        if eos is None:
            raise ConfigError(
                f'data.tokenizer_path={path!r}: no eos token found, which the pipeline needs to '
                f'separate documents; name it as eos_token in a tokenizer_config.json next to the '
                f'file, or add one of {list(HF_EOS_CANDIDATES)} as a special token.')
        self.eos_token = eos
        self.eos_id = int(vocab[eos])
        # The eos may come from a file beside this one, and it is part of every encoded stream.
        self._fingerprint = f'hf-{hashlib.sha256(raw).hexdigest()}-eos{self.eos_id}'
        self.byte_lengths = self._piece_byte_lengths(spec, vocab)

    def _piece_byte_lengths(self, spec: dict[str, Any], vocab: dict[str, int]) -> np.ndarray:
        """UTF-8 bytes each token stands for, read through the file's decoder chain.

        Byte-level pieces (GPT-2 style) are one byte per character of their byte alphabet;
        byte-fallback pieces `<0xNN>` one byte; Metaspace and Replace turn their marker into the
        space it stands for (counted, as SentencePiece's is), so does a BPE end-of-word suffix;
        a WordPiece continuation prefix is dropped. Special tokens and the unknown token stand
        for no text: 0.
        """
        from tokenizers.pre_tokenizers import ByteLevel

        steps = _decoder_steps(spec.get('decoder'))
        kinds = {step.get('type') for step in steps}
        byte_alphabet = set(ByteLevel.alphabet()) if 'ByteLevel' in kinds else set()
        special = {t['content'] for t in spec.get('added_tokens', []) if t.get('special')}
        plain_added = {t['content'] for t in spec.get('added_tokens', []) if not t.get('special')}
        unknown = (spec.get('model') or {}).get('unk_token')
        lengths = np.zeros(self.vocab_size, np.int32)
        for piece, index in vocab.items():
            if piece in special or piece == unknown:
                continue
            if piece in plain_added:   # added tokens are stored as the text they match
                lengths[index] = len(piece.encode('utf-8'))
                continue
            if 'ByteFallback' in kinds and _BYTE_PIECE.fullmatch(piece):
                lengths[index] = 1
                continue
            text = piece
            for step in steps:
                kind = step.get('type')
                if kind == 'Metaspace':
                    text = text.replace(step.get('replacement', _SPACE_META), ' ')
                elif kind == 'Replace' and 'String' in (step.get('pattern') or {}):
                    text = text.replace(step['pattern']['String'], step.get('content', ''))
                elif kind == 'WordPiece' and text.startswith(step.get('prefix', '##')):
                    text = text[len(step.get('prefix', '##')):]
                elif kind == 'BPEDecoder' and text.endswith(step.get('suffix', '</w>')):
                    text = text[:-len(step.get('suffix', '</w>'))] + ' '
            lengths[index] = sum(1 if c in byte_alphabet else len(c.encode('utf-8')) for c in text)
        return lengths

    @staticmethod
    def _as_str(text: str | bytes) -> str:
        # The Rust tokenizer needs str; undecodable bytes (rare in real corpora) become U+FFFD.
        return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text

    def encode(self, text: str | bytes) -> np.ndarray:
        ids = self._tokenizer.encode(self._as_str(text), add_special_tokens=False).ids
        return np.asarray(ids, np.int32)

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch([self._as_str(t) for t in texts],
                                                 add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                      skip_special_tokens=True)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint


TOKENIZERS: Registry[Callable[[Any], Tokenizer]] = Registry('tokenizer')
TOKENIZERS.register('bytes')(lambda data_cfg: BytesTokenizer())
TOKENIZERS.register('sentencepiece')(
    lambda data_cfg: SentencePieceTokenizer(data_cfg.tokenizer_path))
TOKENIZERS.register('hf')(lambda data_cfg: HfTokenizer(data_cfg.tokenizer_path))


def make_tokenizer(data_cfg: Any) -> Tokenizer:
    """The tokenizer named by `data.tokenizer`."""
    return TOKENIZERS.get(data_cfg.tokenizer, 'data.tokenizer')(data_cfg)
