"""DoubleConv in PyTorch's own eager ops: the plain (non-Triton) path on the torch backend.

Same math and the same Keras variables as the ``Conv2D`` / ``BatchNormalization`` sublayers, but run
as ``F.conv2d`` + ``torch.native_batch_norm`` + ReLU on a channels_last view of the NHWC tensor:

* Keras' torch backend runs a channels_last ``Conv2D`` as permute -> ``.contiguous()`` (a copy to
  NCHW) -> a copy back to channels_last memory format, and a ``BatchNormalization`` as separate
  moments / subtract / multiply / add ops, each saved for backward. Measured on a 2-core CPU (UNet
  16-128, 128x128, batch 8, training) these copies and elementwise passes took about half the step.
* Here the NHWC tensor is viewed as NCHW (``permute``, no copy: its memory is already channels_last),
  convolved by oneDNN/cuDNN in that layout, and normalized by one fused batch-norm kernel with its
  own fused backward.

Semantics follow ``keras.layers.BatchNormalization`` exactly: statistics and normalization in float32
(inputs in float16/bfloat16 are upcast), biased batch variance, ``moving = moving * momentum +
batch * (1 - momentum)``, and a non-trainable (frozen) BN runs in inference mode. Parity with the
Keras sublayers is tested in ``tests/test_torch_eager.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(layer) -> bool:
    """False for BatchNormalization options this path does not implement (then use the sublayers)."""
    for bn in (layer.bn1, layer.bn2):
        if bn is not None and (not bn.center or not bn.scale or getattr(bn, "renorm", False)):
            return False
    return True


def update_moving_statistics(bn, mean, var):
    """``keras.layers.BatchNormalization``'s update of the moving statistics (float32)."""
    momentum = bn.momentum
    moving_mean = bn.moving_mean.value.detach().to(torch.float32)
    moving_var = bn.moving_variance.value.detach().to(torch.float32)
    bn.moving_mean.assign(moving_mean * momentum + mean * (1.0 - momentum))
    bn.moving_variance.assign(moving_var * momentum + var * (1.0 - momentum))


def _batch_norm(bn, y):
    """Training-mode batch norm with batch statistics; updates ``bn``'s moving statistics."""
    dtype = y.dtype
    y = y.float()  # as Keras: BN computes in float32
    gamma = bn.gamma.value.float()
    beta = bn.beta.value.float()
    out, mean, invstd = torch.native_batch_norm(y, gamma, beta, None, None, True, 0.0, bn.epsilon)
    with torch.no_grad():
        var = (invstd.double().pow(-2) - bn.epsilon).clamp_min(0.0).float()
        update_moving_statistics(bn, mean, var)
    return out.to(dtype)


def _weight(conv, dtype):
    """A Keras HWIO kernel as an OIHW weight in channels_last memory, like the activations.

    oneDNN then keeps the whole convolution in channels_last (a plain OIHW weight makes it convert the
    input to NCHW).
    """
    return (
        conv.kernel.value.to(dtype)
        .permute(3, 2, 0, 1)
        .contiguous(memory_format=torch.channels_last)
    )


def _folded(conv, bn, dtype):
    """Weight and bias of ``conv`` followed by an inference-mode ``bn``, as one convolution.

    ``bn(conv(x)) = conv(x) * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``: scaling
    the kernel's output channels by ``s`` saves batch norm's whole pass over the activations. Folded in
    float32 (Keras computes BN in float32), then cast to the compute dtype.
    """
    kernel = conv.kernel.value.float()
    scale = bn.gamma.value.float() * torch.rsqrt(bn.moving_variance.value.float() + bn.epsilon)
    shift = bn.beta.value.float() - bn.moving_mean.value.float() * scale
    if conv.use_bias:
        shift = shift + conv.bias.value.float() * scale
    weight = (kernel * scale).to(dtype).permute(3, 2, 0, 1)
    return weight.contiguous(memory_format=torch.channels_last), shift.to(dtype)


def nchw_view(x):
    """The NCHW view of an NHWC tensor, in channels_last memory (no copy when ``x`` is contiguous)."""
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def double_conv_forward(layer, x, training: bool):
    """Run :class:`kunet.layers.DoubleConv` ``layer`` on the NHWC torch tensor ``x``.

    Batch norm in inference mode (``training=False``, or a frozen BN) is folded into the convolution.
    """
    # A tensor Keras left in NCHW memory is converted once here; anything from this module is not.
    y = nchw_view(x)
    for conv, bn in ((layer.conv1, layer.bn1), (layer.conv2, layer.bn2)):
        if bn is not None and not (training and bn.trainable):
            weight, bias = _folded(conv, bn, y.dtype)
            y = F.conv2d(y, weight, bias, padding=1)
        else:
            bias = conv.bias.value.to(y.dtype) if conv.use_bias else None
            y = F.conv2d(y, _weight(conv, y.dtype), bias, padding=1)
            if bn is not None:
                y = _batch_norm(bn, y)
        y = torch.relu_(y)  # in place: neither batch norm's nor conv's backward needs this tensor
    return y.permute(0, 2, 3, 1)


def conv2d(layer, x):
    """``keras.layers.Conv2D`` ``layer`` (stride 1, "valid" or odd-kernel "same") on NHWC ``x``."""
    weight = _weight(layer, x.dtype)
    bias = layer.bias.value.to(x.dtype) if layer.use_bias else None
    padding = tuple(k // 2 for k in layer.kernel_size) if layer.padding == "same" else 0
    y = F.conv2d(nchw_view(x), weight, bias, padding=padding)
    return y.permute(0, 2, 3, 1)


def conv_transpose2d(layer, x):
    """``keras.layers.Conv2DTranspose`` ``layer`` with kernel == strides, "valid", on NHWC ``x``."""
    # Keras' transposed kernel is (kh, kw, out, in); torch's is (in, out, kh, kw).
    weight = layer.kernel.value.to(x.dtype).permute(3, 2, 0, 1)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = layer.bias.value.to(x.dtype) if layer.use_bias else None
    y = F.conv_transpose2d(nchw_view(x), weight, bias, stride=layer.strides)
    return y.permute(0, 2, 3, 1)


def max_pool2x(x):
    """2x2 stride-2 max-pool of an NHWC tensor, pooled as a channels_last NCHW view."""
    return F.max_pool2d(nchw_view(x), 2).permute(0, 2, 3, 1)
