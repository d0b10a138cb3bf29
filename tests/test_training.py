"""``kunet.UNet(...).fit(data)`` works without compile, from every kind of input Keras supports."""

from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest

import kunet

has_tf = importlib.util.find_spec("tensorflow") is not None
has_torch = importlib.util.find_spec("torch") is not None


def _learns(history, metric="loss"):
    values = history.history[metric]
    return values[-1] < values[0]


def test_fit_binary_without_compile(make_unet, binary_data):
    images, masks = binary_data
    model = make_unet()
    history = model.fit(images, masks, batch_size=4, epochs=4, verbose=0)
    assert set(history.history) == {"loss", "dice", "iou"}
    assert _learns(history)
    assert isinstance(model.loss, kunet.losses.CEDice)


@pytest.mark.parametrize("channel_axis", [False, True])
def test_fit_multiclass_integer_masks(make_unet, multiclass_data, channel_axis):
    images, masks = multiclass_data
    if channel_axis:
        masks = masks[..., None]
    model = make_unet(num_classes=3)
    history = model.fit(
        images, masks, batch_size=4, epochs=4, validation_data=(images, masks), verbose=0
    )
    assert {"loss", "dice", "iou", "val_loss", "val_dice", "val_iou"} <= set(history.history)
    assert _learns(history)
    results = model.evaluate(images, masks, verbose=0, return_dict=True)
    assert 0.0 <= results["dice"] <= 1.0 and 0.0 <= results["iou"] <= results["dice"] + 1e-6


def test_user_compile_replaces_defaults(make_unet, binary_data):
    images, masks = binary_data
    model = make_unet()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=kunet.losses.Focal(),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0)],
    )
    history = model.fit(images, masks[..., None], batch_size=4, epochs=1, verbose=0)
    assert set(history.history) == {"loss", "binary_accuracy"}
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert isinstance(model.loss, kunet.losses.Focal)


def test_compile_keeps_defaults_for_what_is_left_out(make_unet):
    model = make_unet()
    model.compile(optimizer="sgd")
    assert isinstance(model.loss, kunet.losses.CEDice)
    model.compile(metrics=[])
    assert isinstance(model.optimizer, keras.optimizers.Adam)


class _Squares(keras.utils.PyDataset):
    def __init__(self, images, masks, batch_size=4, **kwargs):
        super().__init__(**kwargs)
        self.images, self.masks, self.batch_size = images, masks, batch_size

    def __len__(self):
        return len(self.images) // self.batch_size

    def __getitem__(self, i):
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.images[s], self.masks[s]


def test_fit_pydataset(make_unet, binary_data):
    model = make_unet()
    history = model.fit(_Squares(*binary_data), epochs=3, verbose=0)
    assert _learns(history)


@pytest.mark.skipif(not has_tf, reason="tensorflow is not installed in this environment")
def test_fit_tf_data(make_unet, multiclass_data):
    import tensorflow as tf

    images, masks = multiclass_data
    dataset = tf.data.Dataset.from_tensor_slices((images, masks)).batch(4)
    model = make_unet(num_classes=3)
    history = model.fit(dataset, epochs=3, validation_data=dataset, verbose=0)
    assert _learns(history)
    assert "val_dice" in history.history


@pytest.mark.skipif(not has_torch, reason="torch is not installed in this environment")
def test_fit_torch_dataloader(make_unet, binary_data):
    import torch

    images, masks = binary_data
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(images), torch.from_numpy(masks)),
        batch_size=4,
    )
    model = make_unet()
    history = model.fit(loader, epochs=3, verbose=0)
    assert _learns(history)


def test_fit_odd_sizes(make_unet):
    rng = np.random.default_rng(3)
    images = rng.random((4, 37, 45, 1)).astype("float32")
    masks = (images[..., 0] > 0.5).astype("float32")
    model = make_unet(filters=(4, 4, 8, 8))
    model.fit(images, masks, epochs=1, batch_size=2, verbose=0)
    assert model.predict(images, verbose=0).shape == (4, 37, 45, 1)


def test_training_updates_batch_norm_statistics(make_unet, binary_data):
    model = make_unet()
    bn = model.get_layer("encoder1_conv").bn1
    before = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    model.fit(*binary_data, epochs=1, batch_size=4, verbose=0)
    assert not np.allclose(before, keras.ops.convert_to_numpy(bn.moving_mean))


def test_mixed_precision_training(make_unet, binary_data):
    keras.config.set_dtype_policy("mixed_float16")
    model = make_unet()
    out = model(binary_data[0][:2], training=False)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"  # float32 head
    history = model.fit(*binary_data, epochs=2, batch_size=4, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
