"""torch.autograd.Function(s) around the fused DoubleConv kernels, and the layer entry point.

:func:`double_conv_layer_forward` is what :mod:`kunet._fused` calls for a
:class:`kunet.layers.DoubleConv` on the torch backend.  It runs

* training (both BatchNormalizations trainable): :class:`DoubleConvTrainFn` - conv1 with batch
  statistics in its epilogue, a deterministic finalize, conv2 with BN1 + ReLU applied in its
  prologue and statistics in its epilogue, finalize, BN2 + ReLU.  Saved for backward: x, the raw
  conv outputs y1 and y2, and per-channel vectors only; the normalized activations are recomputed.
  The moving statistics are updated exactly as ``keras.layers.BatchNormalization`` does
  (``moving = moving * momentum + batch * (1 - momentum)``, biased batch variance).
* inference (``training=False``, or both BN layers frozen: Keras runs a frozen BN in inference mode):
  :class:`DoubleConvInferenceFn` - BN folded into the convolutions (differentiable torch ops on the
  variables), conv + bias + ReLU twice; its backward gives gradients to x, the kernels and, through
  the folding, gamma and beta (fine-tuning with frozen BN).
* anything else (only one of the two BN layers frozen; a BN without center/scale or with renorm):
  the plain Keras sublayers, same semantics, no fused kernel.

The Keras variables' ``.value`` (the torch Parameters Keras' trainer differentiates) are the
autograd inputs, so gradients reach the Keras variables.  Activations may be fp32, fp16 or bf16;
variables stay fp32; statistics and accumulation are fp32; the output has x's dtype.
"""

from __future__ import annotations

import torch
from kunet.kernels import double_conv as K
from kunet.kernels.torch_eager import update_moving_statistics


def _stat_vectors(part_mean, part_m2, gamma, beta, m, eps):
    mean, var, scale, shift = K.bn_finalize(part_mean, part_m2, gamma, beta, m, eps)
    rstd = torch.rsqrt(var + eps)
    return mean, var, rstd, scale, shift


class DoubleConvTrainFn(torch.autograd.Function):
    """Training-mode ``relu(BN2(conv2(relu(BN1(conv1(x))))))`` with batch statistics.

    ``forward(x, w1, gamma1, beta1, w2, gamma2, beta2, eps1, eps2, batch_stats)``: the weights are
    HWIO; ``batch_stats`` is a dict that receives ``mean1, var1, mean2, var2`` (fp32, detached) for
    the moving-statistics update.
    """

    @staticmethod
    def forward(ctx, x, w1, g1, b1, w2, g2, b2, eps1, eps2, batch_stats):
        dt = x.dtype
        x = x.contiguous()
        f32 = dict(dtype=torch.float32)
        g1f, b1f, g2f, b2f = (t.detach().to(**f32).contiguous() for t in (g1, b1, g2, b2))
        m = x.numel() // x.shape[-1]

        y1, pm1, pv1 = K.conv3x3(x, w1.detach().to(dt), stats=True)
        mean1, var1, rstd1, sc1, sh1 = _stat_vectors(pm1, pv1, g1f, b1f, m, eps1)
        y2, pm2, pv2 = K.conv3x3(y1, w2.detach().to(dt), in_scale=sc1, in_shift=sh1, stats=True)
        mean2, var2, rstd2, sc2, sh2 = _stat_vectors(pm2, pv2, g2f, b2f, m, eps2)
        out = K.bn_relu_apply(y2, sc2, sh2)

        ctx.param_dtypes = (g1.dtype, b1.dtype, g2.dtype, b2.dtype)
        batch_stats.update(mean1=mean1, var1=var1, mean2=mean2, var2=var2)
        # x, raw y1, raw y2; the rest are the layer's own parameters and per-channel vectors
        ctx.save_for_backward(x, y1, y2, w1, w2, g1f, g2f, mean1, rstd1, sc1, sh1, mean2, rstd2,
                              sc2, sh2)  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, dout):
        (x, y1, y2, w1, w2, g1f, g2f, mean1, rstd1, sc1, sh1, mean2, rstd2, sc2, sh2) = (
            ctx.saved_tensors
        )
        dt = x.dtype
        need = ctx.needs_input_grad
        dout = dout.to(dt).contiguous()
        w2c = w2.detach().to(dt)

        dy2, dg2, db2 = K.bn_relu_backward(dout, y2, sc2, sh2, mean2, rstd2, g2f, dt)
        dw2 = K.conv3x3_wgrad(y1, dy2, in_scale=sc1, in_shift=sh1) if need[4] else None
        dz1 = K.conv3x3_dgrad(dy2, w2c)
        dy1, dg1, db1 = K.bn_relu_backward(dz1, y1, sc1, sh1, mean1, rstd1, g1f, dt)
        dw1 = K.conv3x3_wgrad(x, dy1) if need[1] else None
        dx = K.conv3x3_dgrad(dy1, w1.detach().to(dt)) if need[0] else None

        def keep(grad, i, dtype):  # a gradient in its input's dtype, only where one is asked for
            return grad.to(dtype) if (grad is not None and need[i]) else None

        g1, b1, g2, b2 = ctx.param_dtypes
        return (dx, keep(dw1, 1, w1.dtype), keep(dg1, 2, g1), keep(db1, 3, b1),
                keep(dw2, 4, w2.dtype), keep(dg2, 5, g2), keep(db2, 6, b2), None, None, None)  # fmt: skip


