"""A TFDS builder over a local folder of text files, stored as ArrayRecord (no TensorFlow).

Importing this module registers `local_text_files`; `prepare_local_text` builds it, after
which `tfds.data_source('local_text_files', data_dir=..., split=...)` reads it.
"""

import os

import tensorflow_datasets as tfds
from etils import epath

from pretrain.data import sources, tfds_local

# TFDS split names; 'validation' holds the files the hash rule sends to eval.
_TFDS_SPLITS = {'train': 'train', 'eval': 'validation'}


class LocalTextFiles(tfds.core.GeneratorBasedBuilder):
    """Every regular file under `text_dir` is one example {'text': ...}; hash-split like sources."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First version.'}
    # TFDS would find this module through the `importlib_resources` backport, which is not
    # installed (Python >= 3.9 does not need it) and fails download_and_prepare; give it directly.
    code_path = epath.Path(__file__)

    def __init__(self, *, text_dir: str = '', eval_percent: int = 2, **kwargs):
        # Only preparing needs the folder; reading a prepared copy works without it.
        self._text_dir = os.path.abspath(text_dir) if text_dir else ''
        self._eval_percent = eval_percent
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs would look for metadata files
        # (README, CITATIONS) next to this module.
        return tfds.core.DatasetInfo(
            builder=self,
            description='Text files from a local folder, one example per file.',
            features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
            # Stored with the prepared data so a mismatched re-prepare can be detected.
            metadata=tfds.core.MetadataDict(
                text_dir=self._text_dir, eval_percent=self._eval_percent),
        )

    def _split_generators(self, dl_manager):
        sources.check_text_dir(self._text_dir)
        files = sources.split_files(sources.list_files(self._text_dir), self._eval_percent)
        return {tfds_split: self._generate_examples(files[split])
                for split, tfds_split in _TFDS_SPLITS.items()}

    def _generate_examples(self, relpaths):
        for rel in relpaths:
            with open(os.path.join(self._text_dir, rel), 'rb') as f:
                yield rel, {'text': f.read()}


assert LocalTextFiles.name == sources.LOCAL_TFDS_NAME


def prepare_local_text(text_dir: str, data_dir: str | None,
                       eval_percent: int = 2) -> LocalTextFiles:
    """Prepares `local_text_files` from `text_dir` into `data_dir` once; later calls reuse it.

    Not safe to run from several processes at once on the same data_dir: prepare it before
    a multi-process launch.
    """
    sources.check_text_dir(text_dir)
    builder = LocalTextFiles(text_dir=text_dir, eval_percent=eval_percent,
                             data_dir=data_dir, file_format='array_record')
    return tfds_local.prepare_once(
        builder, {'text_dir': os.path.abspath(text_dir), 'eval_percent': eval_percent},
        'data.tfds_data_dir', data_dir)
