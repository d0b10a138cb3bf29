"""Functional-API building blocks of the UNet: each takes Keras tensors and returns Keras tensors.

``encoder_block`` -> ``bottleneck`` -> ``decoder_block`` (x depth) -> ``segmentation_head``, wired by
:class:`kunet.UNet`. They are public so that variants (other encoders, attention gates, 3D) can reuse
them.
"""

from __future__ import annotations

import keras

from kunet.layers import BilinearUpSampling2D, Conv2D, Conv2DTranspose, DoubleConv, MaxPool2x

UPSAMPLING_MODES = ("transpose", "bilinear")


def encoder_block(x, filters, *, name="encoder", **conv_kwargs):
    """DoubleConv then 2x2 max-pool. Returns ``(skip, pooled)``.

    ``conv_kwargs`` (``batch_norm``, ``bn_momentum``, ``fused``, ...) go to :class:`DoubleConv`, here
    and in the other blocks.
    """
    skip = DoubleConv(filters, name=f"{name}_conv", **conv_kwargs)(x)
    pooled = MaxPool2x(name=f"{name}_pool")(skip)
    return skip, pooled


def bottleneck(x, filters, *, dropout=0.0, name="bottleneck", **conv_kwargs):
    """The deepest DoubleConv, followed by dropout when ``dropout > 0`` (as in the UNet paper)."""
    x = DoubleConv(filters, name=f"{name}_conv", **conv_kwargs)(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def upsample(x, filters, *, mode="transpose", name="up"):
    """Double H and W and set the channels to ``filters``.

    ``"transpose"``: a 2x2 stride-2 transposed convolution. ``"bilinear"``: bilinear up-sampling
    followed by a 2x2 convolution (the paper's "up-convolution"). The convolutions are
    :class:`kunet.layers.Conv2D` / :class:`kunet.layers.Conv2DTranspose`: Keras' layers, without
    layout copies on torch.
    """
    if mode == "transpose":
        return Conv2DTranspose(filters, 2, strides=2, name=f"{name}_transpose")(x)
    if mode == "bilinear":
        x = BilinearUpSampling2D(name=f"{name}_resize")(x)
        return Conv2D(filters, 2, padding="same", name=f"{name}_conv")(x)
    raise ValueError(f"upsampling must be one of {UPSAMPLING_MODES}; got {mode!r}")


def decoder_block(x, skip, filters, *, upsampling="transpose", name="decoder", **conv_kwargs):
    """Up-sample ``x``, concatenate the encoder's ``skip``, then DoubleConv.

    The DoubleConv takes ``[skip, x]`` and convolves their concatenation along channels without
    copying them into one tensor where that is faster (see :class:`kunet.layers.DoubleConv`).
    """
    x = upsample(x, filters, mode=upsampling, name=f"{name}_up")
    return DoubleConv(filters, name=f"{name}_conv", **conv_kwargs)([skip, x])


def segmentation_head(x, num_classes, *, activation=None, name="head"):
    """1x1 convolution to ``num_classes`` channels; logits unless ``activation`` is given.

    The head always computes in float32, so logits and probabilities stay accurate under mixed precision.
    """
    return Conv2D(num_classes, 1, activation=activation, dtype="float32", name=name)(x)
