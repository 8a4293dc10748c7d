"""Image pipeline: labelled images in [-1, 1], shuffled and batched with grain.

Contract (the same as the text pipeline's): training order is a pure function of (seed, step);
global batch b is elements [b*G, (b+1)*G) of the shuffled, repeated examples and process p
reads rows [p*G/P, (p+1)*G/P) of it. Each example is {'images': f32[S, S, 3], 'labels': i32,
'u': f32}, where `u` is a uniform draw fixed by (seed, example position) for stochastic
regularisation inside a loss (e.g. class dropout); eval examples have u = 1. A family may add a
frozen `transform` (numpy batch -> numpy batch), run on each local batch inside the pipeline.
"""

import operator
import os
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from pretrain.data import resize
from pretrain.data.text import shuffled_epochs
from pretrain.errors import ConfigError, check_choice
from pretrain.registry import Registry

SPLITS = ('train', 'eval')
LOCAL_TFDS_NAME = 'local_image_folder'   # the builder in tfds_images.py, prepared from image_dir
Batch = dict[str, np.ndarray]


def resize_square(image_HWC: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops to a square and resizes it: area when shrinking, bicubic when enlarging."""
    H, W = image_HWC.shape[:2]
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    x = image_HWC[top:top + side, left:left + side].astype(np.float64)
    if side == size:
        return x
    r = resize.matrix('area' if side > size else 'bicubic', side, size)
    return np.einsum('hH,HWc,wW->hwc', r, x, r)


def to_unit_range(image_HWC: np.ndarray, max_value: float) -> np.ndarray:
    """[0, max_value] (bicubic may overshoot: clipped) -> float32 in [-1, 1], 3 channels."""
    x = np.clip(image_HWC / max_value, 0.0, 1.0) * 2.0 - 1.0
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x.astype(np.float32)


class ImageSource:
    """Random-access labelled images of one split: {'images': f32[S,S,3], 'labels': i32}."""

    def __init__(self, get: Callable[[int], tuple[np.ndarray, int]], length: int,
                 num_classes: int):
        self._get, self._len, self.num_classes = get, length, num_classes

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = operator.index(index)
        if not 0 <= index < self._len:
            raise IndexError(f'image {index} out of range [0, {self._len})')
        image, label = self._get(index)
        return {'images': image, 'labels': np.int32(label)}


def is_eval_index(i: int, eval_percent: int) -> bool:
    """Every k-th image is held out, k = round(100 / eval_percent)."""
    return eval_percent > 0 and i % max(1, round(100 / eval_percent)) == 0


SOURCES: Registry[Callable[[Any, str], ImageSource]] = Registry('data.image.source')


@SOURCES.register('digits')
def _digits(image_cfg: Any, split: str) -> ImageSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16), upsampled bicubically."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = [i for i in range(len(digits.target))
            if is_eval_index(i, image_cfg.eval_percent) == (split == 'eval')]
    images = np.stack([to_unit_range(resize_square(digits.images[i][..., None], image_cfg.image_size), 16.0)
                       for i in keep])
    labels = digits.target[keep].astype(np.int32)
    return ImageSource(lambda i: (images[i], labels[i]), len(keep), 10)


@SOURCES.register('tfds')
def _tfds(image_cfg: Any, split: str) -> ImageSource:
    """A TFDS ArrayRecord source with 'image' (uint8 HxWxC) and 'label' features."""
    from pretrain.data import tfds_images, tfds_local   # tfds_images registers LOCAL_TFDS_NAME

    name, data_dir = image_cfg.tfds_name, image_cfg.tfds_data_dir or None
    if name == LOCAL_TFDS_NAME and image_cfg.image_dir:
        tfds_images.prepare_local_images(image_cfg.image_dir, data_dir, image_cfg.eval_percent)
    tfds_split = image_cfg.tfds_train_split if split == 'train' else image_cfg.tfds_eval_split
    source = tfds_local.open_array_record(name, tfds_split, image_cfg.tfds_data_dir, 'data.image.')
    features = source.dataset_info.features
    if 'image' not in features or 'label' not in features:
        raise ConfigError(f'data.image.tfds_name={name!r} needs features image and label; it has '
                          f'{sorted(features.keys())}')
    num_classes = features['label'].num_classes
    size = image_cfg.image_size

    def get(i: int) -> tuple[np.ndarray, int]:
        row = source[i]
        image = np.asarray(row['image'])
        image = image[..., None] if image.ndim == 2 else image[..., :3]
        return to_unit_range(resize_square(image, size), 255.0), int(row['label'])

    return ImageSource(get, len(source), num_classes)


def make_source(image_cfg: Any, split: str) -> ImageSource:
    check_choice('split', split, SPLITS)
    return SOURCES.get(image_cfg.source, 'data.image.source')(image_cfg, split)


def check_image_config(image_cfg: Any) -> None:
    """Checks that read no data; raises ConfigError naming the key, value and what is allowed."""
    check_choice('data.image.source', image_cfg.source, SOURCES.names())
    if not 0 <= image_cfg.eval_percent <= 100:
        raise ConfigError(f'data.image.eval_percent={image_cfg.eval_percent!r} must be in [0, 100]')
    if image_cfg.source == 'tfds':
        if not image_cfg.tfds_name:
            raise ConfigError("data.image.tfds_name is empty; it is required when "
                              "data.image.source='tfds'")
        if image_cfg.tfds_name == LOCAL_TFDS_NAME and image_cfg.image_dir and not os.path.isdir(
                image_cfg.image_dir):
            raise ConfigError(f'data.image.image_dir={image_cfg.image_dir!r} is not a folder')


def _stack(rows: list[dict[str, np.ndarray]]) -> Batch:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _with_u(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return dict(example, u=np.float32(rng.random()))


class ImagePipeline:
    """Train and eval batches of one process (see the module docstring)."""

    tokenizer = None   # no bits per byte for images

    def __init__(self, train: ImageSource, held_out: ImageSource | None, *,
                 global_batch_size: int, num_eval_batches: int, seed: int, process_index: int,
                 process_count: int, transform: Callable[[Batch], Batch] | None = None):
        self.train, self.held_out = train, held_out
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.num_eval_batches, self.seed = num_eval_batches, seed
        self.process_index, self.process_count = process_index, process_count
        self.transform = transform

    def train_iterator(self) -> grain.DatasetIterator:
        """Infinite shuffled batches; get_state()/set_state() resume exactly."""
        # The uniform draw is per example position, so it does not depend on the process count.
        ds = shuffled_epochs(self.train, self.seed)
        ds = ds.random_map(_with_u)
        ds = ds.batch(self.local_batch_size)[self.process_index::self.process_count]
        if self.transform is not None:
            ds = ds.map(self.transform)
        options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
        return iter(ds.to_iter_dataset(options))

    def eval_batches(self) -> Iterator[Batch]:
        """This process's rows of the first `num_eval_batches` global eval batches, in order."""
        if self.num_eval_batches == 0:
            return
        n = len(self.held_out)
        start = self.process_index * self.local_batch_size
        for b in range(self.num_eval_batches):
            first = b * self.global_batch_size + start
            batch = _stack([dict(self.held_out[(first + r) % n], u=np.float32(1.0))
                            for r in range(self.local_batch_size)])
            yield batch if self.transform is None else self.transform(batch)


def make_image_pipeline(image_cfg: Any, *, global_batch_size: int, num_eval_batches: int,
                        seed: int, process_index: int = 0, process_count: int = 1,
                        num_classes: int | None = None,
                        transform: Callable[[Batch], Batch] | None = None) -> ImagePipeline:
    """Checks the config, opens the splits, returns the pipeline."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ConfigError(f'train.global_batch_size={global_batch_size} must be >= 1 and '
                          f'divisible by the process count {process_count}')
    check_image_config(image_cfg)
    train = make_source(image_cfg, 'train')
    held_out = make_source(image_cfg, 'eval') if num_eval_batches else None
    for split, src in (('train', train), ('eval', held_out)):
        if src is not None and len(src) == 0:
            raise ConfigError(f'the {split!r} split of data.image.source={image_cfg.source!r} is '
                              'empty (check data.image.eval_percent and the dataset)')
    if num_classes is not None and train.num_classes > num_classes:
        raise ConfigError(f'model.var.num_classes={num_classes} is smaller than the '
                          f'{train.num_classes} classes of data.image.source={image_cfg.source!r}')
    return ImagePipeline(train, held_out, global_batch_size=global_batch_size,
                         num_eval_batches=num_eval_batches, seed=seed,
                         process_index=process_index, process_count=process_count,
                         transform=transform)
