"""The UNet's 3x3 convolutions alone, per framework: the floor each backend's convolutions set.

    python benchmarks/conv_profile.py [--size 128] [--batch 8] [--filters 16 32 64 128]

Times every 3x3 convolution of the benchmark UNet (encoder, bottleneck, decoder; batch 8, 128x128 by
default) forward, and forward + backward (input and kernel gradients from a dense upstream gradient
in the framework's own layout, as a training step has; the forward's output is kept), in JAX
(``lax.conv``, what Keras runs), PyTorch (``F.conv2d`` channels_last, oneDNN) and TensorFlow
(``tf.nn.conv2d``, oneDNN), each framework in its own subprocess. Prints per-framework sums in ms per batch and the ratio to
PyTorch. The convolutions are most of a UNet training step, so a framework whose convolutions are
slower here cannot match the reference end to end, whatever the model code does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FRAMEWORKS = ("torch", "tensorflow", "jax")


def conv_shapes(filters, size):
    """(H, C_in, C_out) of every 3x3 convolution of kunet.UNet(filters) on size x size x 3 input."""
    shapes, c, h = [], 3, size
    for f in filters:
        shapes += [(h, c, f), (h, f, f)]
        c, h = f, h // 2
    shapes += [(h, c, 2 * c), (h, 2 * c, 2 * c)]
    for f in reversed(filters):
        h *= 2
        shapes += [(h, 2 * f, f), (h, f, f)]
    return shapes


def _timer(run, reps):
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _time_jax(x, w, g, reps):
    import jax
    from jax import lax

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    x, w, g = (jax.numpy.asarray(a) for a in (x, w, g))
    forward = jax.jit(conv)

    @jax.jit
    def grads(x, w):
        y, vjp = jax.vjp(conv, x, w)
        return y, vjp(g)

    fwd = _timer(lambda: forward(x, w).block_until_ready(), reps)
    return fwd, _timer(lambda: jax.block_until_ready(grads(x, w)), reps)


def _time_torch(x, w, g, reps):
    import torch
    import torch.nn.functional as F

    def channels_last(a, *axes):
        return torch.from_numpy(a).permute(*axes).contiguous(memory_format=torch.channels_last)

    x, g = channels_last(x, 0, 3, 1, 2), channels_last(g, 0, 3, 1, 2)
    w = channels_last(w, 3, 2, 0, 1)
    x.requires_grad_(True)
    w.requires_grad_(True)

    def train():
        x.grad = w.grad = None
        F.conv2d(x, w, padding=1).backward(g)

    with torch.no_grad():
        fwd = _timer(lambda: F.conv2d(x, w, padding=1), reps)
    return fwd, _timer(train, reps)


def _time_tensorflow(x, w, g, reps):
    import tensorflow as tf

    x, w, g = tf.constant(x), tf.Variable(w), tf.constant(g)

    @tf.function
    def infer():
        return tf.nn.conv2d(x, w, 1, "SAME")

    @tf.function
    def train():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.conv2d(x, w, 1, "SAME")
        # y is returned too: the gradients do not read it, and grappler would prune the forward
        return y, tape.gradient(y, [x, w], output_gradients=g)

    # a tf.function call on the CPU returns once its outputs are computed: no copy to NumPy timed
    fwd = _timer(infer, reps)
    return fwd, _timer(train, reps)


def _measure(framework, shapes, batch, reps):
    import numpy as np

    time_conv = {"jax": _time_jax, "torch": _time_torch, "tensorflow": _time_tensorflow}[framework]
    rng = np.random.default_rng(0)
    fwd_total = bwd_total = 0.0
    for h, cin, cout in shapes:
        x = rng.random((batch, h, h, cin), dtype="float32")
        w = (0.1 * rng.random((3, 3, cin, cout))).astype("float32")
        # a dense upstream gradient in the activations' layout, as in a training step (the
        # gradient of a sum is a broadcast constant, which PyTorch passes as a stride-0 tensor
        # and then runs its backward in NCHW)
        g = rng.normal(size=(batch, h, h, cout)).astype("float32")
        fwd, bwd = time_conv(x, w, g, reps)
        fwd_total += fwd
        bwd_total += bwd
    return {"forward_ms": fwd_total, "forward_backward_ms": bwd_total}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = conv_shapes(args.filters, args.size)
    if args.worker:
        print(json.dumps(_measure(args.worker, shapes, args.batch, args.reps)))
        return None
    results = {}
    for framework in FRAMEWORKS:
        # TensorFlow with its oneDNN kernels, as kunet sets them up (kunet/__init__.py)
        env = {"TF_ENABLE_ONEDNN_OPTS": "1", **os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        out = subprocess.run(
            [sys.executable, __file__, "--worker", framework, "--size", str(args.size)]
            + ["--batch", str(args.batch), "--reps", str(args.reps), "--filters"]
            + [str(f) for f in args.filters],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        results[framework] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["torch"]
    print(
        f"{len(shapes)} 3x3 convolutions of UNet {args.filters}, {args.size}x{args.size}, "
        f"batch {args.batch} (medians of {args.reps}); ms per batch, ratio to PyTorch"
    )
    print(f"{'framework':<11} {'forward':>9} {'ratio':>6} {'fwd+bwd':>9} {'ratio':>6}")
    for framework, r in results.items():
        print(
            f"{framework:<11} {r['forward_ms']:9.1f} {r['forward_ms'] / base['forward_ms']:6.2f} "
            f"{r['forward_backward_ms']:9.1f} "
            f"{r['forward_backward_ms'] / base['forward_backward_ms']:6.2f}"
        )
    return results


if __name__ == "__main__":
    main()
