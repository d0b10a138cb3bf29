"""The individual kernels against torch, on the paths the small layer shapes do not reach.

Several K tiles (Cin > BK) and Cout tiles (Cout > BN), split-M weight gradients, and a statistics
finalize over more tiles than one chunk (T > BT), with a large mean (numerical stability).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kunet.kernels import double_conv as K


def _ref_conv(x, w):  # NHWC, HWIO
    return F.conv2d(x.permute(0, 3, 1, 2), w.permute(3, 2, 0, 1), padding=1).permute(0, 2, 3, 1)


@pytest.fixture
def wide():
    """Cin 40 > BK, Cout 70 > BN, odd H and W; fp64 references."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 40, generator=g)
    w = torch.randn(3, 3, 40, 70, generator=g) * 0.2
    scale = torch.rand(40, generator=g) + 0.5
    shift = torch.randn(40, generator=g) + 0.5
    return x, w, scale, shift


def _close(a, b, what):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= 1e-5 * (1 + b.abs().max().item()), f"{what}: {err}"


def test_conv_with_prologue_and_statistics(wide):
    x, w, scale, shift = wide
    z = torch.relu(x.double() * scale.double() + shift.double())
    ref = _ref_conv(z, w.double())
    y, part_mean, part_m2 = K.conv3x3(x, w, in_scale=scale, in_shift=shift, stats=True)
    _close(y, ref, "conv output")
    mean, var, sc, sh = K.bn_finalize(part_mean, part_m2, torch.ones(70), torch.zeros(70), 70, 1e-3)
    flat = ref.reshape(-1, 70)
    _close(mean, flat.mean(0), "batch mean")
    _close(var, flat.var(0, unbiased=False), "batch variance")


def test_conv_gradients(wide, monkeypatch):
    x, w, scale, shift = wide
    monkeypatch.setattr(K, "WGRAD_ROWS_PER_SPLIT", 32)  # 70 rows -> 3 splits, summed in order
    dy = torch.randn(2, 5, 7, 70)
    zt = torch.relu(x.double() * scale.double() + shift.double()).requires_grad_()
    wt = w.double().requires_grad_()
    _ref_conv(zt, wt).backward(dy.double())
    _close(K.conv3x3_wgrad(x, dy, in_scale=scale, in_shift=shift), wt.grad, "wgrad with prologue")
    _close(K.conv3x3_dgrad(dy, w), zt.grad, "dgrad")


def test_finalize_merges_many_tiles_stably():
    """T = 71 tiles of BM rows (3 chunks of BT) + a ragged last tile; data with mean 1e3, std 1."""
    bm, c = K.CONFIGS["conv3x3"]["BM"], 5
    m = 70 * bm + 13
    data = 1000.0 + torch.randn(
        m, c, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    tiles = torch.split(data, bm)
    part_mean = torch.stack([t.mean(0) for t in tiles]).float()
    part_m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles]).float()
    gamma, beta = torch.linspace(0.5, 2.0, c), torch.linspace(-1.0, 1.0, c)
    mean, var, scale, shift = K.bn_finalize(part_mean, part_m2, gamma, beta, m, 1e-3)
    np.testing.assert_allclose(mean, data.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, data.var(0, unbiased=False), rtol=1e-4)
    ref_scale = gamma.double() / torch.sqrt(data.var(0, unbiased=False) + 1e-3)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-4)
    np.testing.assert_allclose(
        shift, beta.double() - data.mean(0) * ref_scale, rtol=1e-3, atol=1e-2
    )


def test_aot_report_covers_every_kernel():
    """`python -m kunet.kernels.aot` compiles every @triton.jit kernel of the module, all variants."""
    from kunet.kernels import aot

    jitted = {name for name, obj in vars(K).items() if type(obj).__name__ == "InterpretedFunction"}
    jobs = aot._jobs()
    assert {job[0] for job in jobs} == jitted
    assert {(j[2], j[3]) for j in jobs} == {(d, t) for d in aot.DTYPES for t in aot.TARGETS}
    conv_variants = {j[1].split("[")[0] for j in jobs if j[0] == "conv3x3_kernel"}
    assert conv_variants == set(aot.CONV_VARIANTS) == {"train1", "train2", "infer", "dgrad"}
