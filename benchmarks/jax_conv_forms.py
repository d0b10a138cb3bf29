"""The UNet's 3x3 convolutions in JAX: XLA's convolution vs matrix-product formulations.

    python benchmarks/jax_conv_forms.py [xla im2col shift9 winograd]

XLA:CPU's convolutions are what hold kunet's JAX backend below the PyTorch reference
(benchmarks/README.md). This script tries writing them as matrix products instead: im2col (one
product over 9x-expanded patches), 9 shifted products, and Winograd F(2x2, 3x3) (16 batched products
between input and output transforms); backward passes by autodiff. Prints, per conv shape of the
UNet 16-128 at 128x128, batch 8, the forward and forward + backward ms (medians of 7) and the
relative error vs XLA's convolution, then the totals. None beat XLA's own (see the README's table).
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SHAPES = [  # (H, Cin, Cout) at batch 8, the UNet 16-128 at 128x128
    (128, 3, 16),
    (128, 16, 16),
    (64, 16, 32),
    (64, 32, 32),
    (32, 32, 64),
    (32, 64, 64),
    (16, 64, 128),
    (16, 128, 128),
    (8, 128, 256),
    (8, 256, 256),
    (16, 256, 128),
    (32, 128, 64),
    (64, 64, 32),
    (128, 32, 16),
]
N = 8


def conv_xla(x, w):
    return lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_im2col(x, w):
    n, h, ww, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate(
        [xp[:, r : r + h, s : s + ww, :] for r in range(3) for s in range(3)], axis=-1
    )
    return jnp.einsum("nhwk,ko->nhwo", cols, w.reshape(9 * c, -1))


def conv_shift(x, w):
    n, h, ww, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = 0
    for r in range(3):
        for s in range(3):
            out = out + jnp.einsum("nhwc,co->nhwo", xp[:, r : r + h, s : s + ww, :], w[r, s])
    return out


_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def conv_winograd(x, w):
    n, h, ww, c = x.shape
    o = w.shape[-1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    th, tw = h // 2, ww // 2
    # d[i][j]: [n, th, tw, c] = xp[:, 2a+i, 2b+j]
    d = [[xp[:, i : i + 2 * th : 2, j : j + 2 * tw : 2, :] for j in range(4)] for i in range(4)]
    # rows: B^T d
    t = [
        [sum(_BT[i, k] * d[k][j] for k in range(4) if _BT[i, k] != 0) for j in range(4)]
        for i in range(4)
    ]
    v = [
        [sum(_BT[j, k] * t[i][k] for k in range(4) if _BT[j, k] != 0) for j in range(4)]
        for i in range(4)
    ]
    v = jnp.stack([v[i][j] for i in range(4) for j in range(4)], 0).reshape(16, -1, c)
    u = jnp.einsum("ir,rsco,js->ijco", _G, w, _G).reshape(16, c, o)
    m = jnp.einsum("ktc,kco->kto", v, u).reshape(4, 4, n, th, tw, o)
    t2 = [
        [sum(_AT[i, k] * m[k, j] for k in range(4) if _AT[i, k] != 0) for j in range(4)]
        for i in range(2)
    ]
    y = [
        [sum(_AT[j, k] * t2[i][k] for k in range(4) if _AT[j, k] != 0) for j in range(2)]
        for i in range(2)
    ]
    y = jnp.stack([jnp.stack(y[i], 3) for i in range(2)], 2)  # n, th, 2, tw, 2, o
    return y.reshape(n, h, ww, o)


IMPLS = {"xla": conv_xla, "im2col": conv_im2col, "shift9": conv_shift, "winograd": conv_winograd}


def bench(f, *args, reps=7):
    out = f(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def main():
    names = sys.argv[1:] or list(IMPLS)
    rng = np.random.default_rng(0)
    tot = {k: [0.0, 0.0] for k in names}
    for h, ci, co in SHAPES:
        x = jnp.asarray(rng.standard_normal((N, h, h, ci), np.float32))
        w = jnp.asarray(rng.standard_normal((3, 3, ci, co), np.float32) * 0.1)
        ref = conv_xla(x, w)
        row = f"{h:4d} {ci:4d}->{co:4d}"
        for k in names:
            f = IMPLS[k]
            err = float(jnp.max(jnp.abs(f(x, w) - ref)) / jnp.max(jnp.abs(ref)))
            fwd = jax.jit(f)
            g = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
            a, b = bench(fwd, x, w), bench(g, x, w)
            tot[k][0] += a
            tot[k][1] += b
            row += f" | {k} {a:6.2f} {b:7.2f} e{err:.0e}"
        print(row, flush=True)
    for k in names:
        print(f"TOTAL {k}: fwd {tot[k][0]:.1f} ms, fwd+bwd {tot[k][1]:.1f} ms")


if __name__ == "__main__":
    main()
