"""examples/data.py: the synthetic glyph dataset is deterministic, balanced and well-formed."""

import data  # examples/data.py (conftest puts examples/ on sys.path)
import numpy as np
import pytest


def test_generate_shapes_range_and_balance():
    images, labels = data.generate(50, image_size=20, channels=3, seed=1)
    assert images.shape == (50, 20, 20, 3) and images.dtype == np.float32
    assert labels.shape == (50,) and labels.dtype == np.int32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 5))
    # Every image has ink and background: the glyph is on the canvas.
    spread = images.reshape(50, -1).max(1) - images.reshape(50, -1).min(1)
    assert spread.min() > 0.3


def test_generate_is_deterministic_in_the_seed():
    a = data.generate(20, image_size=16, seed=7)
    b = data.generate(20, image_size=16, seed=7)
    c = data.generate(20, image_size=16, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_test_split_does_not_depend_on_train_size():
    small = data.make_dataset(10, 30, image_size=16, seed=0)
    large = data.make_dataset(40, 30, image_size=16, seed=0)
    np.testing.assert_array_equal(small.test_images, large.test_images)
    assert not np.array_equal(small.train_images[:10], small.test_images[:10])


def test_classes_differ_more_than_instances():
    # Nearest class mean on undistorted-ish glyphs must beat chance by far: the classes are
    # distinguishable (and the labels match the drawings).
    mild = data.Distortion(max_rotation=5.0, max_shear=0.05, max_shift=0.02, elastic=0.0,
                           noise=0.0)
    images, labels = data.generate(400, image_size=16, seed=0, distortion=mild)
    flat = images.reshape(400, -1)
    flat = flat - flat.mean(1, keepdims=True)
    means = np.stack([flat[:200][labels[:200] == k].mean(0) for k in range(10)])
    predicted = np.argmin(((flat[200:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == labels[200:]) > 0.6


@pytest.mark.parametrize("kwargs", [dict(channels=2), dict(image_size=4)])
def test_generate_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        data.generate(4, **kwargs)
