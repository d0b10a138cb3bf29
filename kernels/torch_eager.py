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

import functools
import weakref

import torch
import torch.nn.functional as F


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


def _oihw(kernel):
    """A Keras HWIO kernel as an OIHW weight in channels_last memory, like the activations.

    oneDNN then keeps the whole convolution in channels_last (a plain OIHW weight makes it convert the
    input to NCHW).
    """
    return kernel.permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)


def _weight(conv, dtype):
    return _oihw(conv.kernel.value.to(dtype))


def _part_weights(kernel, channels):
    """``kernel`` (HWIO) cut along its input channels into pieces of ``channels`` each, as OIHW
    channels_last weights: one per input part of a convolution of their concatenation."""
    pieces = torch.split(kernel, list(channels), dim=2) if len(channels) > 1 else [kernel]
    return [_oihw(k) for k in pieces]


# Inference weights prepared from the variables (layout, BN folding), per layer, while gradients are
# off: re-laying out and folding every kernel on every call cost ~4 ms per UNet forward, independent of
# the batch, where the reference keeps its weights in channels_last once. An entry is valid while the
# variables hold the same tensors at the same version (Keras assigns in place, which bumps it).
_prepared = weakref.WeakKeyDictionary()


def _prepare(layer, tensors, key, make):
    """``make()``, cached on ``layer`` while gradients are off, ``tensors`` are unchanged and ``key``
    (the dtype, and the input parts' channels) is the same."""
    if torch.is_grad_enabled():
        return make()
    stamp = (key,) + tuple((t, t._version) for t in tensors if t is not None)
    entry = _prepared.get(layer)
    if entry is not None and _same_stamp(entry[0], stamp):
        return entry[1]
    value = make()
    _prepared[layer] = (stamp, value)
    return value


def _same_stamp(a, b):
    if len(a) != len(b) or a[0] != b[0]:
        return False
    return all(x is y and vx == vy for (x, vx), (y, vy) in zip(a[1:], b[1:], strict=True))


def _bias(conv, dtype):
    return conv.bias.value.to(dtype) if conv.use_bias else None


def _folded(conv, bn, dtype, channels):
    """Weights (one per input part) and bias of ``conv`` followed by an inference-mode ``bn``.

    ``bn(conv(x)) = conv(x) * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``: scaling
    the kernel's output channels by ``s`` saves batch norm's whole pass over the activations. Folded in
    float32 (Keras computes BN in float32), then cast to the compute dtype.
    """
    kernel = conv.kernel.value.float()
    scale = bn.gamma.value.float() * torch.rsqrt(bn.moving_variance.value.float() + bn.epsilon)
    shift = bn.beta.value.float() - bn.moving_mean.value.float() * scale
    if conv.use_bias:
        shift = shift + conv.bias.value.float() * scale
    weights = _part_weights((kernel * scale).to(dtype), channels)
    return weights, shift.to(dtype)


@functools.lru_cache(maxsize=1)
def _conv_relu_op():
    """oneDNN's convolution with the ReLU fused in (the op torch.compile's CPU backend emits), or None.

    A private op of PyTorch's CPU build, without autograd: used only with gradients off, and looked up
    defensively so that a PyTorch without it falls back to conv2d + ReLU.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise.default
    except (AttributeError, RuntimeError):
        return None


# Output elements from which the fused conv+ReLU pays off: it saves a pass over large activations
# (batch 8 at 128x128: 2.2 vs 2.4 ms) but has a higher fixed cost per call (a 1x16x16x16 conv: 0.06
# vs 0.03 ms); from 2**20 elements (batch 8 at 64x64x32) the two were equal.
_FUSE_RELU_FROM = 1 << 20


@functools.lru_cache(maxsize=1)
def _conv_add_relu_op():
    """oneDNN's convolution with an in-place ``relu(conv(x) + other)`` post-op, or None (as above)."""
    if _conv_relu_op() is None:
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise_.binary
    except (AttributeError, RuntimeError):
        return None


def _fuse_in_onednn(y, weight) -> bool:
    return (
        y.device.type == "cpu"
        and y.dtype == torch.float32
        and not torch.is_grad_enabled()
        and y.shape[0] * weight.shape[0] * y.shape[2] * y.shape[3] >= _FUSE_RELU_FROM
    )