class DoubleConvInferenceFn(torch.autograd.Function):
    """BN folded into the convolutions: ``relu(conv(relu(conv(x, w1) + c1), w2) + c2)``.

    ``forward(x, w1, c1, w2, c2)``: HWIO kernels already scaled by the BN factors, fp32 biases.
    Saves x, the hidden activation and the output (the ReLU masks) for backward.
    """

    @staticmethod
    def forward(ctx, x, w1, c1, w2, c2):
        dt = x.dtype
        x = x.contiguous()
        w1c, w2c = w1.detach().to(dt).contiguous(), w2.detach().to(dt).contiguous()
        c1f, c2f = (c.detach().to(torch.float32).contiguous() for c in (c1, c2))
        h = K.conv3x3(x, w1c, bias=c1f, relu=True)
        out = K.conv3x3(h, w2c, bias=c2f, relu=True)
        ctx.save_for_backward(x, h, out, w1, w2)
        ctx.bias_dtypes = (c1.dtype, c2.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, h, out, w1, w2 = ctx.saved_tensors
        dt = x.dtype
        need = ctx.needs_input_grad
        da2 = torch.where(out > 0, dout.to(dt), 0).contiguous()
        dw2 = K.conv3x3_wgrad(h, da2) if need[3] else None
        dh = K.conv3x3_dgrad(da2, w2.detach().to(dt))
        da1 = torch.where(h > 0, dh, 0).contiguous()
        dw1 = K.conv3x3_wgrad(x, da1) if need[1] else None
        dx = K.conv3x3_dgrad(da1, w1.detach().to(dt)) if need[0] else None
        dc1 = da1.to(torch.float32).sum((0, 1, 2)).to(ctx.bias_dtypes[0]) if need[2] else None
        dc2 = da2.to(torch.float32).sum((0, 1, 2)).to(ctx.bias_dtypes[1]) if need[4] else None
        return (
            dx,
            dw1.to(w1.dtype) if dw1 is not None else None,
            dc1,
            dw2.to(w2.dtype) if dw2 is not None else None,
            dc2,
        )


def _folded(conv, bn):
    """BN with its moving statistics folded into the conv, as differentiable torch ops (fp32):
    ``(kernel * s, beta - moving_mean * s)`` with ``s = gamma / sqrt(moving_variance + eps)``."""
    f32 = torch.float32
    s = bn.gamma.value.to(f32) * torch.rsqrt(bn.moving_variance.value.to(f32) + bn.epsilon)
    return conv.kernel.value.to(f32) * s, bn.beta.value.to(f32) - bn.moving_mean.value.to(f32) * s


def double_conv_inference(layer, x):
    """Inference-mode forward: two conv + bias + ReLU kernels with BN folded in (differentiable)."""
    w1, c1 = _folded(layer.conv1, layer.bn1)
    w2, c2 = _folded(layer.conv2, layer.bn2)
    return DoubleConvInferenceFn.apply(x, w1, c1, w2, c2)


def double_conv_layer_forward(layer, x, training: bool):
    """Run :class:`kunet.layers.DoubleConv` ``layer`` on the NHWC torch tensor ``x`` (fused path)."""
    bn1, bn2 = layer.bn1, layer.bn2
    for bn in (bn1, bn2):
        if bn.center is False or bn.scale is False or getattr(bn, "renorm", False):
            return layer.call_sublayers(
                x, training
            )  # a non-default BN the kernels do not implement
    batch_mode = training and bn1.trainable and bn2.trainable
    frozen = (not training) or (not bn1.trainable and not bn2.trainable)
    if batch_mode:
        stats: dict = {}
        out = DoubleConvTrainFn.apply(
            x,
            layer.conv1.kernel.value,
            bn1.gamma.value,
            bn1.beta.value,
            layer.conv2.kernel.value,
            bn2.gamma.value,
            bn2.beta.value,
            float(bn1.epsilon),
            float(bn2.epsilon),
            stats,
        )
        with torch.no_grad():
            update_moving_statistics(bn1, stats["mean1"], stats["var1"])
            update_moving_statistics(bn2, stats["mean2"], stats["var2"])
        return out
    if frozen:
        return double_conv_inference(layer, x)
    return layer.call_sublayers(x, training)  # one BN frozen, the other not: rare, left to Keras
