"""On the torch backend the plain DoubleConv runs through PyTorch's eager ops (kunet.kernels.torch_eager).

It must be the Keras sublayers' exact semantics: outputs, moving statistics after a training step,
gradients of the input and of every trainable variable, inference, frozen BN, mixed precision.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.torch


def _run(layer, x, training, sublayers):
    import torch

    x = torch.tensor(x, requires_grad=True)
    out = layer.call_sublayers(x, training) if sublayers else layer(x, training=training)
    loss = (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
    variables = layer.trainable_variables
    grads = torch.autograd.grad(loss, [x] + [v.value for v in variables])
    return (
        out.detach().float().numpy(),
        [g.detach().float().numpy() for g in grads],
        [keras.ops.convert_to_numpy(v) for v in layer.non_trainable_variables],
    )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cin, cout, h, w", [(1, 8, 7, 9), (3, 16, 13, 5), (16, 8, 8, 8)])
def test_eager_matches_sublayers(cin, cout, h, w, training, double_conv_twins, assert_close):
    eager, ref = double_conv_twins(cin, cout)
    x = np.random.default_rng(1).normal(size=(2, h, w, cin)).astype("float32")
    got, want = _run(eager, x, training, False), _run(ref, x, training, True)
    assert_close(got, want)  # outputs, gradients, moving statistics
    if training:
        assert not np.allclose(
            got[2][0], double_conv_twins(cin, cout)[0].non_trainable_variables[0]
        )


def test_moving_statistics_are_the_biased_batch_statistics(double_conv_twins):
    """With momentum 0 the moving statistics are the batch's own: compared tightly."""
    eager, ref = double_conv_twins(3, 8, bn_momentum=0.0)
    x = (3 * np.random.default_rng(5).normal(size=(2, 6, 5, 3)) + 1).astype("float32")
    got, want = _run(eager, x, True, False), _run(ref, x, True, True)
    for g, r in zip(got[2], want[2], strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-6, atol=1e-6)


def test_eager_path_is_taken(double_conv_twins):
    import torch

    from kunet import _fused

    layer, _ = double_conv_twins(3, 4)
    assert _fused.use_torch_eager(layer, torch.zeros(1, 4, 4, 3))
    assert not _fused.use_torch_eager(layer, keras.KerasTensor((1, 4, 4, 3)))
    for option in ("center", "scale", "synchronized"):  # BN options the path does not implement
        other, _ = double_conv_twins(3, 4)
        setattr(other.bn2, option, option == "synchronized")
        assert not _fused.use_torch_eager(other, torch.zeros(1, 4, 4, 3))


def test_without_batch_norm(double_conv_twins, assert_close):
    eager, ref = double_conv_twins(3, 8, batch_norm=False)
    x = np.random.default_rng(2).normal(size=(1, 6, 7, 3)).astype("float32")
    got, want = _run(eager, x, True, False), _run(ref, x, True, True)
    assert_close(got[:2], want[:2])  # outputs, gradients


def test_frozen_batch_norm_runs_in_inference_mode(double_conv_twins, assert_close):
    eager, ref = double_conv_twins(3, 8)
    for layer in (eager, ref):
        layer.bn1.trainable = layer.bn2.trainable = False
    x = np.random.default_rng(3).normal(size=(2, 5, 5, 3)).astype("float32")
    got, want = _run(eager, x, True, False), _run(ref, x, True, True)
    assert_close(got[0], want[0])
    for g, r in zip(got[2], want[2], strict=True):
        np.testing.assert_array_equal(g, r)  # moving statistics untouched


@pytest.mark.parametrize("training", [True, False])
def test_mixed_precision(training, double_conv_twins, assert_as_accurate):
    x = np.random.default_rng(4).normal(size=(2, 9, 7, 3)).astype("float32")
    truth = _run(double_conv_twins(3, 8)[0], x, training, True)  # float32 sublayers
    keras.config.set_dtype_policy("mixed_float16")
    eager, ref = double_conv_twins(3, 8)
    got, want = _run(eager, x, training, False), _run(ref, x, training, True)
    assert got[0].dtype == np.float32  # compared in float32; the layer returned float16
    assert_as_accurate(got, want, truth)


