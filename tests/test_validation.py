"""Bad data gets an error that names the argument and the offending shape or value."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest


@pytest.fixture
def model(make_unet):
    return make_unet(num_classes=3)


def _images(n=2, h=16, w=16, c=1):
    return np.zeros((n, h, w, c), "float32")


def test_wrong_channel_count(model):
    with pytest.raises(ValueError, match=r"x has 3 channels .*expects 1"):
        model.fit(_images(c=3), np.zeros((2, 16, 16), "int32"), verbose=0)
    with pytest.raises(ValueError, match=r"x has 4 channels"):
        model.predict(_images(c=4), verbose=0)


def test_images_must_be_4d(model):
    with pytest.raises(ValueError, match=r"x must be a batch of images .*\(16, 16\)"):
        model.predict(np.zeros((16, 16), "float32"), verbose=0)


@pytest.mark.parametrize("shape", [(2, 16, 15), (3, 16, 16), (2, 16, 16, 2), (2, 16)])
def test_mask_shape_must_match_images(model, shape):
    with pytest.raises(
        ValueError, match=r"y has shape .*does not match x of shape \(2, 16, 16, 1\)"
    ):
        model.fit(_images(), np.zeros(shape, "int32"), verbose=0)


def test_one_hot_masks_get_a_hint(model):
    with pytest.raises(ValueError, match="one-hot"):
        model.fit(_images(), np.zeros((2, 16, 16, 3), "int32"), verbose=0)


def test_mask_values_beyond_num_classes(model):
    masks = np.zeros((2, 16, 16), "int32")
    masks[1, 3, 4] = 3
    with pytest.raises(
        ValueError, match=r"y values must be class indices in \[0, 2\].*from 0 to 3"
    ):
        model.fit(_images(), masks, verbose=0)
    with pytest.raises(ValueError, match="from -1 to 0"):
        model.fit(_images(), masks * 0 - (masks > 0), verbose=0)


def test_binary_masks_0_255_are_refused(make_unet):
    with pytest.raises(ValueError, match=r"\[0, 1\].*from 0 to 255.*divide by 255"):
        masks = np.zeros((2, 16, 16), "uint8")
        masks[:, 4:8, 4:8] = 255
        make_unet().fit(_images(), masks, verbose=0)


def test_non_integer_multiclass_masks(model):
    with pytest.raises(ValueError, match="integer class indices"):
        model.fit(_images(), np.full((2, 16, 16), 0.5, "float32"), verbose=0)


def test_validation_data_is_checked(model):
    good = (_images(), np.zeros((2, 16, 16), "int32"))
    bad = (_images(), np.full((2, 16, 16), 7, "int32"))
    with pytest.raises(ValueError, match="validation_data masks values"):
        model.fit(*good, validation_data=bad, verbose=0)


def test_fixed_size_model_rejects_other_sizes(make_unet):
    with pytest.raises(ValueError, match=r"spatial size \(16, 16\).*input_shape=\(32, 32, 1\)"):
        make_unet(input_shape=(32, 32, 1)).predict(_images(), verbose=0)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed"
)
def test_dataset_first_batch_is_checked(model):
    import tensorflow as tf

    masks = np.full((2, 16, 16), 9, "int32")
    dataset = tf.data.Dataset.from_tensor_slices((_images(), masks)).batch(2)
    with pytest.raises(ValueError, match=r"x masks \(first batch\) values"):
        model.fit(dataset, verbose=0)
