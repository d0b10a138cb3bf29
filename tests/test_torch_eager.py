"""Mechanisms of the torch backend's own paths (kunet.backends.torch_ops) that parity alone does not
show: which layers take them, oneDNN's fused conv + ReLU and conv + add + ReLU with gradients off,
and the inference weights cached per variable state.

Their numerical parity with the Keras layers is the shared harness, tests/test_parity.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from kunet import dispatch

pytestmark = pytest.mark.torch


def test_the_unet_runs_the_torch_paths():
    """Every DoubleConv, pooling, up-convolution and the head take the torch paths, in training and
    in inference (not Keras' NCHW copies), and the output is NHWC memory."""
    import torch

    import kunet

    model = kunet.UNet(num_classes=2, filters=(4, 8), input_shape=(16, 16, 1))
    out = model(torch.zeros(1, 16, 16, 1), training=False)
    assert tuple(out.shape) == (1, 16, 16, 2)
    assert out.is_contiguous()  # NHWC memory: no layout copy left behind
    model(torch.zeros(1, 16, 16, 1), training=True)
    for layer in model.layers:
        ran, kind = dispatch.implementation(layer), dispatch.layer_type(layer)
        if kind == "DoubleConv":
            assert ran == {"training": "torch", "inference": "torch"}, (layer.name, ran)
        elif kind in ("MaxPool2x", "Conv2D", "Conv2DTranspose"):  # no training mode
            assert ran == {"call": "torch"}, (layer.name, ran)
    assert dispatch.implementation(model) == {"training": "keras", "inference": "torch"}


@pytest.mark.parametrize("batch_norm", [True, False])
def test_inference_without_gradients_fuses_the_relu(
    batch_norm, monkeypatch, double_conv_twins, assert_close
):
    """With gradients off (``predict``), BN is folded and ReLU fused into one oneDNN call per conv."""
    import torch

    from kunet.backends import torch_ops as torch_eager

    op = torch_eager._conv_relu_op()
    assert op is not None  # the CPU build the tests pin has it; other builds fall back
    calls = []
    monkeypatch.setattr(torch_eager, "_conv_relu_op", lambda: lambda *a: calls.append(1) or op(*a))
    ours, ref = double_conv_twins(5, 8, batch_norm=batch_norm)
    x = torch.tensor(np.random.default_rng(6).normal(size=(2, 9, 6, 5)).astype("float32"))
    with torch.no_grad():
        ours(x, training=False)
        assert calls == []  # small activations: conv2d + ReLU (the fused op's fixed cost is higher)
        monkeypatch.setattr(torch_eager, "_FUSE_RELU_FROM", 0)
        got = ours(x, training=False)
        want = ref.call_sublayers(x, training=False)
    assert len(calls) == 2
    assert_close(got.numpy(), want.numpy())
    with torch.enable_grad():  # gradients on: conv2d + ReLU (the fused op has no autograd)
        ours(x, training=False)
    assert len(calls) == 2


def test_cached_inference_weights_follow_the_variables(double_conv_twins, assert_close):
    """Inference weights are prepared once per variable state: new weights, a training step's
    moving statistics and an optimizer update are all seen by the next inference call."""
    import torch

    ours, ref = double_conv_twins(3, 8)
    x = torch.tensor(np.random.default_rng(7).normal(size=(2, 6, 6, 3)).astype("float32"))

    def check():
        with torch.no_grad():
            assert_close(ours(x, training=False).numpy(), ref.call_sublayers(x, False).numpy())

    check()
    check()  # cached
    weights = [w * 1.5 + 0.1 for w in ours.get_weights()]
    ours.set_weights(weights)
    ref.set_weights(weights)
    check()
    ours(x, training=True)  # moving statistics move (in place)
    ref.call_sublayers(x, training=True)
    check()
    with torch.no_grad():  # what an optimizer step does to the kernels
        for layer in (ours, ref):
            layer.conv1.kernel.value.mul_(0.5)
    check()
