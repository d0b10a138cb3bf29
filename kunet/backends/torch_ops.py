"""The torch backend's plain implementations: PyTorch's own eager ops on channels_last views.

Registered (see :mod:`kunet.dispatch`): ``DoubleConv`` / ``Conv2D`` / ``Conv2DTranspose`` /
``MaxPool2x`` "torch", and the ``UNet`` inference replay.

Same math and the same Keras variables as the Keras layers, but run as ``F.conv2d`` +
``torch.native_batch_norm`` + ReLU on a channels_last view of the NHWC tensor:

* Keras' torch backend runs a channels_last ``Conv2D`` as permute -> ``.contiguous()`` (a copy to
  NCHW) -> a copy back to channels_last memory format, and a ``BatchNormalization`` as separate
  moments / subtract / multiply / add ops, each saved for backward (about half of a training step on
  a 2-core CPU, benchmarks/README.md).
* Here the NHWC tensor is viewed as NCHW (``permute``, no copy: its memory is already channels_last),
  convolved by oneDNN/cuDNN in that layout, and normalized by one fused batch-norm kernel with its
  own fused backward.

Batch norm follows ``keras.layers.BatchNormalization`` (:mod:`kunet.conv_bn_math`): statistics in
float32, biased batch variance, Keras' momentum rule, a frozen BN in inference mode (folded into the
convolution).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kunet import _eager, dispatch
from kunet import conv_bn_math as cbm
from kunet.layers import activated, plain_conv_reason, unusual_batch_norm


# ---------------------------------------------------------------------------------- layout
def nchw_view(x):
    """The NCHW view of an NHWC tensor, in channels_last memory (no copy when ``x`` is contiguous)."""
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _oihw(kernel):
    """A Keras HWIO kernel as an OIHW weight in channels_last memory, like the activations.

    oneDNN then keeps the whole convolution in channels_last (a plain OIHW weight makes it convert the
    input to NCHW).
    """
    return kernel.permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)


def _part_weights(kernel, channels):
    """OIHW channels_last weights, one per input part (:func:`kunet.conv_bn_math.kernel_pieces`)."""
    return [_oihw(k) for k in cbm.kernel_pieces(kernel, channels)]


# Inference weights prepared from the variables (layout, BN folding), per variable, while gradients
# are off: re-laying out and folding every kernel on every call cost a few ms per UNet forward,
# independent of the batch (benchmarks/README.md). An entry is valid while the variables hold the
# same tensors at the same version (Keras assigns in place, which bumps it). Kept on the owner (a
# Keras variable or layer) itself: torch tensors cannot key a WeakKeyDictionary (== is elementwise).
_CACHE = "_kunet_prepared"


def _prepare(owner, tensors, key, make):
    """``make()``, cached on ``owner`` while gradients are off, ``tensors`` are unchanged and ``key``
    (the dtype, and the input parts' channels) is the same."""
    if torch.is_grad_enabled():
        return make()
    stamp = (key,) + tuple((t, t._version) for t in tensors if t is not None)
    entry = owner.__dict__.get(_CACHE)
    if entry is not None and _same_stamp(entry[0], stamp):
        return entry[1]
    value = make()
    owner.__dict__[_CACHE] = (stamp, value)
    return value


def _same_stamp(a, b):
    if len(a) != len(b) or a[0] != b[0]:
        return False
    return all(x is y and vx == vy for (x, vx), (y, vy) in zip(a[1:], b[1:], strict=True))


def _value(variable, dtype):
    return None if variable is None else variable.value.to(dtype)


# ---------------------------------------------------------------------------------- oneDNN fusion
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


@functools.lru_cache(maxsize=1)
def _conv_add_relu_op():
    """oneDNN's convolution with an in-place ``relu(conv(x) + other)`` post-op, or None (as above)."""
    if _conv_relu_op() is None:
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise_.binary
    except (AttributeError, RuntimeError):
        return None


# Output elements from which the fused conv+ReLU pays off: it saves a pass over large activations
# but has a higher fixed cost per call (benchmarks/README.md).
_FUSE_RELU_FROM = 1 << 20


def _fuse_in_onednn(y, weight) -> bool:
    return (
        y.device.type == "cpu"
        and y.dtype == torch.float32
        and not torch.is_grad_enabled()
        and y.shape[0] * weight.shape[0] * y.shape[2] * y.shape[3] >= _FUSE_RELU_FROM
    )


def _conv3x3(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=1)


def _add(y, out):
    # in place where autograd allows it (y is no input of a backward that needs it)
    return y.add_(out) if not torch.is_grad_enabled() else y + out


def _conv_sum(parts, weights, bias):
    return cbm.conv_of_concatenation(parts, weights, _conv3x3, bias, add=_add)


def _conv_relu(parts, weights, bias):
    """``relu(conv of the parts' concatenation + bias)``, 3x3 "same".

    Where it pays (CPU, float32, gradients off, large outputs) each part is one oneDNN call, the
    first with the bias and the last with the sum and ReLU fused in.
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


# ---------------------------------------------------------------------------------- DoubleConv
def _batch_norm(bn: cbm.BatchNormParams, y):
    """Training-mode batch norm with batch statistics; updates the moving statistics."""
    dtype = y.dtype
    y = y.float()  # as Keras: BN computes in float32
    gamma, beta = bn.gamma.value.float(), bn.beta.value.float()
    out, mean, invstd = torch.native_batch_norm(y, gamma, beta, None, None, True, 0.0, bn.epsilon)
    with torch.no_grad():
        var = (invstd.double().pow(-2) - bn.epsilon).clamp_min(0.0).float()  # biased
        cbm.update_moving_statistics(bn, mean, var)
    return out.to(dtype)


def _inference_weights(step: cbm.ConvBN, dtype, channels):
    """([weight per input part], bias) of ``step`` (its BN folded in, if any), cached."""
    tensors = [step.kernel.value, None if step.bias is None else step.bias.value]
    if step.bn is None:

        def make():
            return _part_weights(step.kernel.value.to(dtype), channels), _value(step.bias, dtype)

    else:
        bn = step.bn
        tensors += [v.value for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)]

        def make():
            kernel, shift = cbm.fold_batch_norm(
                step.kernel.value, None if step.bias is None else step.bias.value, bn
            )
            return _part_weights(kernel.to(dtype), channels), shift.to(dtype)

    return _prepare(step.kernel, tensors, (dtype, channels), make)


def _double_conv_supports(layer, ctx):
    return unusual_batch_norm(layer)


@dispatch.register(
    "DoubleConv",
    "torch",
    rank=20,
    backends=("torch",),
    supports=_double_conv_supports,
    description="F.conv2d + native_batch_norm on channels_last views; BN folded for inference",
)
def double_conv(steps, parts, training, sublayers=None):
    """``steps``: the two :class:`~kunet.conv_bn_math.ConvBN`; ``parts``: NHWC tensors whose
    channel concatenation is the input. A BN in inference mode is folded into its convolution, and
    with gradients off the ReLU is fused into it too (one oneDNN call per convolution)."""
    # A tensor Keras left in NCHW memory is converted once here; anything from this module is not.
    parts = [nchw_view(x) for x in parts]
    for step in steps:
        channels = tuple(p.shape[1] for p in parts)
        dtype = parts[0].dtype
        if step.bn is not None and step.bn.batch_statistics:
            y = _conv_sum(parts, _part_weights(step.kernel.value.to(dtype), channels),
                          _value(step.bias, dtype))  # fmt: skip
            # in place: neither batch norm's nor conv's backward needs this tensor
            y = torch.relu_(_batch_norm(step.bn, y))
        else:
            y = _conv_relu(parts, *_inference_weights(step, dtype, channels))
        parts = [y]
    return parts[0].permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------- convolutions
def _layer_weights(layer, dtype, make_weight):
    tensors = [layer.kernel.value, layer.bias.value if layer.use_bias else None]
    bias = layer.bias if layer.use_bias else None
    return _prepare(layer, tensors, dtype, lambda: (make_weight(), _value(bias, dtype)))


def _conv2d_supports(layer, ctx):
    if any(s != 1 for s in layer.strides):
        return f"strides={tuple(layer.strides)}"
    if layer.padding == "same" and any(k % 2 == 0 for k in layer.kernel_size):
        return f"an even kernel {tuple(layer.kernel_size)} with padding='same'"
    return plain_conv_reason(layer)


@dispatch.register(
    "Conv2D",
    "torch",
    rank=20,
    backends=("torch",),
    supports=_conv2d_supports,
    description="F.conv2d on a channels_last view (no NCHW copies)",
)
def conv2d(layer, x):
    """``keras.layers.Conv2D`` ``layer`` (stride 1, "valid" or odd-kernel "same") on NHWC ``x``."""
    weight, bias = _layer_weights(layer, x.dtype, lambda: _oihw(layer.kernel.value.to(x.dtype)))
    padding = tuple(k // 2 for k in layer.kernel_size) if layer.padding == "same" else 0
    y = F.conv2d(nchw_view(x), weight, bias, padding=padding)
    return activated(layer, y.permute(0, 2, 3, 1))


@dispatch.register(
    "Conv2DTranspose",
    "torch",
    rank=20,
    backends=("torch",),
    supports=lambda layer, ctx: layer.block_transpose_reason(),
    description="F.conv_transpose2d on a channels_last view",
)
def conv_transpose2d(layer, x):
    """``keras.layers.Conv2DTranspose`` ``layer`` with kernel == strides, "valid", on NHWC ``x``."""

    def make_weight():
        # Keras' transposed kernel is (kh, kw, out, in); torch's is (in, out, kh, kw).
        weight = layer.kernel.value.to(x.dtype).permute(3, 2, 0, 1)
        return weight.contiguous(memory_format=torch.channels_last)

    weight, bias = _layer_weights(layer, x.dtype, make_weight)
    y = F.conv_transpose2d(nchw_view(x), weight, bias, stride=layer.strides)
    return activated(layer, y.permute(0, 2, 3, 1))


@dispatch.register(
    "MaxPool2x",
    "torch",
    rank=20,
    backends=("torch",),
    description="F.max_pool2d on a channels_last view",
)
def max_pool2x(layer, x):
    """2x2 stride-2 max-pool of an NHWC tensor, pooled as a channels_last NCHW view."""
    return F.max_pool2d(nchw_view(x), 2).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------------------- UNet
def _replay_supports(model, ctx):
    if ctx.training:
        return "training (the replay is for inference)"
    if _eager.replay_plan(model) is None:
        return _eager.replay_refusal(model)
    return None


@dispatch.register(
    "UNet",
    "torch",
    rank=20,
    backends=("torch",),
    supports=_replay_supports,
    description="inference replays the layers' call() without Keras' per-layer __call__",
    spatial_dims=(2, 3),
)
def unet_replay(model, x, training):
    return _eager.replay_plan(model)(x)
