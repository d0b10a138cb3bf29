"""DoubleConv on a list of inputs (a decoder's ``[skip, upsampled]``): shapes, errors, the UNet's
decoders, and torch's oneDNN conv + add + ReLU inference on the parts.

That every implementation computes the concatenation's result (outputs, gradients of every part and
variable, moving statistics; 1-3 parts) is the shared harness, tests/test_parity.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kunet.layers import DoubleConv


def _parts(channels, h=7, w=6, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(2, h, w, c)).astype("float32") for c in channels]


@pytest.mark.torch
def test_torch_onednn_fused_add(monkeypatch, double_conv_twins, assert_close):
    """Inference on CPU: the first part's convolution, then oneDNN's in-place add + ReLU post-op for
    the other parts (taken from 2**20 output elements; forced here on tiny inputs)."""
    import torch

    from kunet.backends import torch_ops as torch_eager

    if torch_eager._conv_add_relu_op() is None:
        pytest.skip("this PyTorch build has no oneDNN convolution with a binary post-op")
    calls = []
    real = torch_eager._conv_add_relu_op()
    monkeypatch.setattr(torch_eager, "_FUSE_RELU_FROM", 0)
    monkeypatch.setattr(
        torch_eager, "_conv_add_relu_op", lambda: lambda *a: calls.append(1) or real(*a)
    )
    ours, ref = double_conv_twins(9, 8)
    parts = _parts((4, 2, 3), h=9, w=10, seed=4)
    with torch.no_grad():
        got = ours([torch.tensor(p) for p in parts], training=False)
        want = ref.call_sublayers(torch.tensor(np.concatenate(parts, -1)), False)
    assert len(calls) == 2  # parts 2 and 3 of the first convolution
    assert_close(got.numpy(), want.numpy())


def test_shapes_and_errors():
    layer = DoubleConv(4)
    assert layer.compute_output_shape([(None, 8, 8, 3), (None, 8, 8, 5)]) == (None, 8, 8, 4)
    assert layer.compute_output_shape(((2, 8, 8, 3), [2, 8, 8, 1])) == (2, 8, 8, 4)
    assert layer.compute_output_shape([2, 8, 8, 3]) == (2, 8, 8, 4)
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 5))
    assert DoubleConv(4)([a, b]).shape == (None, 8, 8, 4)
    built = DoubleConv(4)
    built([a, b])
    assert built.conv1.kernel.shape == (3, 3, 8, 4)  # one kernel over the 8 concatenated channels
    with pytest.raises(ValueError, match="other axes must match"):
        DoubleConv(4)([a, keras.Input((4, 8, 5))])
    with pytest.raises(ValueError, match="known channel count"):
        DoubleConv(4)([a, keras.Input((8, 8, None))])


def test_unet_decoders_take_the_parts(make_unet):
    """No concatenation layer: each decoder's DoubleConv reads the skip and the up-sampled tensor."""
    model = make_unet(filters=(4, 8, 16))
    assert not any(isinstance(layer, keras.layers.Concatenate) for layer in model.layers)
    for i in (1, 2, 3):
        inputs = model.get_layer(f"decoder{i}_conv").input
        assert isinstance(inputs, (list, tuple)) and len(inputs) == 2
        skip, up = inputs
        assert skip is model.get_layer(f"encoder{i}_conv").output
        assert up is model.get_layer(f"decoder{i}_up_transpose").output
