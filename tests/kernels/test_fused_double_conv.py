"""The fused DoubleConv's own properties: its output dtype and bitwise determinism.

Its parity with the Keras sublayers (outputs, gradients, moving statistics; training, inference and
frozen BN; float32 and mixed_float16) is the shared harness, tests/test_parity.py, which the
``kernels`` nox session runs for "triton" under the interpreter.
"""

from __future__ import annotations

import keras
import numpy as np
import torch

from kunet.layers import DoubleConv


def _pair(cin, cout, dtype=None, seed=0):
    """Fused and plain DoubleConv with identical, non-trivial variables."""
    layers = []
    for fused in (True, False):
        keras.utils.set_random_seed(seed)
        layer = DoubleConv(cout, fused=fused, dtype=dtype)
        layer.build((None, None, None, cin))
        layers.append(layer)
    rng = np.random.default_rng(seed + 1)
    for v_fused, v_plain in zip(layers[0].weights, layers[1].weights, strict=True):
        name = v_fused.path.rsplit("/", 1)[-1]
        value = _random_value(name, tuple(v_fused.shape), rng)
        v_fused.assign(value)
        v_plain.assign(value)
    return layers


def _random_value(name, shape, rng):
    if name == "kernel":
        value = rng.normal(0.0, 0.3, shape)
    elif name == "gamma":
        value = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
    elif name == "beta":
        value = rng.normal(0.3, 0.5, shape)  # mostly > 0: the zero-padded borders matter
    elif name == "moving_mean":
        value = rng.normal(0.0, 0.5, shape)
    else:
        assert name == "moving_variance", name
        value = rng.uniform(0.5, 2.0, shape)
    return value.astype("float32")


def _step(layer, x):
    """One training-mode forward + backward of a non-uniform loss; everything as numpy."""
    forward = layer if layer.fused else layer.call_sublayers
    xt = torch.tensor(x, requires_grad=True)
    out = forward(xt, training=True)
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out.float() * weights).sum().backward()
    grads = {v.path.split("/", 1)[1]: v.value.grad.numpy().copy() for v in layer.trainable_weights}
    moving = {v.path.split("/", 1)[1]: v.numpy().copy() for v in layer.non_trainable_weights}
    with torch.no_grad():
        inference = forward(torch.tensor(x), training=False).float().numpy()
    return out.detach().float().numpy(), xt.grad.numpy(), grads, moving, inference


def test_output_dtype_follows_input():
    fused, _ = _pair(3, 8, dtype="mixed_float16")
    out = fused(torch.randn(1, 5, 7, 3), training=True)
    assert out.dtype == torch.float16
    assert fused.bn1.moving_mean.value.dtype == torch.float32


def test_deterministic(kernel_calls):
    """Same inputs, same bits: no atomics anywhere in forward or backward."""
    fused, _ = _pair(16, 32)
    x = np.random.default_rng(3).normal(size=(1, 13, 5, 16)).astype("float32")
    runs = []
    for _ in range(2):
        for v in fused.trainable_weights:
            v.value.grad = None
        out, dx, grads, _, _ = _step(fused, x)
        runs.append((out, dx, grads))
    assert kernel_calls["conv3x3"] >= 4 and kernel_calls["wgrad"] == 4, kernel_calls
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    for name in runs[0][2]:
        np.testing.assert_array_equal(runs[0][2][name], runs[1][2][name])
