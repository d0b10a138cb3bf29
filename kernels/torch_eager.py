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


def _batch_norm(bn, y, training):
    dtype = y.dtype
    y = y.float()  # as Keras: BN computes in float32
    gamma = bn.gamma.value.float()
    beta = bn.beta.value.float()
    if training and bn.trainable:
        out, mean, invstd = torch.native_batch_norm(
            y, gamma, beta, None, None, True, 0.0, bn.epsilon
        )
        with torch.no_grad():
            var = (invstd.double().pow(-2) - bn.epsilon).clamp_min(0.0).float()
            update_moving_statistics(bn, mean, var)
    else:
        out = F.batch_norm(
            y,
            bn.moving_mean.value.float(),
            bn.moving_variance.value.float(),
            gamma,
            beta,
            False,
            0.0,
            bn.epsilon,
        )
    return out.to(dtype)


def double_conv_forward(layer, x, training: bool):
    """Run :class:`kunet.layers.DoubleConv` ``layer`` on the NHWC torch tensor ``x``."""
    # NCHW view of the NHWC tensor: channels_last memory when x is contiguous NHWC (no copy); a
    # tensor Keras left in NCHW memory (e.g. after its max-pool) is converted once here.
    y = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    for conv, bn in ((layer.conv1, layer.bn1), (layer.conv2, layer.bn2)):
        # HWIO -> OIHW in channels_last memory, like the activations: oneDNN then keeps the whole
        # convolution in channels_last (a plain OIHW weight makes it convert the input to NCHW).
        weight = conv.kernel.value.to(y.dtype).permute(3, 2, 0, 1)
        weight = weight.contiguous(memory_format=torch.channels_last)
        bias = conv.bias.value.to(y.dtype) if conv.use_bias else None
        y = F.conv2d(y, weight, bias, padding=1)
        if bn is not None:
            y = _batch_norm(bn, y, training)
        y = torch.relu_(y)  # in place: neither batch norm's nor conv's backward needs this tensor
    return y.permute(0, 2, 3, 1)


def max_pool2x(x):
    """2x2 stride-2 max-pool of an NHWC tensor, pooled as a channels_last NCHW view."""
    y = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    return F.max_pool2d(y, 2).permute(0, 2, 3, 1)
