"""DoubleConv in TensorFlow's own fused ops: the plain path on the TensorFlow backend.

Same math and the same Keras variables as the ``Conv2D`` / ``BatchNormalization`` sublayers, but:

* training-mode batch norm is one ``FusedBatchNormV3`` op (statistics, normalization and a fused
  gradient kernel; oneDNN on CPU, cuDNN on GPU), where Keras' layer is a chain of separate
  mean / variance / subtract / multiply / add ops, each a pass over the activations in graph mode;
* inference-mode batch norm (``training=False`` or a frozen BN) is folded into the convolution's
  kernel and bias, so the step is ``Conv2D -> BiasAdd -> Relu``, which TensorFlow's graph optimizer
  fuses into one oneDNN convolution on CPU.

Semantics follow ``keras.layers.BatchNormalization``: statistics and normalization in float32
(float16/bfloat16 inputs are normalized in float32 inside the op), biased batch variance for the
moving statistics (``FusedBatchNormV3`` reports the unbiased one; it is rescaled),
``moving = moving * momentum + batch * (1 - momentum)``. Parity with the Keras sublayers is tested in
``tests/test_tensorflow_ops.py``.
"""

from __future__ import annotations

import tensorflow as tf


def _batch_norm(bn, y):
    """Training-mode batch norm with batch statistics; updates ``bn``'s moving statistics."""
    gamma = tf.cast(bn.gamma.value, tf.float32)
    beta = tf.cast(bn.beta.value, tf.float32)
    empty = tf.constant([], tf.float32)
    out, mean, var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=y,
        scale=gamma,
        offset=beta,
        mean=empty,
        variance=empty,
        epsilon=bn.epsilon,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=True,
    )
    # FusedBatchNormV3 returns the unbiased (n / (n - 1)) variance; Keras keeps the biased one.
    shape = tf.shape(y)
    n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
    var = var * tf.maximum(n - 1.0, 0.0) / tf.maximum(n, 1.0)
    momentum = bn.momentum
    moving_mean = tf.cast(bn.moving_mean.value, tf.float32)
    moving_var = tf.cast(bn.moving_variance.value, tf.float32)
    bn.moving_mean.assign(moving_mean * momentum + tf.stop_gradient(mean) * (1.0 - momentum))
    bn.moving_variance.assign(moving_var * momentum + tf.stop_gradient(var) * (1.0 - momentum))
    return out


def _folded(conv, bn, dtype):
    """Kernel and bias of ``conv`` followed by an inference-mode ``bn``, as one convolution."""
    kernel = tf.cast(conv.kernel.value, tf.float32)
    scale = tf.cast(bn.gamma.value, tf.float32) * tf.math.rsqrt(
        tf.cast(bn.moving_variance.value, tf.float32) + bn.epsilon
    )
    shift = tf.cast(bn.beta.value, tf.float32) - tf.cast(bn.moving_mean.value, tf.float32) * scale
    if conv.use_bias:
        shift = shift + tf.cast(conv.bias.value, tf.float32) * scale
    return tf.cast(kernel * scale, dtype), tf.cast(shift, dtype)


def _conv_sum(parts, kernel, bias):
    """``conv2d(concat(parts, -1), kernel) + bias`` as one convolution per part, summed.

    In training this saves the concatenation's copy and the slicing of its gradient (a UNet 16-128
    training step 2% faster, benchmarks/README.md). The bias goes on the last part's convolution,
    before the others' sum is added: ``Conv2D -> BiasAdd -> Add``, the order TensorFlow's remapper
    fuses.
    """
    splits = [p.shape[-1] for p in parts]
    kernels = tf.split(kernel, splits, axis=2) if len(parts) > 1 else [kernel]
    outs = [
        tf.nn.conv2d(p, k, strides=1, padding="SAME") for p, k in zip(parts, kernels, strict=True)
    ]
    y = outs[-1] if bias is None else tf.nn.bias_add(outs[-1], bias)
    return y if len(outs) == 1 else y + tf.add_n(outs[:-1])


def double_conv_forward(layer, inputs, training: bool):
    """Run :class:`kunet.layers.DoubleConv` ``layer`` on NHWC TensorFlow tensor(s) ``inputs``
    (a list of tensors is the layer's input concatenated along channels)."""
    parts = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not training and len(parts) > 1:
        # Inference: one convolution of the concatenation was as fast (the per-part form pays off
        # in training, where it also saves slicing the concatenation's gradient).
        parts = [tf.concat(parts, axis=-1)]
    for conv, bn in ((layer.conv1, layer.bn1), (layer.conv2, layer.bn2)):
        dtype = parts[0].dtype
        train_bn = bn is not None and training and bn.trainable
        if bn is not None and not train_bn:
            kernel, bias = _folded(conv, bn, dtype)
        else:
            kernel = tf.cast(conv.kernel.value, dtype)
            bias = tf.cast(conv.bias.value, dtype) if conv.use_bias else None
        y = _conv_sum(parts, kernel, bias)
        if train_bn:
            y = _batch_norm(bn, y)
        parts = [tf.nn.relu(y)]
    return parts[0]
