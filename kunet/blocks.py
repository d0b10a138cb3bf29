"""Functional-API building blocks of the UNet family: each takes Keras tensors and returns Keras tensors.

``encoder_block`` -> ``bottleneck`` -> ``decoder_block`` (x depth) -> ``segmentation_head``, wired by
:class:`kunet.UNet`; ``nested_decoder`` wires UNet++'s dense skips instead. Every block works on
images (N, H, W, C) and volumes (N, D, H, W, C), from the rank of its input.

``block="double_conv"`` (the UNet's) or ``"residual"`` picks the convolution block; ``attention=True``
gates each skip with an :class:`kunet.layers.AttentionGate`.
"""

from __future__ import annotations

import keras

from kunet.layers import (
    AttentionGate,
    BilinearUpSampling2D,
    Conv2DTranspose,
    Conv3DTranspose,
    DoubleConv,
    MaxPool2x,
    ResidualDoubleConv,
    TrilinearUpSampling3D,
    conv_layer,
)

UPSAMPLING_MODES = ("transpose", "bilinear", "trilinear")
BLOCKS = ("double_conv", "residual")


def spatial_dims(x) -> int:
    """2 for an image tensor (N, H, W, C), 3 for a volume (N, D, H, W, C)."""
    return len(x.shape) - 2


def conv_block(x, filters, *, block="double_conv", name="conv", **conv_kwargs):
    """The convolution block on ``x`` (a tensor, or a list taken as their channel concatenation):
    :class:`kunet.layers.DoubleConv` or :class:`kunet.layers.ResidualDoubleConv`.

    ``conv_kwargs`` (``batch_norm``, ``bn_momentum``, ``fused``, ...) go to the block, here and in
    the other blocks.
    """
    if block == "double_conv":
        return DoubleConv(filters, name=name, **conv_kwargs)(x)
    if block == "residual":
        return ResidualDoubleConv(filters, name=name, **conv_kwargs)(x)
    raise ValueError(f"block must be one of {BLOCKS}; got {block!r}")


def encoder_block(x, filters, *, name="encoder", block="double_conv", **conv_kwargs):
    """Convolution block then 2x max-pool. Returns ``(skip, pooled)``."""
    skip = conv_block(x, filters, block=block, name=f"{name}_conv", **conv_kwargs)
    pooled = MaxPool2x(name=f"{name}_pool")(skip)
    return skip, pooled


def bottleneck(x, filters, *, dropout=0.0, name="bottleneck", block="double_conv", **conv_kwargs):
    """The deepest convolution block, followed by dropout when ``dropout > 0`` (as in the paper)."""
    x = conv_block(x, filters, block=block, name=f"{name}_conv", **conv_kwargs)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return x


def upsample(x, filters, *, mode="transpose", name="up"):
    """Double every spatial side and set the channels to ``filters``.

    ``"transpose"``: a 2x stride-2 transposed convolution. ``"bilinear"`` (images) /
    ``"trilinear"`` (volumes): linear up-sampling followed by a 2x convolution (the paper's
    "up-convolution"). On images these are :class:`kunet.layers.Conv2D` /
    :class:`kunet.layers.Conv2DTranspose` (Keras' layers, with fast paths); on volumes Keras'
    ``Conv3D`` and :class:`kunet.layers.Conv3DTranspose`.
    """
    dims = spatial_dims(x)
    if mode == "transpose":
        layer = Conv2DTranspose if dims == 2 else Conv3DTranspose
        return layer(filters, 2, strides=2, name=f"{name}_transpose")(x)
    linear = {2: ("bilinear", BilinearUpSampling2D), 3: ("trilinear", TrilinearUpSampling3D)}
    wanted, layer = linear[dims]
    if mode != wanted:
        raise ValueError(
            f"upsampling={mode!r} does not apply to {dims}D inputs: use 'transpose' or {wanted!r}"
        )
    x = layer(name=f"{name}_resize")(x)
    return conv_layer(dims, filters, 2, padding="same", name=f"{name}_conv")(x)


def decoder_block(x, skip, filters, *, upsampling="transpose", attention=False, name="decoder",
                  block="double_conv", **conv_kwargs):  # fmt: skip
    """Up-sample ``x``, gate the encoder's ``skip`` (``attention=True``), concatenate, convolve.

    The block takes ``[skip, up]`` and convolves their concatenation along channels without copying
    them into one tensor where that is faster (see :class:`kunet.layers.DoubleConv`). ``skip`` may
    be None (a decoder stage above the last encoder feature, as with some pretrained encoders).
    """
    up = upsample(x, filters, mode=upsampling, name=f"{name}_up")
    if skip is None:
        return conv_block(up, filters, block=block, name=f"{name}_conv", **conv_kwargs)
    if attention:
        skip = AttentionGate(name=f"{name}_attention")([skip, up])
    return conv_block([skip, up], filters, block=block, name=f"{name}_conv", **conv_kwargs)


def nested_decoder(encoder_features, filters, *, upsampling="transpose", block="double_conv",
                   **conv_kwargs):  # fmt: skip
    """UNet++'s nested dense skip pathways (Zhou et al. 2018) on the encoder's features.

    ``encoder_features[i]`` is node X(i, 0) (the last one the bottleneck); node X(i, j), j >= 1,
    convolves the concatenation of X(i, 0..j-1) and the up-sampled X(i+1, j-1), with ``filters[i]``
    filters. Returns the top row X(0, 1..depth), full-resolution, whose last is the UNet++ output
    (and all of which the deep-supervised and pruned models read).
    """
    depth = len(encoder_features) - 1
    nodes = {(i, 0): x for i, x in enumerate(encoder_features)}
    for j in range(1, depth + 1):
        for i in range(depth - j + 1):
            up = upsample(nodes[i + 1, j - 1], filters[i], mode=upsampling, name=f"x{i}{j}_up")
            parts = [nodes[i, k] for k in range(j)] + [up]
            nodes[i, j] = conv_block(parts, filters[i], block=block, name=f"x{i}{j}_conv",
                                     **conv_kwargs)  # fmt: skip
    return [nodes[0, j] for j in range(1, depth + 1)]


def segmentation_head(x, num_classes, *, activation=None, name="head"):
    """1x1 convolution to ``num_classes`` channels; logits unless ``activation`` is given.

    The head always computes in float32, so logits and probabilities stay accurate under mixed precision.
    """
    return conv_layer(
        spatial_dims(x), num_classes, 1, activation=activation, dtype="float32", name=name
    )(x)
