"""Triton kernels of the fused DoubleConv (Conv3x3 -> BN -> ReLU, twice) and their launch helpers.

Layout: activations NHWC, viewed as a row-major matrix ``[M, C]`` with ``M = N*H*W``; convolution
kernels HWIO ``[3, 3, Cin, Cout]`` (Keras' layout), contiguous, in the activations' dtype.
Every kernel accumulates in fp32; per-channel statistics are fp32.

Kernels (each used by :mod:`kunet.kernels.autograd`):

``conv3x3_kernel``
    3x3, stride 1, "same" convolution as an implicit GEMM (M x Cout, K = 9*Cin): the 3x3 taps are
    unrolled with ``tl.static_range``, the K loop walks Cin in ``BK`` tiles (masked, so Cin = 1 or 3
    works). Optional prologue ``relu(a*scale + shift)`` on the loaded input tile (BN + ReLU of the
    previous layer, applied while loading; padded border positions stay zero), optional epilogue bias
    + ReLU (inference, BN folded), optional per-tile per-channel statistics (mean, M2) of the fp32
    accumulator (training). Also the data-gradient (dgrad) with the flipped, transposed kernel.
``bn_finalize_kernel``
    Deterministic merge of the per-tile statistics (Chan et al.'s parallel formula, fixed order, no
    atomics) -> batch mean, biased variance, and the folded ``scale = gamma/sqrt(var+eps)``,
    ``shift = beta - mean*scale``.
``bn_relu_apply_kernel``
    ``out = relu(y*scale + shift)``.
``bn_relu_bwd_reduce_kernel`` / ``bn_relu_bwd_dy_kernel``
    Backward of ``relu(BN(y))`` with the normalized activation recomputed from the raw ``y``:
    per-tile sums of ``da`` and ``da*xhat`` (-> dbeta, dgamma), then ``dy``.
``conv3x3_wgrad_kernel``
    Weight gradient ``dW[r,s] = sum_m a(m shifted by r,s)^T dy(m)``, with the same optional BN + ReLU
    prologue on ``a`` (so the normalized activation of the first layer is never stored), split over M
    into fp32 partial buffers summed in a fixed order.

No autotuning: the launch configuration is a fixed table (``CONFIGS``), the same one that
``python -m kunet.kernels.aot`` compiles for sm_80/sm_90 and checks for register spills.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- launch configurations
# One configuration per kernel: the AOT report (python -m kunet.kernels.aot) checks each of them for
# sm_80 and sm_90 in fp16/bf16/fp32 and fails on any spill.  Measured there (Triton 3.9): BM=128,
# BN=64, BK=32 with 4 warps spilled (DESIGN.md §4); so did 64x64x32 with 4 warps in fp32 (255 regs,
# 32-272 stack bytes).  64x64x32 with 8 warps: 128-220 registers, no spill, on both targets.
CONFIGS = {
    "conv3x3": {"BM": 64, "BN": 64, "BK": 32, "num_warps": 8, "num_stages": 2},
    "wgrad": {"BM": 32, "BCI": 32, "BCO": 64, "num_warps": 4, "num_stages": 2},
    "finalize": {"BT": 32, "BC": 64, "num_warps": 4, "num_stages": 1},
    "elementwise": {"BM": 32, "BC": 64, "num_warps": 4, "num_stages": 1},
}
# Rows of M reduced by one wgrad program (rounded to a multiple of the wgrad BM): the weight gradient
# is split over cdiv(M, WGRAD_ROWS_PER_SPLIT) programs per (tap, Cin tile, Cout tile), each writing
# its own fp32 partial dW; the partials are summed afterwards in a fixed order (no atomics).
WGRAD_ROWS_PER_SPLIT = 4096


# ----------------------------------------------------------------------------- kernels
@triton.jit
def conv3x3_kernel(
    x_ptr,  # [M, C_IN] activations (NHWC)
    w_ptr,  # [3, 3, C_IN, C_OUT] kernel (HWIO), same dtype as x
    y_ptr,  # [M, C_OUT] output
    in_scale_ptr,  # [C_IN] fp32, prologue relu(x*scale+shift)  (PRO_BN_RELU)
    in_shift_ptr,  # [C_IN] fp32
    bias_ptr,  # [C_OUT] fp32 (HAS_BIAS)
    part_mean_ptr,  # [T, C_OUT] fp32 per-tile mean (STATS), T = cdiv(M, BM)
    part_m2_ptr,  # [T, C_OUT] fp32 per-tile sum of squared deviations (STATS)
    N,
    H,
    W,
    C_IN,
    C_OUT,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRO_BN_RELU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU_OUT: tl.constexpr,
    STATS: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * H * W
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < C_OUT
    ow = offs_m % W
    oh = (offs_m // W) % H
    ob = offs_m // (W * H)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r in tl.static_range(3):
        for s in tl.static_range(3):
            ih = oh + (r - 1)
            iw = ow + (s - 1)
            tap_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row = ((ob * H + ih) * W + iw) * C_IN
            for k0 in range(0, C_IN, BK):
                kk = k0 + offs_k
                k_ok = kk < C_IN
                a_mask = tap_ok[:, None] & k_ok[None, :]
                a = tl.load(x_ptr + row[:, None] + kk[None, :], mask=a_mask, other=0.0)
                if PRO_BN_RELU:
                    sc = tl.load(in_scale_ptr + kk, mask=k_ok, other=0.0)
                    sh = tl.load(in_shift_ptr + kk, mask=k_ok, other=0.0)
                    t = tl.maximum(a.to(tl.float32) * sc[None, :] + sh[None, :], 0.0)
                    # zero padding is applied to the *normalized* activation: keep borders at 0
                    a = tl.where(a_mask, t, 0.0).to(x_ptr.dtype.element_ty)
                w_rows = ((r * 3 + s) * C_IN + kk) * C_OUT
                b = tl.load(
                    w_ptr + w_rows[:, None] + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0,
                )
                if IEEE:  # noqa: SIM108  (a constexpr branch, resolved at compile time)
                    acc = tl.dot(a, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0)
        acc = acc + bias[None, :]
    if RELU_OUT:
        acc = tl.maximum(acc, 0.0)
    out_mask = m_ok[:, None] & n_ok[None, :]
    y_offs = offs_m[:, None] * C_OUT + offs_n[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    if STATS:
        count = tl.minimum(M - pid_m * BM, BM).to(tl.float32)
        mean = tl.sum(tl.where(out_mask, acc, 0.0), axis=0) / count
        dev = tl.where(out_mask, acc - mean[None, :], 0.0)
        m2 = tl.sum(dev * dev, axis=0)
        p_offs = pid_m * C_OUT + offs_n
        tl.store(part_mean_ptr + p_offs, mean, mask=n_ok)
        tl.store(part_m2_ptr + p_offs, m2, mask=n_ok)


@triton.jit
def bn_finalize_kernel(
    part_mean_ptr,  # [T, C] fp32
    part_m2_ptr,  # [T, C] fp32
    gamma_ptr,  # [C] fp32
    beta_ptr,  # [C] fp32
    mean_ptr,  # [C] fp32 out: batch mean
    var_ptr,  # [C] fp32 out: biased batch variance
    scale_ptr,  # [C] fp32 out: gamma / sqrt(var + eps)
    shift_ptr,  # [C] fp32 out: beta - mean * scale
    T,
    M,
    C,
    eps,
    TILE_M: tl.constexpr,  # rows per statistics tile (the conv's BM); every tile but the last is full
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_c = pid * BC + tl.arange(0, BC)
    c_ok = offs_c < C
    run_mean = tl.zeros((BC,), dtype=tl.float32)
    run_m2 = tl.zeros((BC,), dtype=tl.float32)
    for t0 in range(0, T, BT):
        tt = t0 + tl.arange(0, BT)
        t_ok = tt < T
        cnt = tl.where(t_ok, tl.minimum(M - tt * TILE_M, TILE_M), 0).to(tl.float32)
        mask = t_ok[:, None] & c_ok[None, :]
        offs = tt.to(tl.int64)[:, None] * C + offs_c[None, :]
        pm = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
        pm2 = tl.load(part_m2_ptr + offs, mask=mask, other=0.0)
        # this chunk of BT tiles, merged exactly: n_b, mean_b, M2_b
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt[:, None] * pm, axis=0) / n_b
        d = tl.where(mask, pm - mean_b[None, :], 0.0)
        m2_b = tl.sum(pm2 + cnt[:, None] * d * d, axis=0)
        # Chan's pairwise merge into the running statistics (all earlier tiles are full)
        n_a = tl.cast(t0 * TILE_M, tl.float32)
        n = n_a + n_b
        delta = mean_b - run_mean
        run_mean = run_mean + delta * (n_b / n)
        run_m2 = run_m2 + m2_b + delta * delta * (n_a * n_b / n)
    var = run_m2 / tl.cast(M, tl.float32)
    gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0)
    beta = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0)
    scale = gamma / tl.sqrt(var + eps)
    shift = beta - run_mean * scale
    tl.store(mean_ptr + offs_c, run_mean, mask=c_ok)
    tl.store(var_ptr + offs_c, var, mask=c_ok)
    tl.store(scale_ptr + offs_c, scale, mask=c_ok)
    tl.store(shift_ptr + offs_c, shift, mask=c_ok)


@triton.jit
def bn_relu_apply_kernel(
    y_ptr, out_ptr, scale_ptr, shift_ptr, M, C, BM: tl.constexpr, BC: tl.constexpr
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = offs_c < C
    mask = (offs_m < M)[:, None] & c_ok[None, :]
    offs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    out = tl.maximum(y * sc[None, :] + sh[None, :], 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_relu_bwd_reduce_kernel(
    g_ptr,  # [M, C] gradient w.r.t. relu(y*scale+shift)
    y_ptr,  # [M, C] raw conv output
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    part_da_ptr,  # [T, C] fp32 out: per-tile sum(da)
    part_dax_ptr,  # [T, C] fp32 out: per-tile sum(da * xhat)
    M,
    C,
    BM: tl.constexpr,
    BC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = offs_c < C
    mask = (offs_m < M)[:, None] & c_ok[None, :]
    offs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    mu = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    rstd = tl.load(rstd_ptr + offs_c, mask=c_ok, other=0.0)
    da = tl.where(mask & (y * sc[None, :] + sh[None, :] > 0.0), g, 0.0)
    xhat = (y - mu[None, :]) * rstd[None, :]
    p_offs = pid_m * C + offs_c
    tl.store(part_da_ptr + p_offs, tl.sum(da, axis=0), mask=c_ok)
    tl.store(part_dax_ptr + p_offs, tl.sum(da * xhat, axis=0), mask=c_ok)


@triton.jit
def bn_relu_bwd_dy_kernel(
    g_ptr,
    y_ptr,
    dy_ptr,  # [M, C] out: gradient w.r.t. the raw conv output y
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    k1_ptr,  # gamma * rstd
    k2_ptr,  # sum(da) / M
    k3_ptr,  # sum(da * xhat) / M
    M,
    C,
    BM: tl.constexpr,
    BC: tl.constexpr,
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = offs_c < C
    mask = (offs_m < M)[:, None] & c_ok[None, :]
    offs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0)
    sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0)
    mu = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    rstd = tl.load(rstd_ptr + offs_c, mask=c_ok, other=0.0)
    k1 = tl.load(k1_ptr + offs_c, mask=c_ok, other=0.0)
    k2 = tl.load(k2_ptr + offs_c, mask=c_ok, other=0.0)
    k3 = tl.load(k3_ptr + offs_c, mask=c_ok, other=0.0)
    da = tl.where(y * sc[None, :] + sh[None, :] > 0.0, g, 0.0)
    xhat = (y - mu[None, :]) * rstd[None, :]
    dy = k1[None, :] * (da - k2[None, :] - xhat * k3[None, :])
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv3x3_wgrad_kernel(
    x_ptr,  # [M, C_IN] input of the convolution (raw y of the previous layer if PRO_BN_RELU)
    dy_ptr,  # [M, C_OUT] gradient w.r.t. the convolution's output
    dw_part_ptr,  # [SPLITS, 3, 3, C_IN, C_OUT] fp32 out
    in_scale_ptr,
    in_shift_ptr,
    N,
    H,
    W,
    C_IN,
    C_OUT,
    ROWS_PER_SPLIT,
    BM: tl.constexpr,
    BCI: tl.constexpr,
    BCO: tl.constexpr,
    PRO_BN_RELU: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid0 = tl.program_id(0)  # tap * n_ci_tiles + ci tile
    pid_co = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_ci = tl.cdiv(C_IN, BCI)
    tap = pid0 // n_ci
    r = tap // 3
    s = tap % 3
    offs_ci = (pid0 % n_ci) * BCI + tl.arange(0, BCI)
    offs_co = pid_co * BCO + tl.arange(0, BCO)
    ci_ok = offs_ci < C_IN
    co_ok = offs_co < C_OUT
    if PRO_BN_RELU:
        sc = tl.load(in_scale_ptr + offs_ci, mask=ci_ok, other=0.0)
        sh = tl.load(in_shift_ptr + offs_ci, mask=ci_ok, other=0.0)
    M = N * H * W
    m_begin = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(m_begin + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BCI, BCO), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BM):
        offs_m = m0 + tl.arange(0, BM)
        m_ok = offs_m < m_end
        ow = offs_m % W
        oh = (offs_m // W) % H
        ob = offs_m // (W * H)
        ih = oh + (r - 1)
        iw = ow + (s - 1)
        tap_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        row = ((ob * H + ih) * W + iw).to(tl.int64) * C_IN
        a_mask = tap_ok[:, None] & ci_ok[None, :]
        a = tl.load(x_ptr + row[:, None] + offs_ci[None, :], mask=a_mask, other=0.0)
        if PRO_BN_RELU:
            t = tl.maximum(a.to(tl.float32) * sc[None, :] + sh[None, :], 0.0)
            a = tl.where(a_mask, t, 0.0).to(x_ptr.dtype.element_ty)
        g = tl.load(
            dy_ptr + offs_m.to(tl.int64)[:, None] * C_OUT + offs_co[None, :],
            mask=m_ok[:, None] & co_ok[None, :],
            other=0.0,
        )
        if IEEE:
            acc = tl.dot(tl.trans(a), g, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), g, acc)
    out = ((pid_s * 9 + tap) * C_IN + offs_ci).to(tl.int64)[:, None] * C_OUT + offs_co[None, :]
    tl.store(dw_part_ptr + out, acc, mask=ci_ok[:, None] & co_ok[None, :])


# ----------------------------------------------------------------------------- launch helpers
def _ieee(x) -> bool:
    """fp32 inputs: exact fp32 products in the interpreter / on CPU, TF32 tensor cores on GPU."""
    import torch

    return x.dtype == torch.float32 and x.device.type != "cuda"


def conv3x3(
    x, w, *, in_scale=None, in_shift=None, bias=None, relu=False, stats=False, out_dtype=None
):
    """3x3 "same" conv of NHWC ``x`` with HWIO ``w`` (same dtype), fused prologue/epilogue.

    Returns ``y`` (NHWC, ``out_dtype`` or x's dtype) and, with ``stats=True``, the per-tile
    ``(part_mean, part_m2)`` fp32 buffers of shape ``[cdiv(M, BM), Cout]``.
    """
    import torch

    n, h, wd, c_in = x.shape
    c_out = w.shape[-1]
    assert w.shape == (3, 3, c_in, c_out) and w.dtype == x.dtype, (w.shape, w.dtype, x.dtype)
    if max(x.numel(), x.numel() // c_in * c_out) >= 2**31:
        raise ValueError(
            f"fused DoubleConv: {tuple(x.shape)} -> {c_out} channels has more than 2**31 elements "
            "per tensor (the conv kernel indexes with int32); split the batch"
        )
    x = x.contiguous()
    w = w.contiguous()
    cfg = CONFIGS["conv3x3"]
    m = n * h * wd
    y = torch.empty((n, h, wd, c_out), device=x.device, dtype=out_dtype or x.dtype)
    grid = (triton.cdiv(m, cfg["BM"]), triton.cdiv(c_out, cfg["BN"]))
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    if stats:
        part_mean = torch.empty((grid[0], c_out), device=x.device, dtype=torch.float32)
        part_m2 = torch.empty_like(part_mean)
    else:
        part_mean = part_m2 = dummy
    pro = in_scale is not None
    conv3x3_kernel[grid](
        x, w, y,
        in_scale if pro else dummy, in_shift if pro else dummy,
        bias if bias is not None else dummy,
        part_mean, part_m2,
        n, h, wd, c_in, c_out,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
        PRO_BN_RELU=pro, HAS_BIAS=bias is not None, RELU_OUT=relu, STATS=stats,
        IEEE=_ieee(x),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return (y, part_mean, part_m2) if stats else y


def bn_finalize(part_mean, part_m2, gamma, beta, m, eps):
    """Merge per-tile statistics -> (mean, biased var, scale, shift), all fp32 ``[C]``."""
    import torch

    t, c = part_mean.shape
    cfg = CONFIGS["finalize"]
    out = [torch.empty(c, device=part_mean.device, dtype=torch.float32) for _ in range(4)]
    bn_finalize_kernel[(triton.cdiv(c, cfg["BC"]),)](
        part_mean, part_m2, gamma, beta, *out, t, m, c, float(eps),
        TILE_M=CONFIGS["conv3x3"]["BM"], BT=cfg["BT"], BC=cfg["BC"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out


def _ew_grid(m, c):
    cfg = CONFIGS["elementwise"]
    return (triton.cdiv(m, cfg["BM"]), triton.cdiv(c, cfg["BC"])), cfg


def bn_relu_apply(y, scale, shift):
    """``relu(y*scale + shift)`` in y's dtype."""
    import torch

    c = y.shape[-1]
    m = y.numel() // c
    out = torch.empty_like(y)
    grid, cfg = _ew_grid(m, c)
    bn_relu_apply_kernel[grid](
        y, out, scale, shift, m, c, BM=cfg["BM"], BC=cfg["BC"], num_warps=cfg["num_warps"]
    )
    return out


def bn_relu_backward(g, y, scale, shift, mean, rstd, gamma, out_dtype):
    """Backward of ``relu(BN_train(y))`` -> (dy, dgamma, dbeta); the normalized y is recomputed."""
    import torch

    c = y.shape[-1]
    m = y.numel() // c
    g = g.contiguous()
    grid, cfg = _ew_grid(m, c)
    part_da = torch.empty((grid[0], c), device=y.device, dtype=torch.float32)
    part_dax = torch.empty_like(part_da)
    bn_relu_bwd_reduce_kernel[grid](
        g, y, scale, shift, mean, rstd, part_da, part_dax, m, c,
        BM=cfg["BM"], BC=cfg["BC"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    # fixed-shape column sums: deterministic (no atomics) on CPU and CUDA
    dbeta = part_da.sum(0)
    dgamma = part_dax.sum(0)
    k1 = (gamma * rstd).contiguous()
    k2 = (dbeta / m).contiguous()
    k3 = (dgamma / m).contiguous()
    dy = torch.empty(y.shape, device=y.device, dtype=out_dtype)
    bn_relu_bwd_dy_kernel[grid](
        g, y, dy, scale, shift, mean, rstd, k1, k2, k3, m, c,
        BM=cfg["BM"], BC=cfg["BC"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return dy, dgamma, dbeta


def conv3x3_wgrad(x, dy, *, in_scale=None, in_shift=None):
    """Weight gradient of :func:`conv3x3` -> fp32 HWIO ``[3, 3, Cin, Cout]``."""
    import torch

    n, h, wd, c_in = x.shape
    c_out = dy.shape[-1]
    assert x.dtype == dy.dtype
    m = n * h * wd
    cfg = CONFIGS["wgrad"]
    rows = max(cfg["BM"], WGRAD_ROWS_PER_SPLIT // cfg["BM"] * cfg["BM"])
    splits = triton.cdiv(m, rows)
    part = torch.empty((splits, 3, 3, c_in, c_out), device=x.device, dtype=torch.float32)
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    pro = in_scale is not None
    grid = (9 * triton.cdiv(c_in, cfg["BCI"]), triton.cdiv(c_out, cfg["BCO"]), splits)
    conv3x3_wgrad_kernel[grid](
        x.contiguous(), dy.contiguous(), part,
        in_scale if pro else dummy, in_shift if pro else dummy,
        n, h, wd, c_in, c_out, rows,
        BM=cfg["BM"], BCI=cfg["BCI"], BCO=cfg["BCO"], PRO_BN_RELU=pro, IEEE=_ieee(x),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return part.sum(0) if splits > 1 else part[0]


def conv3x3_dgrad(dy, w):
    """Input gradient of :func:`conv3x3`: a 3x3 conv of ``dy`` with the flipped, transposed kernel."""
    w_t = w.flip(0, 1).transpose(2, 3).contiguous()
    return conv3x3(dy, w_t)
