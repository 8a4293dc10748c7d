"""data.tokenizer='hf' (a Hugging Face tokenizer.json) and the tokenizer files the HF export writes.

Every tokenizer here is trained on a few strings in a temporary folder; nothing is downloaded.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pretrain import export, train
from pretrain.data import TOKENIZERS, make_tokenizer
from pretrain.errors import ConfigError
from pretrain.metrics import read_metrics
from tests.helpers import tiny_config
from tests.test_data import _train_spm, data_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = '<|endoftext|>'
TEXTS = ['def f(x):\n    return x + 1\n', 'import numpy as np\n', 'hello world, hello tokens\n',
         'class Model:\n    pass\n', 'for i in range(10): print(i)\n']


def train_byte_level_bpe(path: str, texts: list[str] = TEXTS, vocab_size: int = 300) -> str:
    """A GPT-2 style tokenizer (byte-level BPE, every byte in the alphabet) saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts * 20, trainer)
    tokenizer.save(path)
    return path


@pytest.fixture(scope='module')
def hf_path(tmp_path_factory) -> str:
    return train_byte_level_bpe(str(tmp_path_factory.mktemp('hf') / 'tokenizer.json'))


def test_hf_tokenizer_round_trip_eos_and_byte_lengths(hf_path):
    assert 'hf' in TOKENIZERS.names()
    tok = make_tokenizer(data_cfg(tokenizer='hf', tokenizer_path=hf_path))
    assert tok.vocab_size == 300 and tok.eos_id == 0 and tok.eos_token == EOS
    assert tok.byte_lengths.shape == (300,) and tok.byte_lengths[tok.eos_id] == 0
    text = 'def self(x):\n  return ünïcode € y'   # unseen characters: byte-level pieces
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and tok.eos_id not in ids
    assert len(ids) < len(text.encode('utf-8'))   # merges were learned
    assert tok.decode(ids) == text
    assert tok.decode(np.append(ids, tok.eos_id)) == text
    # The bits-per-byte contract: the target tokens' byte lengths sum to the text's bytes.
    assert tok.byte_lengths[ids].sum() == len(text.encode('utf-8'))
    batch = tok.encode_batch([text, text.encode('utf-8'), ''])
    np.testing.assert_array_equal(batch[0], ids)
    np.testing.assert_array_equal(batch[1], ids)
    assert batch[2].dtype == np.int32 and batch[2].size == 0


