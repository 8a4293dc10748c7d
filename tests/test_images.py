"""Image pipeline: embedded digits, grain order and resume, the local-folder TFDS builder."""

import numpy as np
import pytest
from PIL import Image

from model_zoo import base_config
from pretrain.data import images
from pretrain.errors import ConfigError


def image_cfg(**kw):
    c = base_config().data.image
    c.update(**{'source': 'digits', 'image_size': 8, **kw})
    return c


def pipeline(cfg=None, **kw):
    args = dict(global_batch_size=8, num_eval_batches=2, seed=3)
    args.update(kw)
    return images.make_image_pipeline(cfg or image_cfg(), **args)


def test_digits_batches_shapes_range_labels_and_split():
    p = pipeline(image_cfg(image_size=16))
    batch = next(p.train_iterator())
    assert batch['images'].shape == (8, 16, 16, 3) and batch['images'].dtype == np.float32
    assert -1.0 <= batch['images'].min() and batch['images'].max() <= 1.0
    assert batch['images'].max() > 0.5 and batch['images'].min() == -1.0   # ink on background
    assert set(batch['labels'].tolist()) <= set(range(10))
    assert ((0 <= batch['u']) & (batch['u'] < 1)).all() and len(set(batch['u'].tolist())) > 1
    evals = list(p.eval_batches())
    assert len(evals) == 2 and all((b['u'] == 1).all() for b in evals)   # no dropout in eval
    assert len(p.train) + len(p.held_out) == 1797 and len(p.held_out) == 180


def test_order_depends_on_seed_and_step_not_on_process_count():
    whole = pipeline().train_iterator()
    halves = [pipeline(process_index=i, process_count=2).train_iterator() for i in range(2)]
    for _ in range(3):
        g = next(whole)
        parts = [next(h) for h in halves]
        for key in ('images', 'labels', 'u'):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), g[key])


def test_iterator_state_resumes_exactly():
    it = pipeline().train_iterator()
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    again = pipeline().train_iterator()
    again.set_state(state)
    for e in expected:
        got = next(again)
        np.testing.assert_array_equal(got['images'], e['images'])
        np.testing.assert_array_equal(got['u'], e['u'])


def test_transform_runs_on_every_local_batch():
    p = pipeline(transform=lambda b: {'n': b['labels'] * 0 + len(b['labels'])},
                 process_index=1, process_count=2)
    assert next(p.train_iterator())['n'].tolist() == [4] * 4
    assert next(p.eval_batches())['n'].tolist() == [4] * 4


def test_local_image_folder_through_tfds(tmp_path):
    rng = np.random.default_rng(0)
    for label, name in enumerate(('cats', 'dogs')):
        (tmp_path / 'img' / name).mkdir(parents=True)
        for i in range(6):
            # Non-square and another size: centre-cropped and resized to image_size.
            pixels = np.full((12, 10, 3), 40 + 150 * label, np.uint8) + rng.integers(0, 20, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / 'img' / name / f'{i}.png')
    cfg = image_cfg(source='tfds', tfds_name='local_image_folder', image_dir=str(tmp_path / 'img'),
                    tfds_data_dir=str(tmp_path / 'tfds'), eval_percent=25)
    p = pipeline(cfg, global_batch_size=4, num_eval_batches=1)
    assert p.train.num_classes == 2 and len(p.train) + len(p.held_out) == 12
    batch = next(p.train_iterator())
    assert batch['images'].shape == (4, 8, 8, 3)
    # Class 1 is brighter in every pixel: labels survived the round trip with their images.
    brightness = batch['images'].mean(axis=(1, 2, 3))
    assert ((brightness > 0) == (batch['labels'] == 1)).all()
    # A second pipeline reuses the prepared copy; a different folder there is refused.
    assert len(pipeline(cfg, global_batch_size=4, num_eval_batches=1).train) == len(p.train)
    other = image_cfg(source='tfds', tfds_name='local_image_folder', image_dir=str(tmp_path / 'img' / 'cats'),
                      tfds_data_dir=str(tmp_path / 'tfds'), eval_percent=25)
    with pytest.raises(ConfigError, match='holds no <class>/<image> files|already holds'):
        pipeline(other, global_batch_size=4, num_eval_batches=1)


def test_bad_image_config():
    with pytest.raises(ConfigError, match="data.image.source='pngs'"):
        pipeline(image_cfg(source='pngs'))
    with pytest.raises(ConfigError, match='tfds_name is empty'):
        pipeline(image_cfg(source='tfds'))
    with pytest.raises(ConfigError, match='num_classes=5 is smaller than the 10 classes'):
        pipeline(num_classes=5)
