"""The TensorFlow backend's DoubleConv: TensorFlow's own fused ops.

Registered as ``DoubleConv`` "tensorflow" (:mod:`kunet.dispatch`). Same math and the same Keras
variables as the ``Conv2D`` / ``BatchNormalization`` sublayers, but:

* training-mode batch norm is one ``FusedBatchNormV3`` op (statistics, normalization and a fused
  gradient kernel; oneDNN on CPU, cuDNN on GPU), where Keras' layer is a chain of separate
  mean / variance / subtract / multiply / add ops, each a pass over the activations in graph mode;
* inference-mode batch norm (``training=False`` or a frozen BN) is folded into the convolution
  (:func:`kunet.conv_bn_math.fold_batch_norm`), so the step is ``Conv2D -> BiasAdd -> Relu``, which
  TensorFlow's graph optimizer fuses into one oneDNN convolution on CPU.

The moving statistics follow Keras (:func:`kunet.conv_bn_math.update_moving_statistics`);
``FusedBatchNormV3`` reports the unbiased variance, rescaled here to Keras' biased one.
"""

from __future__ import annotations

import tensorflow as tf

from kunet import conv_bn_math as cbm
from kunet import dispatch
from kunet.layers import unusual_batch_norm


def _batch_norm(bn: cbm.BatchNormParams, y):
    """Training-mode batch norm with batch statistics; updates the moving statistics."""
    empty = tf.constant([], tf.float32)
    out, mean, var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=y,
        scale=tf.cast(bn.gamma.value, tf.float32),
        offset=tf.cast(bn.beta.value, tf.float32),
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
    cbm.update_moving_statistics(bn, mean, var * tf.maximum(n - 1.0, 0.0) / tf.maximum(n, 1.0))
    return out


def _conv(x, kernel, bias):
    y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
    return y if bias is None else tf.nn.bias_add(y, bias)


@dispatch.register(
    "DoubleConv",
    "tensorflow",
    rank=20,
    backends=("tensorflow",),
    supports=lambda layer, ctx: unusual_batch_norm(layer),
    description="FusedBatchNormV3 in training; BN folded into Conv2D+BiasAdd+Relu for inference",
)
def double_conv(steps, parts, training, sublayers=None):
    """``steps``: the two :class:`~kunet.conv_bn_math.ConvBN`; ``parts``: NHWC tensors whose
    channel concatenation is the input (convolved part by part in training)."""
    if not training and len(parts) > 1:
        # Inference: one convolution of the concatenation was as fast (the per-part form pays off
        # in training, where it also saves slicing the concatenation's gradient).
        parts = [tf.concat(parts, axis=-1)]
    for step in steps:
        dtype = parts[0].dtype
        bias = None if step.bias is None else step.bias.value
        batch_norm = step.bn is not None and step.bn.batch_statistics
        if step.bn is not None and not batch_norm:
            kernel, bias = cbm.fold_batch_norm(step.kernel.value, bias, step.bn)
        else:
            kernel = step.kernel.value
        kernel = tf.cast(kernel, dtype)
        bias = None if bias is None else tf.cast(bias, dtype)
        kernels = cbm.kernel_pieces(kernel, [p.shape[-1] for p in parts])
        # the bias on the last part's convolution, then the others' sum: Conv2D -> BiasAdd -> Add,
        # the order TensorFlow's remapper fuses
        y = cbm.conv_of_concatenation(parts[::-1], kernels[::-1], _conv, bias)
        if batch_norm:
            y = _batch_norm(step.bn, y)
        parts = [tf.nn.relu(y)]
    return parts[0]
