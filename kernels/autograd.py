"""torch.autograd.Function s around the fused DoubleConv kernels: tensors in, tensors out.

* :class:`DoubleConvTrainFn` (training, batch statistics): conv1 with batch statistics in its
  epilogue, a deterministic finalize, conv2 with BN1 + ReLU applied in its prologue and statistics
  in its epilogue, finalize, BN2 + ReLU.  Saved for backward: x, the raw conv outputs y1 and y2, and
  per-channel vectors only; the normalized activations are recomputed.  The batch statistics
  (biased variance) are handed back for the caller's moving-statistics update.
* :class:`DoubleConvInferenceFn` (BN folded into the convolutions by the caller): conv + bias +
  ReLU twice; its backward gives gradients to x, the kernels and biases (and so, through the
  caller's differentiable folding, to gamma and beta: fine-tuning with frozen BN).

The Keras-facing side (which layer runs this, BN folding, the moving statistics) is
:mod:`kunet.backends.triton`.  Activations may be fp32, fp16 or bf16; weights stay fp32; statistics
and accumulation are fp32; the output has x's dtype.
"""

from __future__ import annotations

import torch
from kunet.kernels import double_conv as K


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
