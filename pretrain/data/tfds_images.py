"""A TFDS builder over a local folder of labelled images, stored as ArrayRecord (no TensorFlow).

Layout: `image_dir/<class name>/<image file>`; classes are the sorted sub-folder names.
Importing this module registers `local_image_folder`; `prepare_local_images` builds it, after
which `tfds.data_source('local_image_folder', data_dir=..., split=...)` reads it.
"""

import os

import tensorflow_datasets as tfds
from etils import epath

from pretrain.data import images, tfds_local
from pretrain.errors import ConfigError

_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
_TFDS_SPLITS = {'train': 'train', 'eval': 'validation'}


def list_images(image_dir: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(relative path, label)]) in a stable order; raises if there is nothing."""
    if not image_dir or not os.path.isdir(image_dir):
        raise ConfigError(f'data.image.image_dir={image_dir!r} is not a folder')
    classes = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
    files = [(f'{c}/{f}', label) for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(image_dir, c)))
             if f.lower().endswith(_EXTENSIONS)]
    if not files:
        raise ConfigError(f'data.image.image_dir={image_dir!r} holds no <class>/<image> files '
                          f'(extensions {_EXTENSIONS})')
    return classes, files


class LocalImageFolder(tfds.core.GeneratorBasedBuilder):
    """Every image under `image_dir/<class>/` is one example {'image', 'label'}."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First version.'}
    code_path = epath.Path(__file__)   # see tfds_text.py: TFDS cannot find it by itself here

    def __init__(self, *, image_dir: str = '', eval_percent: int = 10, **kwargs):
        self._image_dir = os.path.abspath(image_dir) if image_dir else ''
        self._eval_percent = eval_percent
        # Reading a prepared copy needs no folder: the class names come from the stored info.
        self._classes = list_images(self._image_dir)[0] if image_dir else None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Without the folder the names are unknown here; TFDS reads them from the prepared copy.
        label = (tfds.features.ClassLabel(names=self._classes) if self._classes
                 else tfds.features.ClassLabel())
        return tfds.core.DatasetInfo(
            builder=self,
            description='Labelled images from a local folder (one sub-folder per class).',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'label': label,
            }),
            metadata=tfds.core.MetadataDict(image_dir=self._image_dir,
                                            eval_percent=self._eval_percent),
        )

    def _split_generators(self, dl_manager):
        _, files = list_images(self._image_dir)
        split = {'train': [], 'eval': []}
        for i, item in enumerate(files):
            split['eval' if images.is_eval_index(i, self._eval_percent) else 'train'].append(item)
        return {tfds_split: self._generate_examples(split[s]) for s, tfds_split in _TFDS_SPLITS.items()}

    def _generate_examples(self, items):
        import io

        from PIL import Image

        for rel, label in items:
            # Re-encoded as RGB PNG bytes: TFDS encodes numpy images with TensorFlow, which is
            # not installed, but stores PNG/JPEG bytes as they are.
            buf = io.BytesIO()
            with Image.open(os.path.join(self._image_dir, rel)) as im:
                im.convert('RGB').save(buf, format='PNG')
            buf.seek(0)
            yield rel, {'image': buf, 'label': label}


assert LocalImageFolder.name == images.LOCAL_TFDS_NAME


def prepare_local_images(image_dir: str, data_dir: str | None,
                         eval_percent: int = 10) -> LocalImageFolder:
    """Prepares `local_image_folder` from `image_dir` into `data_dir` once; later calls reuse it."""
    builder = LocalImageFolder(image_dir=image_dir, eval_percent=eval_percent, data_dir=data_dir,
                               file_format='array_record')
    return tfds_local.prepare_once(
        builder, {'image_dir': os.path.abspath(image_dir), 'eval_percent': eval_percent},
        'data.image.tfds_data_dir', data_dir)
