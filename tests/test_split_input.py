"""DoubleConv on a list of inputs (a decoder's ``[skip, upsampled]``) is DoubleConv on their channel
concatenation, on every backend and every path that computes it without the concatenation (torch
eager and its oneDNN fused-add inference, TensorFlow's ops in eager and graph mode, JAX's per-part
convolutions): outputs, gradients of every input and trainable variable, moving statistics.

The reference is the Keras sublayers on ``concatenate(parts)``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kunet.layers import DoubleConv


def _weighted_sum(out):
    ops = keras.ops
    weights = ops.reshape(ops.linspace(-1.0, 1.0, int(np.prod(out.shape))), out.shape)
    return ops.sum(ops.cast(out, "float32") * weights)


def _run(layer, parts, training, reference, graph=False):
    """(output, [grad of each part, grad of each trainable variable], moving statistics)."""
    backend = keras.backend.backend()
    if backend == "jax":
        return _run_jax(layer, parts, training, reference)
    if backend == "torch":
        import torch

        xs = [torch.tensor(p, requires_grad=True) for p in parts]
        out = _call(layer, xs, training, reference)
        loss = _weighted_sum(out)
        grads = torch.autograd.grad(loss, xs + [v.value for v in layer.trainable_variables])
    else:
        import tensorflow as tf

        def step(xs):
            with tf.GradientTape() as tape:
                tape.watch(xs)
                out = _call(layer, xs, training, reference)
                loss = _weighted_sum(out)
            return out, tape.gradient(loss, xs + [v.value for v in layer.trainable_variables])

        out, grads = (tf.function(step) if graph else step)([tf.constant(p) for p in parts])
    return _numpy(out, grads, layer.non_trainable_variables)


def _call(layer, xs, training, reference):
    if reference:
        return layer.call_sublayers(keras.ops.concatenate(xs, axis=-1), training)
    return layer(xs, training=training)


def _run_jax(layer, parts, training, reference):
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]

    def loss(xs, trainable):
        # the reference: one concatenated tensor, which the layer runs through its sublayers
        inputs = keras.ops.concatenate(xs, axis=-1) if reference else xs
        out, updated = layer.stateless_call(trainable, frozen, inputs, training=training)
        return _weighted_sum(out), (out, updated)

    xs = [jax.numpy.asarray(p) for p in parts]
    (grad_x, grad_w), (out, updated) = jax.grad(loss, argnums=(0, 1), has_aux=True)(xs, trainable)
    return _numpy(out, list(grad_x) + list(grad_w), updated)


def _numpy(out, grads, moving):
    as_np = keras.ops.convert_to_numpy
    return (
        as_np(keras.ops.cast(out, "float32")),
        [as_np(keras.ops.cast(g, "float32")) for g in grads],
        [as_np(v) for v in moving],
    )


def _parts(channels, h=7, w=6, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(2, h, w, c)).astype("float32") for c in channels]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels", [(3, 5), (4, 4), (2, 3, 1)])
def test_list_input_is_the_concatenation(channels, training, double_conv_twins, assert_close):
    ours, ref = double_conv_twins(sum(channels), 8)
    parts = _parts(channels)
    got, want = _run(ours, parts, training, False), _run(ref, parts, training, True)
    assert_close(got, want)  # outputs, gradients (each part's, each variable's), moving statistics
    if training:
        assert not np.allclose(
            got[2][0], double_conv_twins(sum(channels), 8)[0].non_trainable_variables[0]
        )


@pytest.mark.parametrize("training", [True, False])
def test_without_batch_norm(training, double_conv_twins, assert_close):
    ours, ref = double_conv_twins(7, 4, batch_norm=False)  # convolutions with biases
    parts = _parts((3, 4), seed=2)
    assert_close(_run(ours, parts, training, False), _run(ref, parts, training, True))


@pytest.mark.tensorflow
@pytest.mark.parametrize("training", [True, False])
def test_tensorflow_graph_mode(training, double_conv_twins, assert_close):
    """As ``model.fit`` / ``predict`` run it: inside ``tf.function`` (the remapper's fusions)."""
    ours, ref = double_conv_twins(6, 8)
    parts = _parts((2, 4), seed=3)
    got, want = _run(ours, parts, training, False, True), _run(ref, parts, training, True, True)
    assert_close(got, want)


@pytest.mark.torch
def test_torch_onednn_fused_add(monkeypatch, double_conv_twins, assert_close):
    """Inference on CPU: the first part's convolution, then oneDNN's in-place add + ReLU post-op for
    the other parts (taken from 2**20 output elements; forced here on tiny inputs)."""
    import torch
    from kunet.kernels import torch_eager

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


def test_mixed_precision(double_conv_twins, assert_as_accurate):
    parts = _parts((3, 5), seed=5)
    truth = _run(double_conv_twins(8, 8)[0], parts, True, True)  # float32 sublayers
    keras.config.set_dtype_policy("mixed_float16")
    ours, ref = double_conv_twins(8, 8)
    got, want = _run(ours, parts, True, False), _run(ref, parts, True, True)
    assert_as_accurate(got, want, truth)


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
    with pytest.raises(ValueError, match="N, H and W must match"):
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
