"""The fused Triton DoubleConv, Keras side: what it supports, and the call into ``kunet.kernels``.

Registered as ``DoubleConv`` "triton" (:mod:`kunet.dispatch`), ahead of the torch eager path and
governed by the fused policy (``fused=`` / :func:`kunet.set_fused` / ``KUNET_FUSED``). The kernels and
their ``torch.autograd.Function`` s (:mod:`kunet.kernels.autograd`) take tensors only; this module
turns the layer's variables into those tensors:

* training, both BatchNormalizations normalizing with batch statistics: ``DoubleConvTrainFn``, then
  the moving statistics updated by Keras' rule (:func:`kunet.conv_bn_math.update_moving_statistics`);
* inference (``training=False``, or both BNs frozen): BN folded into the kernels
  (:func:`kunet.conv_bn_math.fold_batch_norm`, differentiable) and ``DoubleConvInferenceFn``.

Importing this module imports torch but not Triton (which is optional): the kernels are imported on
the first fused call.
"""

from __future__ import annotations

import torch

from kunet import conv_bn_math as cbm
from kunet import dispatch
from kunet.layers import unusual_batch_norm


def _supports(layer, ctx):
    if not layer.batch_norm:
        return "it fuses Conv-BatchNorm-ReLU; this layer has batch_norm=False"
    unusual = unusual_batch_norm(layer)
    if unusual is not None:
        return unusual
    if ctx.training and len(set(ctx.frozen)) > 1:
        return "one BatchNormalization frozen, the other not"
    error = dispatch.triton_import_error()
    if error is not None:
        return error
    if ctx.device == "cuda" or (ctx.device == "cpu" and ctx.interpret):
        return None
    return f"no CUDA device (the input is on {ctx.device!r}; TRITON_INTERPRET=1 runs it on a CPU)"


@dispatch.register(
    "DoubleConv",
    "triton",
    rank=10,
    backends=("torch",),
    supports=_supports,
    fused=True,
    description="fused Triton kernels: Conv+BN statistics, BN+ReLU in the next conv's prologue",
)
def double_conv(steps, parts, training, sublayers=None):
    """``steps``: the two :class:`~kunet.conv_bn_math.ConvBN` (both with a BN); ``parts``: NHWC
    tensors, concatenated here (the kernel reads one tensor)."""
    from kunet.kernels import autograd  # lazy: triton

    x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    (c1, bn1), (c2, bn2) = ((s.kernel, s.bn) for s in steps)
    if bn1.batch_statistics:  # and bn2's: the registry checked
        stats: dict = {}
        out = autograd.DoubleConvTrainFn.apply(
            x, c1.value, bn1.gamma.value, bn1.beta.value, c2.value, bn2.gamma.value,
            bn2.beta.value, float(bn1.epsilon), float(bn2.epsilon), stats,
        )  # fmt: skip
        with torch.no_grad():
            cbm.update_moving_statistics(bn1, stats["mean1"], stats["var1"])
            cbm.update_moving_statistics(bn2, stats["mean2"], stats["var2"])
        return out
    w1, b1 = cbm.fold_batch_norm(c1.value, None, bn1)
    w2, b2 = cbm.fold_batch_norm(c2.value, None, bn2)
    return autograd.DoubleConvInferenceFn.apply(x, w1, b1, w2, b2)
