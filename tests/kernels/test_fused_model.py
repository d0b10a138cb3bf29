"""A UNet trains the same with the fused DoubleConv; checkpoints and the fused/plain dispatch."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import kunet
from kunet import dispatch
from kunet.layers import DoubleConv

STEPS = 3


UNET = dict(num_classes=1, filters=(8, 16), input_shape=(32, 32, 3))


def _train_twins():
    """A small UNet built fused and plain from the same weights, each trained STEPS steps."""
    keras.utils.set_random_seed(0)
    fused = kunet.UNet(fused=True, **UNET)
    plain = kunet.UNet(fused=False, **UNET)
    plain.set_weights(fused.get_weights())
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    masks = (rng.random((2, 32, 32)) > 0.5).astype("float32")
    losses = {
        name: [
            float(m.train_on_batch(images, masks, return_dict=True)["loss"]) for _ in range(STEPS)
        ]
        for name, m in (("fused", fused), ("plain", plain))
    }
    return fused, plain, losses, images


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, interpreter_tiles):
    """The fused/plain twins after STEPS steps, and the fused model's checkpoint."""
    fused, plain, losses, images = _train_twins()
    path = tmp_path_factory.mktemp("ckpt") / "fused.weights.h5"
    fused.save_weights(path)
    return fused, plain, losses, images, path


def test_unet_trains_the_same_fused_and_plain(trained_pair):
    fused, plain, losses, _, _ = trained_pair
    np.testing.assert_allclose(losses["fused"], losses["plain"], rtol=1e-4, atol=1e-5)
    assert losses["plain"][-1] != losses["plain"][0]  # the steps did change the weights
    for wf, wp in zip(fused.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(wf, wp, rtol=1e-3, atol=1e-4)


def test_fused_checkpoint_loads_into_plain_model(trained_pair):
    fused, _, _, images, path = trained_pair
    plain = kunet.UNet(fused=False, **UNET)
    plain.load_weights(path)
    for wf, wp in zip(fused.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(wf, wp)
    out_plain = plain.predict(images, verbose=0)
    np.testing.assert_allclose(fused.predict(images, verbose=0), out_plain, rtol=1e-4, atol=1e-4)
    # the same file through the fused inference path of a fresh model
    again = kunet.UNet(fused=True, **UNET)
    again.load_weights(path)
    np.testing.assert_allclose(again.predict(images, verbose=0), out_plain, rtol=1e-4, atol=1e-4)


def _ran(layer):
    return dispatch.implementation(layer).get("training")


def test_fused_true_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    layer = DoubleConv(8, fused=True)
    with pytest.raises(kunet.FusedUnavailableError, match="no CUDA device"):
        layer(torch.randn(1, 5, 5, 3), training=True)
    assert _ran(layer) is None


def test_auto_falls_back_silently_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    layer = DoubleConv(8)  # fused=None -> global policy "auto"
    out = layer(torch.randn(1, 5, 5, 3), training=True)
    assert out.shape == (1, 5, 5, 8) and _ran(layer) == "torch"


@pytest.mark.parametrize(
    "policy, expected", [("auto", "triton"), (True, "triton"), (False, "torch")]
)
def test_global_policy_under_the_interpreter(policy, expected):
    kunet.set_fused(policy)
    layer = DoubleConv(8)
    layer(torch.randn(1, 5, 5, 3), training=True)
    assert _ran(layer) == expected


def test_layer_policy_wins_over_global():
    kunet.set_fused(True)
    layer = DoubleConv(8, fused=False)
    layer(torch.randn(1, 5, 5, 3), training=True)
    assert _ran(layer) == "torch"


def test_a_synchronized_batch_norm_never_reaches_triton():
    """Triton implements plain BatchNormalization only: a synchronized one is left to the Keras
    sublayers (which on torch refuse it themselves), and fused=True says why."""
    layer = DoubleConv(8)
    layer.build((None, None, None, 3))
    layer.bn1.synchronized = True
    x = torch.randn(1, 5, 5, 3)
    impl, skipped = dispatch.resolve(layer, layer.dispatch_context(x, True))
    assert impl.name == "keras"
    assert ("triton", "BatchNormalization synchronized=True") in [(i.name, w) for i, w in skipped]
    strict = DoubleConv(8, fused=True)
    strict.build((None, None, None, 3))
    strict.bn2.synchronized = True
    with pytest.raises(kunet.FusedUnavailableError, match="synchronized=True"):
        strict(x, training=True)


def test_unet_trains_the_same_in_mixed_float16(interpreter_tiles):
    keras.config.set_dtype_policy("mixed_float16")  # reset to float32 by tests/conftest.py
    _, _, losses, _ = _train_twins()
    np.testing.assert_allclose(losses["fused"], losses["plain"], rtol=1e-3)