def _conv_relu(parts, weights, bias):
    """``relu(sum_i conv2d(parts[i], weights[i]) + bias)``, 3x3 kernels, "same" padding.

    One convolution per input part, summed, is the convolution of the parts' channel concatenation
    without the copy into it. Where it pays (CPU, float32, gradients off, large outputs) each part is
    one oneDNN call, the first with the bias and the last with the sum and ReLU fused in.
    """
    relu_op, add_relu_op = _conv_relu_op(), _conv_add_relu_op()
    if _fuse_in_onednn(parts[0], weights[0]) and relu_op is not None:
        if len(parts) == 1:
            return relu_op(parts[0], weights[0], bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
        if add_relu_op is not None:
            y = F.conv2d(parts[0], weights[0], bias, padding=1)
            for i in range(1, len(parts)):
                unary = "relu" if i == len(parts) - 1 else None
                args = ([1, 1], [1, 1], [1, 1], 1, "add", 1.0, unary, [], "")
                y = add_relu_op(y, parts[i], weights[i], None, *args)
            return y
    return torch.relu_(_conv_sum(parts, weights, bias))


def _conv_sum(parts, weights, bias):
    """``sum_i conv2d(parts[i], weights[i]) + bias`` (3x3, "same"): the convolution of the concatenation."""
    y = F.conv2d(parts[0], weights[0], bias, padding=1)
    for part, weight in zip(parts[1:], weights[1:], strict=True):
        out = F.conv2d(part, weight, padding=1)
        # in place where autograd allows it (y is no input of a backward that needs it)
        y = y.add_(out) if not torch.is_grad_enabled() else y + out
    return y


def nchw_view(x):
    """The NCHW view of an NHWC tensor, in channels_last memory (no copy when ``x`` is contiguous)."""
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def double_conv_forward(layer, inputs, training: bool):
    """Run :class:`kunet.layers.DoubleConv` ``layer`` on NHWC torch tensor(s) ``inputs``.

    ``inputs`` is a tensor or a list of tensors whose channel concatenation is the layer's input: the
    first convolution then runs once per part with its slice of the kernel, summed.
    Batch norm in inference mode (``training=False``, or a frozen BN) is folded into the convolution,
    and with gradients off the ReLU is fused into it too (one oneDNN call per convolution).
    """
    # A tensor Keras left in NCHW memory is converted once here; anything from this module is not.
    parts = [nchw_view(x) for x in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
    for conv, bn in ((layer.conv1, layer.bn1), (layer.conv2, layer.bn2)):
        channels = tuple(p.shape[1] for p in parts)
        dtype = parts[0].dtype
        if bn is not None and training and bn.trainable:
            weights = _part_weights(conv.kernel.value.to(dtype), channels)
            y = _conv_sum(parts, weights, _bias(conv, dtype))
            # in place: neither batch norm's nor conv's backward needs this tensor
            y = torch.relu_(_batch_norm(bn, y))
        else:
            y = _conv_relu(parts, *_inference_weights(conv, bn, dtype, channels))
        parts = [y]
    return parts[0].permute(0, 2, 3, 1)


def _inference_weights(conv, bn, dtype, channels):
    """([weight per input part], bias) of ``conv`` (``bn`` folded in, if any) for inference, cached."""
    tensors = [conv.kernel.value, conv.bias.value if conv.use_bias else None]
    if bn is None:

        def make():
            return _part_weights(conv.kernel.value.to(dtype), channels), _bias(conv, dtype)

    else:
        tensors += [v.value for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)]

        def make():
            return _folded(conv, bn, dtype, channels)

    return _prepare(conv, tensors, (dtype, channels), make)


def _layer_weights(layer, dtype, make_weight):
    tensors = [layer.kernel.value, layer.bias.value if layer.use_bias else None]
    return _prepare(layer, tensors, dtype, lambda: (make_weight(), _bias(layer, dtype)))


def conv2d(layer, x):
    """``keras.layers.Conv2D`` ``layer`` (stride 1, "valid" or odd-kernel "same") on NHWC ``x``."""
    weight, bias = _layer_weights(layer, x.dtype, lambda: _weight(layer, x.dtype))
    padding = tuple(k // 2 for k in layer.kernel_size) if layer.padding == "same" else 0
    y = F.conv2d(nchw_view(x), weight, bias, padding=padding)
    return y.permute(0, 2, 3, 1)


def conv_transpose2d(layer, x):
    """``keras.layers.Conv2DTranspose`` ``layer`` with kernel == strides, "valid", on NHWC ``x``."""

    def make_weight():
        # Keras' transposed kernel is (kh, kw, out, in); torch's is (in, out, kh, kw).
        weight = layer.kernel.value.to(x.dtype).permute(3, 2, 0, 1)
        return weight.contiguous(memory_format=torch.channels_last)

    weight, bias = _layer_weights(layer, x.dtype, make_weight)
    y = F.conv_transpose2d(nchw_view(x), weight, bias, stride=layer.strides)
    return y.permute(0, 2, 3, 1)


def max_pool2x(x):
    """2x2 stride-2 max-pool of an NHWC tensor, pooled as a channels_last NCHW view."""
    return F.max_pool2d(nchw_view(x), 2).permute(0, 2, 3, 1)
