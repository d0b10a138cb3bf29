"""The fused DoubleConv computes what the plain Keras DoubleConv computes.

Fused (Triton, interpreter) vs plain (Keras Conv2D/BatchNormalization/ReLU) with the same non-trivial
weights (random kernels, gammas, betas, moving statistics): training-mode output, moving statistics
after the step, gradients of the input and of every trainable variable, inference-mode output.
Tolerances: the table in conftest.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

from kunet.layers import DoubleConv

GRID = [  # (N, H, W, Cin, Cout): batch 1, odd H and W, Cin 1/3/16, Cout 8/32
    (1, 7, 9, cin, cout) for cin in (1, 3, 16) for cout in (8, 32)
] + [(1, 13, 5, cin, cout) for cin in (1, 3, 16) for cout in (8, 32)]
FP16_GRID = [(1, 7, 9, 3, 8), (1, 13, 5, 16, 32)]


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
    # the plain twin runs the Keras sublayers themselves (on torch, fused=False would otherwise take
    # the eager torch path, which tests/test_torch_eager.py pins to the same sublayers)
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


def _check_pair(shape, dtype, assert_close, kernel_calls):
    n, h, w, cin, cout = shape
    policy = {"float32": None, "float16": "mixed_float16"}[dtype]
    fused, plain = _pair(cin, cout, dtype=policy)
    x = np.random.default_rng(7).normal(size=(n, h, w, cin)).astype("float32")
    f = _step(fused, x)
    assert kernel_calls["conv3x3"] >= 2 and kernel_calls["wgrad"] == 2, kernel_calls
    p = _step(plain, x)
    assert_close(f[0], p[0], dtype, "training output")
    assert_close(f[1], p[1], dtype, "d input")
    assert (
        set(f[2])
        == set(p[2])
        == {f"{c}/{v}" for c in ("conv1", "conv2") for v in ("kernel",)}
        | {f"{b}/{v}" for b in ("bn1", "bn2") for v in ("gamma", "beta")}
    )
    for name in p[2]:
        assert_close(f[2][name], p[2][name], dtype, f"d {name}")
    for name in p[3]:
        assert_close(f[3][name], p[3][name], dtype, f"{name} after the step")
    assert_close(f[4], p[4], dtype, "inference output")
    assert np.abs(p[4]).max() > 0 and np.abs(p[0]).max() > 0


@pytest.mark.parametrize("shape", GRID, ids=lambda s: "x".join(map(str, s)))
def test_parity_fp32(shape, assert_close, kernel_calls):
    _check_pair(shape, "float32", assert_close, kernel_calls)


@pytest.mark.parametrize("shape", FP16_GRID, ids=lambda s: "x".join(map(str, s)))
def test_parity_fp16(shape, assert_close, kernel_calls):
    _check_pair(shape, "float16", assert_close, kernel_calls)


def test_output_dtype_follows_input():
    fused, _ = _pair(3, 8, dtype="mixed_float16")
    out = fused(torch.randn(1, 5, 7, 3), training=True)
    assert out.dtype == torch.float16
    assert fused.bn1.moving_mean.value.dtype == torch.float32


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-bn", "training-false"])
def test_inference_mode_with_gradients(frozen, assert_close, kernel_calls):
    """BN in inference mode (training=False, or frozen BN layers even in training: Keras semantics)
    through the folded kernels, with gradients (fine-tuning): output, gradients, moving statistics."""
    fused, plain = _pair(3, 8)
    if frozen:
        for layer in (fused, plain):
            layer.bn1.trainable = layer.bn2.trainable = False
    call = {
        True: lambda layer, x: layer(x, training=True),
        False: lambda layer, x: layer(x, training=False),
    }
    x = np.random.default_rng(5).normal(size=(1, 7, 9, 3)).astype("float32")
    before = [v.numpy().copy() for v in fused.non_trainable_weights]
    results = []
    for layer in (fused, plain):
        xt = torch.tensor(x, requires_grad=True)
        out = call[frozen](layer, xt)
        (out * torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)).sum().backward()
        grads = {v.path.split("/", 1)[1]: v.value.grad for v in layer.weights}
        results.append((out.detach().numpy(), xt.grad.numpy(), grads))
        if layer is fused:
            assert kernel_calls == {"conv3x3": 2 + 2, "wgrad": 2}  # 2 folded convs, 2 dgrads
    (out_f, dx_f, g_f), (out_p, dx_p, g_p) = results
    assert_close(out_f, out_p, "float32", "inference output")
    assert_close(dx_f, dx_p, "float32", "d input")
    for name, grad in g_p.items():
        if grad is None:  # moving statistics; gamma and beta when frozen
            assert g_f[name] is None, name
        else:
            assert_close(g_f[name], grad, "float32", f"d {name}")
    expected_grads = 6 if not frozen else 2
    assert sum(g is not None for g in g_p.values()) == expected_grads
    for b, v in zip(before, fused.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(b, v.numpy())


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
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    for name in runs[0][2]:
        np.testing.assert_array_equal(runs[0][2][name], runs[1][2][name])
