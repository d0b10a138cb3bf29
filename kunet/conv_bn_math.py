"""The Conv -> BatchNorm arithmetic that every DoubleConv implementation shares, written once.

In ``keras.ops`` on the backend's own tensors (the ``.value`` of Keras variables), so the same code
runs inside torch autograd, a ``tf.function`` and a JAX trace:

* :func:`fold_batch_norm`: an inference-mode BatchNormalization folded into the convolution before
  it (``bn(conv(x)) == conv'(x)``), in float32 as Keras computes BN;
* :func:`update_moving_statistics`: Keras' rule for the moving statistics (biased batch variance,
  ``moving = moving * momentum + batch * (1 - momentum)``);
* :func:`conv_of_concatenation`: the convolution of a channel concatenation as a sum of
  per-part convolutions with the matching slices of the kernel, without building the concatenation.

:class:`ConvBN` / :class:`BatchNormParams` are what a DoubleConv passes its implementations: the
variables and numbers, not the Keras layers.
"""

from __future__ import annotations

import dataclasses
import operator

from keras import ops

F32 = "float32"


@dataclasses.dataclass(frozen=True)
class BatchNormParams:
    """A ``keras.layers.BatchNormalization``'s variables and settings for one call."""

    gamma: object  # keras.Variable
    beta: object
    moving_mean: object
    moving_variance: object
    momentum: float
    epsilon: float
    batch_statistics: bool  # normalize with the batch's statistics (training and trainable)


@dataclasses.dataclass(frozen=True)
class ConvBN:
    """A 3x3 "same" convolution (HWIO kernel, optional bias) and the BatchNormalization after it."""

    kernel: object  # keras.Variable
    bias: object | None
    bn: BatchNormParams | None


def fold_batch_norm(kernel, bias, bn: BatchNormParams):
    """``(kernel * s, bias * s + beta - moving_mean * s)`` with ``s = gamma / sqrt(moving_variance +
    eps)``, float32: the convolution that equals ``conv`` followed by the inference-mode ``bn``.

    ``kernel`` / ``bias``: backend tensors (HWIO kernel; bias None when the conv has none).
    Differentiable in every input (fine-tuning through a frozen BN).
    """
    scale = ops.cast(bn.gamma.value, F32) * ops.rsqrt(
        ops.cast(bn.moving_variance.value, F32) + bn.epsilon
    )
    shift = ops.cast(bn.beta.value, F32) - ops.cast(bn.moving_mean.value, F32) * scale
    if bias is not None:
        shift = shift + ops.cast(bias, F32) * scale
    return ops.cast(kernel, F32) * scale, shift


def update_moving_statistics(bn: BatchNormParams, mean, variance) -> None:
    """Keras' update: ``moving = moving * momentum + batch * (1 - momentum)`` (float32).

    ``variance`` is the biased batch variance (divided by N, as Keras computes it).
    """
    for variable, batch in ((bn.moving_mean, mean), (bn.moving_variance, variance)):
        moving = ops.cast(variable.value, F32)
        batch = ops.stop_gradient(ops.cast(batch, F32))
        variable.assign(moving * bn.momentum + batch * (1.0 - bn.momentum))


def channel_slices(channels) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of each part's channels in the concatenation of parts of ``channels``."""
    slices, start = [], 0
    for c in channels:
        slices.append((start, start + int(c)))
        start += int(c)
    return slices


def kernel_pieces(kernel, channels) -> list:
    """An HWIO ``kernel`` cut along its input channels: the piece each input part convolves with."""
    if len(channels) == 1:
        return [kernel]
    return [kernel[:, :, a:b, :] for a, b in channel_slices(channels)]


def conv_of_concatenation(parts, kernels, conv, bias=None, add=operator.add):
    """``conv(concatenate(parts, channels), concatenate(kernels, in-channels)) + bias`` computed as
    ``sum_i conv(parts[i], kernels[i])``: the same sum of products, without the concatenation's copy
    (and, in training, without slicing its gradient).

    ``conv(x, kernel, bias)``: the backend's convolution (``bias`` None for all but the first part);
    ``add``: the accumulation (an in-place add where autograd allows it).
    """
    y = conv(parts[0], kernels[0], bias)
    for part, kernel in zip(parts[1:], kernels[1:], strict=True):
        y = add(y, conv(part, kernel, None))
    return y


def block_transpose(x, kernel, bias=None):
    """A transposed convolution whose kernel equals its strides ("valid" padding), on images or
    volumes: every input pixel maps to its own output block, so it is a matrix product and a
    depth-to-space reshape (``ops.einsum``):
    ``y[n, s*i + a, s*j + b, o] = sum_c x[n, i, j, c] * kernel[a, b, o, c] (+ bias[o])``.

    ``kernel``: Keras' transposed-convolution layout (*block, out, in)."""
    dims = len(x.shape) - 2
    space, block = "ijk"[:dims], "abd"[:dims]
    pairs = "".join(s + b for s, b in zip(space, block, strict=True))
    y = ops.einsum(f"n{space}c,{block}oc->n{pairs}o", x, ops.cast(kernel, x.dtype))
    shape = ops.shape(x)
    sizes = [shape[1 + d] * int(kernel.shape[d]) for d in range(dims)]
    y = ops.reshape(y, (-1, *sizes, int(kernel.shape[-2])))
    return y if bias is None else y + ops.cast(bias, x.dtype)
