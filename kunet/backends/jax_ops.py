"""The JAX backend's forms that XLA:CPU runs faster than Keras' own layers (``keras.ops`` only).

Registered (see :mod:`kunet.dispatch`):

* ``DoubleConv`` "jax": the Keras sublayers, the first convolution of a multi-part input (a decoder's
  ``[skip, up]``) computed part by part (:func:`kunet.conv_bn_math.conv_of_concatenation`) instead
  of on the concatenation: faster forward + backward on XLA:CPU at the UNet's decoder shapes;
* ``Conv2DTranspose`` / ``Conv3DTranspose`` "jax": a kernel equal to its strides as a matrix
  product and a depth-to-space reshape (``ops.einsum``): XLA:CPU lowers Keras' transposed convolution to an input-dilated
  convolution whose backward pass was an order of magnitude slower;
* ``MaxPool2x`` "jax": a max over a (2, 2) reshape: XLA:CPU's reduce-window backward
  (select-and-scatter) was 2-7x slower than the reduction's.

Figures: benchmarks/README.md.
"""

from __future__ import annotations

from keras import ops

from kunet import conv_bn_math as cbm
from kunet import dispatch
from kunet.layers import activated, plain_conv_reason


def conv_of_parts(conv, parts):
    """Keras ``conv`` (a ``Conv2D``) applied to the channel concatenation of ``parts``, computed per
    part with the kernel's slices."""

    def one(x, kernel, bias):
        y = ops.conv(x, ops.cast(kernel, x.dtype), strides=conv.strides, padding=conv.padding,
                     data_format="channels_last", dilation_rate=conv.dilation_rate)  # fmt: skip
        return y if bias is None else y + ops.cast(bias, y.dtype)

    kernels = cbm.kernel_pieces(conv.kernel, [p.shape[-1] for p in parts])
    return activated(
        conv, cbm.conv_of_concatenation(parts, kernels, one, conv.bias if conv.use_bias else None)
    )


def _double_conv_supports(layer, ctx):
    if ctx.parts < 2:
        return "one input: nothing to split"
    return plain_conv_reason(layer.conv1)


@dispatch.register(
    "DoubleConv",
    "jax",
    rank=30,
    backends=("jax",),
    supports=_double_conv_supports,
    description="the Keras sublayers, the first convolution per input part",
)
def double_conv(steps, parts, training, sublayers):
    return sublayers(parts, training, first_conv=conv_of_parts)


@dispatch.register(
    "Conv3DTranspose",
    "jax",
    rank=30,
    backends=("jax",),
    supports=lambda layer, ctx: layer.block_transpose_reason(),
    description="a matrix product and a depth-to-space reshape (ops.einsum)",
    spatial_dims=(3,),
)
@dispatch.register(
    "Conv2DTranspose",
    "jax",
    rank=30,
    backends=("jax",),
    supports=lambda layer, ctx: layer.block_transpose_reason(),
    description="a matrix product and a depth-to-space reshape (ops.einsum)",
)
def conv_transpose(layer, x):
    """``y[n, s*i + a, s*j + b, o] = sum_c x[n, i, j, c] * kernel[a, b, o, c] (+ bias[o])`` (and
    likewise in 3D): :func:`kunet.conv_bn_math.block_transpose`."""
    return activated(
        layer, cbm.block_transpose(x, layer.kernel, layer.bias if layer.use_bias else None)
    )


@dispatch.register(
    "MaxPool2x",
    "jax",
    rank=30,
    backends=("jax",),
    description="a max over a (2, 2) reshape",
)
def max_pool2x(layer, x):
    n, h, w, c = ops.shape(x)
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return ops.max(ops.reshape(x, (n, h // 2, 2, w // 2, 2, c)), axis=(2, 4))