@pytest.mark.parametrize(
    "kind, kwargs, shape",
    [
        ("conv", {"filters": 5, "kernel_size": 1}, (2, 6, 7, 8)),
        (
            "conv",
            {"filters": 4, "kernel_size": 3, "padding": "same", "activation": "relu"},
            (2, 9, 5, 3),
        ),
        (
            "conv",
            {"filters": 4, "kernel_size": 3, "padding": "valid", "use_bias": False},
            (1, 7, 7, 2),
        ),
        ("conv", {"filters": 3, "kernel_size": 2, "padding": "same"}, (2, 6, 6, 4)),  # Keras' call
        ("conv", {"filters": 3, "kernel_size": 3, "strides": 2}, (2, 9, 9, 4)),  # Keras' call
        ("transpose", {"filters": 6, "kernel_size": 2, "strides": 2}, (2, 5, 3, 8)),
        (
            "transpose",
            {"filters": 2, "kernel_size": 3, "strides": 3, "activation": "sigmoid"},
            (1, 4, 4, 3),
        ),
        (
            "transpose",
            {"filters": 2, "kernel_size": 3, "strides": 2, "padding": "same"},
            (1, 4, 4, 3),
        ),
    ],
)
@pytest.mark.parametrize("dtype_policy", ["float32", "mixed_float16"])
def test_convolutions_match_keras_layers(kind, kwargs, shape, dtype_policy, assert_close):
    """kunet.layers.Conv2D / Conv2DTranspose == Keras' layers: outputs and all gradients."""
    import torch

    from kunet import layers

    keras.config.set_dtype_policy(dtype_policy)
    ours_cls, keras_cls = {
        "conv": (layers.Conv2D, keras.layers.Conv2D),
        "transpose": (layers.Conv2DTranspose, keras.layers.Conv2DTranspose),
    }[kind]
    ours, theirs = ours_cls(**kwargs), keras_cls(**kwargs)
    ours.build(shape)
    theirs.build(shape)
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.5, w.shape).astype("float32") for w in ours.get_weights()]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    x = rng.normal(size=shape).astype("float32")
    results = []
    for layer in (ours, theirs):
        xt = torch.tensor(x, requires_grad=True)
        out = layer(xt)
        loss = (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        grads = torch.autograd.grad(loss, [xt] + [v.value for v in layer.trainable_variables])
        results.append((out, grads))
    (got, got_grads), (want, want_grads) = results
    assert tuple(got.shape) == tuple(want.shape) == tuple(ours.compute_output_shape(shape))
    assert got.dtype == want.dtype
    tol = "float16" if dtype_policy == "mixed_float16" else "float32"
    assert_close(got.detach().float().numpy(), want.detach().float().numpy(), tol)
    for g, r in zip(got_grads, want_grads, strict=True):
        assert_close(g.float().numpy(), r.float().numpy(), tol)


def test_convolutions_take_the_channels_last_path(monkeypatch):
    """The UNet's up-convolution and head run through kunet.kernels.torch_eager (not Keras' copies)."""
    import torch

    import kunet
    from kunet import _fused

    calls = []
    for name in ("torch_conv2d", "torch_conv_transpose2d"):
        original = getattr(_fused, name)
        monkeypatch.setattr(
            _fused, name, lambda layer, x, _f=original, _n=name: calls.append(_n) or _f(layer, x)
        )
    model = kunet.UNet(num_classes=2, filters=(4, 8), input_shape=(16, 16, 1))
    out = model(torch.zeros(1, 16, 16, 1), training=False)
    assert tuple(out.shape) == (1, 16, 16, 2)
    assert out.is_contiguous()  # NHWC memory: no layout copy left behind
    # one up-convolution per decoder stage (one per filters entry), one head
    assert calls.count("torch_conv_transpose2d") == 2 and calls.count("torch_conv2d") == 1


@pytest.mark.parametrize("batch_norm", [True, False])
def test_inference_without_gradients_fuses_the_relu(
    batch_norm, monkeypatch, double_conv_twins, assert_close
):
    """With gradients off (``predict``), BN is folded and ReLU fused into one oneDNN call per conv."""
    import torch
    from kunet.kernels import torch_eager

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
