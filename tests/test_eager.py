"""Torch eager inference replays the UNet's graph without Keras' per-layer ``__call__``
(kunet._eager.EagerPlan): the same outputs and gradients as Keras' own path, taken only where exact."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kunet import _eager

pytestmark = pytest.mark.torch


def _keras_path(model, x, training=False):
    """The functional model's own call (Keras' per-layer ``__call__``)."""
    from kunet import UNet

    return super(UNet, model).call(x, training=training)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (2, 32, 32, 1)),
        ({"upsampling": "bilinear", "dropout": 0.3}, (1, 37, 45, 1)),  # pad / crop
        ({"num_classes": 3, "output_activation": "softmax", "filters": (4, 8, 16)}, (2, 24, 40, 1)),
        ({"batch_norm": False}, (1, 16, 16, 1)),
    ],
)
def test_plan_matches_keras_path(make_unet, kwargs, shape):
    import torch

    model = make_unet(**kwargs)
    assert _eager.replay_plan(model) is not None
    x = torch.tensor(np.random.default_rng(0).normal(size=shape).astype("float32"))
    with torch.no_grad():
        model(x, training=True)  # move the BN statistics away from their initial values
        got, want = model(x, training=False), _keras_path(model, x)
    assert got.shape == shape[:-1] + (kwargs.get("num_classes", 1),)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_gradients_in_inference_mode(make_unet):
    """Saliency-style gradients (inference mode, gradients on) are Keras' own."""
    import torch

    model = make_unet()
    grads = []
    for forward in (lambda x: model(x, training=False), lambda x: _keras_path(model, x)):
        x = torch.tensor(np.random.default_rng(1).normal(size=(1, 16, 16, 1)).astype("float32"))
        x.requires_grad_(True)
        out = forward(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append(x.grad.numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_taken_for_predict_not_for_training(make_unet, binary_data, monkeypatch):
    calls = []
    original = _eager.EagerPlan.__call__
    monkeypatch.setattr(
        _eager.EagerPlan, "__call__", lambda self, x: calls.append(1) or original(self, x)
    )
    images, masks = binary_data
    model = make_unet()
    model.fit(images, masks, batch_size=4, epochs=1, verbose=0)
    assert calls == []  # training steps run Keras' path
    model.predict(images, batch_size=4, verbose=0)
    assert len(calls) == 2


def test_no_plan_where_call_is_not_enough(make_unet):
    keras.config.set_dtype_policy("mixed_float16")  # layers would autocast in __call__
    assert _eager.replay_plan(make_unet()) is None
    keras.config.set_dtype_policy("float32")
    inputs = keras.Input((8, 8, 1))
    other = keras.Model(inputs, keras.layers.Activation("relu")(inputs))  # not a listed layer
    assert _eager.replay_plan(other) is None


def test_mixed_precision_model_still_predicts(make_unet):
    keras.config.set_dtype_policy("mixed_float16")
    model = make_unet()
    out = model.predict(np.zeros((1, 16, 16, 1), "float32"), verbose=0)
    assert out.shape == (1, 16, 16, 1) and np.isfinite(out).all()
