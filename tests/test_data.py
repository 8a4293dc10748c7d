"""Tests for pretrain.data: tokenizers, sources, packing, order, resume, TFDS."""

import json
import random

import numpy as np
import pytest

from model_zoo import base_config
from pretrain.data import TOKENIZERS, check_data_config, make_text_pipeline, make_tokenizer
from pretrain.data import sources
from pretrain.data.text import Windows, build_stream
from pretrain.errors import ConfigError


def data_cfg(**overrides):
    cfg = base_config().data
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def write_corpus(folder, num_files=6, chars=400, seed=0):
    """Random-letter files, so every window of the stream is distinct."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(num_files):
        text = ''.join(rng.choice('abcdefghijklmnopqrstuvwxyz \n') for _ in range(chars))
        (folder / f'doc{i:02d}.txt').write_text(text)
        texts[f'doc{i:02d}.txt'] = text
    return texts


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- tokenizers

def test_bytes_tokenizer_round_trip_and_byte_lengths():
    tok = make_tokenizer(data_cfg(tokenizer='bytes'))
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    text = 'def f(x):\n    return "ünïcode €"\n'
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, tok.encode(text.encode('utf-8')))
    assert tok.decode(np.append(ids, tok.eos_id)) == text
    assert tok.byte_lengths.shape == (257,)
    assert tok.byte_lengths[tok.eos_id] == 0
    assert tok.byte_lengths[ids].sum() == len(text.encode('utf-8'))


def _train_spm(folder, name, **kwargs):
    import sentencepiece as spm
    rng = random.Random(1)
    words = ['def', 'return', 'self', 'import', 'class', 'for', 'in', 'if', 'else', 'x', 'y']
    lines = [' '.join(rng.choice(words) for _ in range(8)) for _ in range(400)]
    corpus = folder / f'{name}.txt'
    corpus.write_text('\n'.join(lines))
    # Identity normalization and byte fallback make encode/decode lossless; the 256 byte
    # pieces set the vocabulary floor.
    options = dict(add_dummy_prefix=False, remove_extra_whitespaces=False)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / name), vocab_size=300,
        model_type='bpe', byte_fallback=True, normalization_rule_name='identity',
        minloglevel=2, **{**options, **kwargs})
    return str(folder / f'{name}.model')


@pytest.fixture(scope='module')
def spm_model(tmp_path_factory):
    return _train_spm(tmp_path_factory.mktemp('spm'), 'tiny')


def test_sentencepiece_round_trip_eos_and_byte_lengths(spm_model):
    tok = make_tokenizer(data_cfg(tokenizer='sentencepiece', tokenizer_path=spm_model))
    assert tok.vocab_size == 300
    assert tok.eos_id == 2  # SentencePiece's default eos id
    assert tok.byte_lengths.shape == (300,)
    assert tok.byte_lengths[tok.eos_id] == 0
    text = 'def self(x):\n  return ünïcode € y'  # unseen characters go through byte fallback
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == text
    assert tok.decode(np.append(ids, tok.eos_id)) == text
    assert tok.byte_lengths[ids].sum() == len(text.encode('utf-8'))
    batch = tok.encode_batch([text, text.encode('utf-8')])
    np.testing.assert_array_equal(batch[0], ids)
    np.testing.assert_array_equal(batch[1], ids)


def test_sentencepiece_without_eos_is_rejected(tmp_path):
    path = _train_spm(tmp_path, 'noeos', eos_id=-1)
    with pytest.raises(ConfigError, match='eos'):
        make_tokenizer(data_cfg(tokenizer='sentencepiece', tokenizer_path=path))


def test_missing_or_bad_tokenizer_file(tmp_path):
    missing = str(tmp_path / 'nope.model')
    for call in (make_tokenizer, check_data_config):
        with pytest.raises(ConfigError, match='data.tokenizer_path') as err:
            call(data_cfg(tokenizer='sentencepiece', tokenizer_path=missing))
        assert missing in str(err.value)
    garbage = tmp_path / 'garbage.model'
    garbage.write_bytes(b'not a model')
    with pytest.raises(ConfigError, match='data.tokenizer_path') as err:
        make_tokenizer(data_cfg(tokenizer='sentencepiece', tokenizer_path=str(garbage)))
    assert str(garbage) in str(err.value)


# ----------------------------------------------------------------------------- sources

def test_stdlib_split_is_disjoint_deterministic_and_non_empty():
    cfg = data_cfg(source='stdlib')
    train = sources.make_documents(cfg, 'train')
    held = sources.make_documents(cfg, 'eval')
    assert len(train) > 100 and len(held) > 0
    assert not set(train.relpaths) & set(held.relpaths)
    everything = sources.list_files(sources.stdlib_root(), '.py')
    assert sorted(train.relpaths + held.relpaths) == everything
    assert not any('site-packages' in p for p in everything)
    assert all(sources.is_eval_file(p, cfg.eval_percent) for p in held.relpaths)
    again = sources.make_documents(cfg, 'eval')
    assert again.relpaths == held.relpaths and again.fingerprint == held.fingerprint
    assert isinstance(held[0], bytes)


def test_max_files_keeps_the_first_files_and_eval_is_never_empty():
    cfg = data_cfg(source='stdlib', max_files=5)
    train = sources.make_documents(cfg, 'train')
    held = sources.make_documents(cfg, 'eval')
    assert sorted(train.relpaths + held.relpaths) == sources.list_files(
        sources.stdlib_root(), '.py')[:5]
    assert len(held) >= 1 and len(train) >= 1


def test_text_files_split_and_fallback(tmp_path):
    write_corpus(tmp_path / 'c', num_files=3)
    cfg = data_cfg(source='text_files', text_dir=str(tmp_path / 'c'), eval_percent=1)
    train = sources.make_documents(cfg, 'train')
    held = sources.make_documents(cfg, 'eval')
    assert len(train) >= 1 and len(held) >= 1
    assert sorted(train.relpaths + held.relpaths) == ['doc00.txt', 'doc01.txt', 'doc02.txt']


@pytest.mark.parametrize('make', ['missing', 'empty', 'unset'])
def test_text_files_without_files_is_a_config_error(tmp_path, make):
    folder = tmp_path / 'texts'
    if make == 'empty':
        (folder / 'sub').mkdir(parents=True)
    text_dir = '' if make == 'unset' else str(folder)
    cfg = data_cfg(source='text_files', text_dir=text_dir)
    for call in (check_data_config, lambda c: sources.make_documents(c, 'train')):
        with pytest.raises(ConfigError, match='data.text_dir') as err:
            call(cfg)
        if make != 'unset':
            assert 'contains no files' in str(err.value) and str(folder) in str(err.value)


# ----------------------------------------------------------------------------- packing

def test_windows_shift_by_one_and_match_the_stream():
    stream = np.arange(23, dtype=np.int32)
    windows = Windows(stream, 5)
    assert len(windows) == 4  # (23 - 1) // 5
    for i in range(4):
        w = windows[i]
        np.testing.assert_array_equal(w['inputs'], stream[i * 5:i * 5 + 5])
        np.testing.assert_array_equal(w['targets'], stream[i * 5 + 1:i * 5 + 6])
    with pytest.raises(IndexError):
        windows[4]


def test_stream_appends_eos_after_every_document():
    tok = make_tokenizer(data_cfg())
    stream = build_stream([b'ab', b'', b'c'], tok)
    np.testing.assert_array_equal(stream, [97, 98, 256, 256, 99, 256])


def test_pipeline_rows_are_windows_of_the_stream(tmp_path):
    write_corpus(tmp_path / 'c')
    cfg = data_cfg(source='text_files', text_dir=str(tmp_path / 'c'), seq_len=16)
    pipe = make_text_pipeline(cfg, global_batch_size=4, num_eval_batches=1, seed=0)
    stream = np.asarray(pipe.train_windows.stream)
    starts = {stream[i:i + 16].tobytes(): i for i in range(0, len(stream) - 16, 16)}
    batch = next(pipe.train_iterator())
    assert batch['inputs'].shape == batch['targets'].shape == (4, 16)
    assert batch['inputs'].dtype == batch['targets'].dtype == np.int32
    for x, y in zip(batch['inputs'], batch['targets']):
        start = starts[x.tobytes()]
        np.testing.assert_array_equal(y, stream[start + 1:start + 17])
    text = pipe.tokenizer.decode(batch['inputs'][0])
    assert len(text) == 16  # single-byte letters: one token per character


# ----------------------------------------------------------------------------- order

@pytest.fixture(scope='module')
def tiny_cfg(tmp_path_factory):
    folder = tmp_path_factory.mktemp('tiny')
    write_corpus(folder, num_files=6, chars=100)
    # ~600 tokens / 16 = ~37 windows: an epoch is ~4-5 batches of 8.
    return data_cfg(source='text_files', text_dir=str(folder), seq_len=16, eval_percent=20)


def window_ids(pipe, batches):
    """Index of the window behind every row, in order."""
    lookup = {pipe.train_windows[i]['inputs'].tobytes(): i for i in range(len(pipe.train_windows))}
    assert len(lookup) == len(pipe.train_windows)  # rows identify their window
    return [lookup[row.tobytes()] for b in batches for row in b['inputs']]


def test_same_seed_same_batches_other_seed_differs(tiny_cfg):
    make = lambda seed: make_text_pipeline(tiny_cfg, global_batch_size=8, num_eval_batches=0,
                                           seed=seed)
    a = take(make(3).train_iterator(), 6)
    b = take(make(3).train_iterator(), 6)
    c = take(make(4).train_iterator(), 6)
    assert_batches_equal(a, b)
    assert not all(np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, c))


def test_process_shards_concatenate_to_the_global_batch_across_epochs(tiny_cfg):
    kwargs = dict(global_batch_size=8, num_eval_batches=0, seed=7)
    single = make_text_pipeline(tiny_cfg, **kwargs)
    n = len(single.train_windows)
    steps = 3 * n // 8 + 1  # crosses two epoch boundaries
    whole = take(single.train_iterator(), steps)
    parts = [take(make_text_pipeline(tiny_cfg, process_index=p, process_count=2,
                                     **kwargs).train_iterator(), steps) for p in range(2)]
    for step in range(steps):
        for key in ('inputs', 'targets'):
            assert parts[0][step][key].shape == (4, 16)
            np.testing.assert_array_equal(
                np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])

    order = window_ids(single, whole)
    epochs = [order[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # every epoch is a permutation
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))


def test_batch_of_one_per_process_reads_the_batch_of_two(tiny_cfg):
    """A local batch of 1 (long-context runs) works, on one process or as half of two."""
    kwargs = dict(num_eval_batches=0, seed=5)
    one = take(make_text_pipeline(tiny_cfg, global_batch_size=1, **kwargs).train_iterator(), 4)
    assert [b['inputs'].shape for b in one] == [(1, 16)] * 4
    whole = take(make_text_pipeline(tiny_cfg, global_batch_size=2, **kwargs).train_iterator(), 3)
    halves = [take(make_text_pipeline(tiny_cfg, global_batch_size=2, process_index=p,
                                      process_count=2, **kwargs).train_iterator(), 3)
              for p in range(2)]
    for step in range(3):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][step]['inputs'], halves[1][step]['inputs']]),
            whole[step]['inputs'])


def test_resume_from_state(tiny_cfg):
    make = lambda: make_text_pipeline(tiny_cfg, global_batch_size=8, num_eval_batches=0, seed=1)
    it = make().train_iterator()
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # checkpointed state is JSON
    expected = take(it, 5)
    fresh = make().train_iterator()
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 5), expected)


def test_eval_batches_are_deterministic_sharded_and_wrap(tiny_cfg):
    kwargs = dict(global_batch_size=8, num_eval_batches=6, seed=0)
    single = make_text_pipeline(tiny_cfg, **kwargs)
    n = len(single.eval_windows)
    assert 6 * 8 > n  # forces wrap-around
    whole = list(single.eval_batches())
    assert len(whole) == 6
    assert_batches_equal(whole, list(single.eval_batches()))
    expected = [single.eval_windows[i % n]['inputs'] for i in range(6 * 8)]
    np.testing.assert_array_equal(np.concatenate([b['inputs'] for b in whole]), expected)
    parts = [list(make_text_pipeline(tiny_cfg, process_index=p, process_count=2, **kwargs)
                  .eval_batches()) for p in range(2)]
    for step in range(6):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][step]['targets'], parts[1][step]['targets']]),
            whole[step]['targets'])


def test_cache_is_reused_and_memory_mapped(tiny_cfg, tmp_path):
    cfg = data_cfg(**{**tiny_cfg.to_dict(), 'cache_dir': str(tmp_path / 'cache')})
    first = make_text_pipeline(cfg, global_batch_size=8, num_eval_batches=1, seed=0)
    files = sorted(p.name for p in (tmp_path / 'cache').iterdir())
    assert len(files) == 2 and all(f.endswith('.npy') for f in files)
    second = make_text_pipeline(cfg, global_batch_size=8, num_eval_batches=1, seed=0)
    assert isinstance(second.train_windows.stream, np.memmap)
    plain = make_text_pipeline(tiny_cfg, global_batch_size=8, num_eval_batches=1, seed=0)
    np.testing.assert_array_equal(second.train_windows.stream, plain.train_windows.stream)
    assert_batches_equal(take(first.train_iterator(), 3), take(plain.train_iterator(), 3))


# ----------------------------------------------------------------------------- TFDS

def test_tfds_local_text_files_round_trip(tmp_path):
    from pretrain.data import tfds_text
    texts = write_corpus(tmp_path / 'txt', num_files=5, chars=200)
    data_dir = str(tmp_path / 'tfds')
    tfds_text.prepare_local_text(str(tmp_path / 'txt'), data_dir, eval_percent=20)
    cfg = data_cfg(source='tfds', tfds_name='local_text_files', tfds_data_dir=data_dir,
                   seq_len=32, eval_percent=20)
    docs = [d.decode() for split in ('train', 'eval') for d in sources.make_documents(cfg, split)]
    assert sorted(docs) == sorted(texts.values())
    held = sources.make_documents(cfg, 'eval')
    expected_eval = sources.split_files(sorted(texts), 20)['eval']
    assert sorted(d.decode() for d in held) == sorted(texts[f] for f in expected_eval)

    pipe = make_text_pipeline(cfg, global_batch_size=4, num_eval_batches=2, seed=0)
    batch = next(pipe.train_iterator())
    assert batch['inputs'].shape == (4, 32)
    assert pipe.tokenizer.decode(batch['inputs'][0]) in ''.join(texts.values())
    assert len(list(pipe.eval_batches())) == 2

    # text_dir in the config prepares on demand; a different folder in the same dir is refused.
    auto = data_cfg(**{**cfg.to_dict(), 'text_dir': str(tmp_path / 'txt')})
    assert len(sources.make_documents(auto, 'train')) == len(sources.make_documents(cfg, 'train'))
    write_corpus(tmp_path / 'other', num_files=2)
    with pytest.raises(ConfigError, match='already holds'):
        tfds_text.prepare_local_text(str(tmp_path / 'other'), data_dir, eval_percent=20)


def test_tfds_errors(tmp_path):
    with pytest.raises(ConfigError, match='data.tfds_name'):
        check_data_config(data_cfg(source='tfds'))
    cfg = data_cfg(source='tfds', tfds_name='local_text_files', tfds_data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match='data.tfds_name'):
        sources.make_documents(cfg, 'train')


# ----------------------------------------------------------------------------- config errors

def test_unknown_source_and_tokenizer_list_the_choices():
    with pytest.raises(ConfigError, match='data.source') as err:
        check_data_config(data_cfg(source='stdlb'))
    assert all(name in str(err.value) for name in ('stdlib', 'text_files', 'tfds'))
    assert "Did you mean 'stdlib'" in str(err.value)
    with pytest.raises(ConfigError, match='data.tokenizer') as err:
        make_text_pipeline(data_cfg(tokenizer='bpe'), global_batch_size=8, num_eval_batches=0,
                           seed=0)
    assert all(name in str(err.value) for name in TOKENIZERS.names())


def test_bad_batch_seq_len_and_seed(tiny_cfg):
    with pytest.raises(ConfigError, match='not divisible'):
        make_text_pipeline(tiny_cfg, global_batch_size=9, num_eval_batches=0, seed=0,
                           process_count=2)
    with pytest.raises(ConfigError, match='data.seq_len'):
        check_data_config(data_cfg(seq_len=0))
    with pytest.raises(ConfigError, match='seed'):
        make_text_pipeline(tiny_cfg, global_batch_size=8, num_eval_batches=0, seed=-1)


def test_split_smaller_than_one_sequence(tmp_path):
    write_corpus(tmp_path / 'c', num_files=2, chars=10)
    cfg = data_cfg(source='text_files', text_dir=str(tmp_path / 'c'), seq_len=1000)
    with pytest.raises(ConfigError, match='smaller than one sequence'):
        make_text_pipeline(cfg, global_batch_size=8, num_eval_batches=0, seed=0)