def test_hf_byte_lengths_of_a_metaspace_tokenizer(tmp_path):
    """SentencePiece-style files (Metaspace): the word marker counts as the space it stands for."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme='never')
    tokenizer.decoder = decoders.Metaspace(prepend_scheme='never')
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=['<unk>', '</s>'],
                                  show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    path = str(tmp_path / 'tokenizer.json')
    tokenizer.save(path)
    tok = make_tokenizer(data_cfg(tokenizer='hf', tokenizer_path=path))
    assert tok.eos_token == '</s>' and tok.byte_lengths[tok.eos_id] == 0
    assert tok.byte_lengths[tokenizer.token_to_id('<unk>')] == 0
    text = 'hello world, return x + 1'
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.byte_lengths[ids].sum() == len(text.encode('utf-8'))


def test_hf_fingerprint_follows_the_file_and_its_eos(tmp_path, hf_path):
    same = str(tmp_path / 'copy' / 'tokenizer.json')
    os.makedirs(os.path.dirname(same))
    shutil.copyfile(hf_path, same)
    other = train_byte_level_bpe(str(tmp_path / 'other.json'), texts=TEXTS[:2])
    first = make_tokenizer(data_cfg(tokenizer='hf', tokenizer_path=hf_path)).fingerprint
    assert make_tokenizer(data_cfg(tokenizer='hf', tokenizer_path=same)).fingerprint == first
    assert make_tokenizer(data_cfg(tokenizer='hf', tokenizer_path=other)).fingerprint != first
    # A tokenizer_config.json beside the file may name another eos: other streams, other key.
    from tokenizers import Tokenizer
    piece = Tokenizer.from_file(same).id_to_token(5)
    with open(os.path.join(os.path.dirname(same), 'tokenizer_config.json'), 'w') as f:
        json.dump({'eos_token': {'content': piece}}, f)
    renamed = make_tokenizer(data_cfg(tokenizer='hf', tokenizer_path=same))
    assert renamed.eos_id == 5 and renamed.fingerprint != first


def test_hf_tokenizer_config_errors(tmp_path):
    missing = str(tmp_path / 'nope' / 'tokenizer.json')
    with pytest.raises(ConfigError, match='data.tokenizer_path') as err:
        make_tokenizer(data_cfg(tokenizer='hf', tokenizer_path=missing))
    assert missing in str(err.value) and 'tokenizer.json' in str(err.value)
    garbage = tmp_path / 'garbage.json'
    garbage.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ConfigError, match='data.tokenizer_path') as err:
        make_tokenizer(data_cfg(tokenizer='hf', tokenizer_path=str(garbage)))
    assert str(garbage) in str(err.value) and '\n' not in str(err.value)
    from tokenizers import Tokenizer, models
    no_eos = str(tmp_path / 'no_eos.json')
    Tokenizer(models.WordLevel({'a': 0, 'b': 1}, unk_token='a')).save(no_eos)
    with pytest.raises(ConfigError, match='eos'):
        make_tokenizer(data_cfg(tokenizer='hf', tokenizer_path=no_eos))
    # Through the trainer: refused by validation, before the workdir or any array exists.
    c = tiny_config()
    c.data.update(tokenizer='hf', tokenizer_path=missing)
    workdir = tmp_path / 'run'
    with pytest.raises(ConfigError, match='data.tokenizer_path'):
        train.run(c, str(workdir))
    assert not workdir.exists()


@pytest.fixture(scope='module')
def hf_run(tmp_path_factory, hf_path):
    """A few steps of the real entry point with --config.data.tokenizer=hf: (workdir, process)."""
    workdir = str(tmp_path_factory.mktemp('hf_run'))
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    tiny = ['--config.model.d_model=32', '--config.model.d_ff=64', '--config.model.n_layers=2',
            '--config.data.seq_len=32', '--config.data.max_files=40',
            '--config.train.global_batch_size=8', '--config.train.steps=3',
            '--config.train.log_every=1', '--config.train.eval_every=3',
            '--config.train.eval_batches=1', '--config.schedule.warmup_steps=1',
            '--config.schedule.decay_steps=1', '--config.metrics.tensorboard=False',
            '--config.metrics.peak_flops_per_device=1e12']
    process = subprocess.run(
        [sys.executable, '-m', 'pretrain.train', '--config=configs/lm_tiny.py',
         f'--workdir={workdir}', '--config.data.tokenizer=hf',
         f'--config.data.tokenizer_path={hf_path}', *tiny],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    return workdir, process


def test_training_through_the_cli_with_the_hf_tokenizer(hf_run, hf_path):
    workdir, process = hf_run
    assert process.returncode == 0, process.stderr[-3000:]
    rows = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
    train_rows = [r for r in rows if r['split'] == 'train']
    assert [r['step'] for r in train_rows] == [1, 2, 3]
    assert all(np.isfinite(r['loss']) for r in train_rows)
    evals = [r for r in rows if r['split'] == 'eval']
    assert evals and 0 < evals[-1]['bits_per_byte'] < 50
    with open(os.path.join(workdir, 'config.json')) as f:
        saved = json.load(f)
    assert saved['data']['tokenizer'] == 'hf' and saved['data']['tokenizer_path'] == hf_path


def test_export_writes_the_hf_tokenizer_files(hf_run, hf_path, tmp_path):
    workdir, process = hf_run
    assert process.returncode == 0, process.stderr[-3000:]
    out = str(tmp_path / 'exported')
    result = export.export_hf(workdir, out)
    assert result['tokenizer_files'] == ['tokenizer.json', export.TOKENIZER_CONFIG]
    with open(os.path.join(out, 'tokenizer.json'), 'rb') as f, open(hf_path, 'rb') as g:
        assert f.read() == g.read()
    with open(os.path.join(out, export.TOKENIZER_CONFIG)) as f:
        config = json.load(f)
    assert config['tokenizer_class'] == 'PreTrainedTokenizerFast'
    assert config['eos_token'] == EOS and config['model_max_length'] == 32
    assert sorted(os.listdir(out)) == sorted(
        ['config.json', export.SINGLE_FILE, 'tokenizer.json', export.TOKENIZER_CONFIG])
    line = export.summary(result, workdir, out)
    assert 'tokenizer.json' in line and 'no tokenizer files' not in line


def test_export_tokenizer_files_for_sentencepiece_and_bytes(tmp_path):
    model = _train_spm(tmp_path, 'spm')
    c = tiny_config()
    c.data.update(tokenizer='sentencepiece', tokenizer_path=model)
    plan = export.tokenizer_files(c)
    out = tmp_path / 'out_spm'
    out.mkdir()
    assert export.write_tokenizer(plan, str(out)) == ['tokenizer.model', export.TOKENIZER_CONFIG]
    assert (out / 'tokenizer.model').read_bytes() == (tmp_path / 'spm.model').read_bytes()
    config = json.loads((out / export.TOKENIZER_CONFIG).read_text())
    assert config['tokenizer_class'] == 'LlamaTokenizer'
    assert config['add_bos_token'] is False and config['add_eos_token'] is False
    assert config['add_prefix_space'] is False   # as the model was trained (HF's default: True)
    specials = (config['eos_token'], config['bos_token'], config['unk_token'])
    assert specials == ('</s>', '<s>', '<unk>')

    plan = export.tokenizer_files(tiny_config())   # bytes: nothing HF could load
    empty = tmp_path / 'out_bytes'
    empty.mkdir()
    assert export.write_tokenizer(plan, str(empty)) == [] and not os.listdir(empty)
    line = export.summary({'step': 2, 'files': [export.SINGLE_FILE], 'tokenizer_files': [],
                           'tokenizer_note': plan['note']}, 'runs/x', 'out/x')
    assert line.endswith(export.BYTES_NOTE) and 'no tokenizer files' in line

    moved = tiny_config()   # a tokenizer file gone since training: refused before writing
    moved.data.update(tokenizer='hf', tokenizer_path=str(tmp_path / 'gone.json'))
    with pytest.raises(ConfigError, match='data.tokenizer_path'):
        export.tokenizer_files(moved)


@pytest.mark.interop
def test_transformers_autotokenizer_loads_the_exported_files_and_agrees(hf_path, tmp_path):
    """The exported tokenizer files, loaded the way evaluation tools load them, give the ids the
    run trained on (for the hf and sentencepiece tokenizers), and the same eos."""
    transformers = pytest.importorskip('transformers')
    spm_path = _train_spm(tmp_path, 'spm')
    spm_prefixed = _train_spm(tmp_path, 'spm_prefixed', add_dummy_prefix=True)
    texts = ['def f(x):\n    return x + 1', 'self import class for', '  two  spaces and ünïcode €']
    for kind, path in (('hf', hf_path), ('sentencepiece', spm_path),
                       ('sentencepiece', spm_prefixed)):
        c = tiny_config()
        c.data.update(tokenizer=kind, tokenizer_path=path)
        out = tmp_path / f'out_{os.path.basename(path)}'
        out.mkdir()
        export.write_tokenizer(export.tokenizer_files(c), str(out))
        ours = make_tokenizer(c.data)
        theirs = transformers.AutoTokenizer.from_pretrained(str(out))
        prefixed = kind == 'sentencepiece' and ours.adds_dummy_prefix()
        for text in texts:
            if prefixed and text[0].isspace():
                continue   # HF adds no dummy prefix before leading spaces (export docstring)
            expected = ours.encode(text).tolist()
            assert theirs(text, add_special_tokens=False)['input_ids'] == expected, (path, text)
            assert theirs.decode(expected) == ours.decode(expected), (path, text)
        assert theirs.eos_token_id == ours.eos_id, kind
