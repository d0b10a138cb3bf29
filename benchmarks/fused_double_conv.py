"""Fused Triton DoubleConv vs plain Keras DoubleConv vs torch.nn (cuDNN) Conv-BN-ReLU x2.

    python benchmarks/fused_double_conv.py [--rounds 7] [--iters 10] [--quick]

On CUDA: forward, backward and full (forward + backward) time, training mode, fp16 and bf16, at
several UNet stage shapes; medians over rounds in which the three implementations alternate (so
clock and thermal drift hit all of them alike); ratios against the plain Keras layer and cuDNN; and
the bytes each keeps alive for backward.

Without CUDA it cannot time anything: it says so and prints the saved-bytes figures only, with the
fused side run in Triton's interpreter (CPU).  ``--cpu-smoke`` runs the timing code itself once on a
tiny fp32 shape through the interpreter (the figures mean nothing; it checks the script runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

# UNet stages (N, H, W, Cin, Cout): encoder 1-4 and the bottleneck of the paper's UNet at 256x256
SHAPES = [
    (8, 256, 256, 3, 64),
    (8, 128, 128, 64, 128),
    (8, 64, 64, 128, 256),
    (8, 32, 32, 256, 512),
    (8, 16, 16, 512, 1024),
]
QUICK_SHAPES = [(4, 128, 128, 32, 64), (4, 64, 64, 128, 128)]
# saved-bytes figures: a UNet-like shape the CPU interpreter handles in seconds
MEMORY_SHAPE = dict(n=2, h=64, w=64, c_in=32, c_out=64)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _memory_report(dtypes):
    import saved_memory as memory  # benchmarks/saved_memory.py (this folder is on sys.path)

    print("bytes saved for backward (training mode), fused vs the torch-eager plain path vs the")
    print("Keras sublayers (plain):")
    print(f"{'shape':24s} {'dtype':15s} {'fused':>12s} {'eager':>12s} {'plain':>12s} "
          f"{'fused/eager':>12s} {'fused/plain':>12s}")  # fmt: skip
    for dtype in dtypes:
        f = memory.compare(**MEMORY_SHAPE, dtype=dtype)
        print(f"{f['shape']:24s} {f['dtype']:15s} {f['fused']:12,d} {f['eager']:12,d} "
              f"{f['plain']:12,d} {f['ratio_eager']:12.2f} {f['ratio']:12.2f}")  # fmt: skip


def _layers(shape, policy, device):
    import keras
    import torch

    from kunet.layers import DoubleConv

    n, h, w, cin, cout = shape
    keras.utils.set_random_seed(0)
    fused = DoubleConv(cout, fused=True, dtype=policy)
    plain = DoubleConv(cout, fused=False, dtype=policy)
    for layer in (fused, plain):
        layer.build((None, None, None, cin))
    plain.set_weights(fused.get_weights())
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
        torch.nn.ReLU(inplace=True),
    ).to(device=device, memory_format=torch.channels_last)  # fmt: skip
    return fused, plain, ref


def _timers(shape, torch_dtype, layers, device):
    """Callables per implementation: forward, full (forward + backward)."""
    import torch

    fused, plain, ref = layers
    n, h, w, cin, cout = shape
    x = torch.randn(n, h, w, cin, device=device, dtype=torch_dtype, requires_grad=True)
    g = torch.randn(n, h, w, cout, device=device, dtype=torch_dtype)
    x_nchw = x.detach().permute(0, 3, 1, 2).requires_grad_()  # channels_last view, no copy
    g_nchw = g.permute(0, 3, 1, 2)

    def keras_impl(layer):
        params = [v.value for v in layer.trainable_weights]

        def fwd():
            return layer(x, training=True)

        def full():
            for p in params:
                p.grad = None
            x.grad = None
            fwd().backward(g)

        return fwd, full

    def torch_impl():
        def fwd():
            if torch_dtype == torch.float32:
                autocast = contextlib.nullcontext()
            else:
                autocast = torch.autocast(device, dtype=torch_dtype)
            with autocast:
                return ref(x_nchw)

        def full():
            ref.zero_grad(set_to_none=True)
            x_nchw.grad = None
            fwd().backward(g_nchw)

        return fwd, full

    return {"fused": keras_impl(fused), "plain": keras_impl(plain), "cudnn": torch_impl()}


def _ms(fn, iters, device):
    import torch

    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _bench(shapes, dtypes, rounds, iters, device="cuda"):
    import torch

    policies = {
        "float16": ("mixed_float16", torch.float16),
        "bfloat16": ("mixed_bfloat16", torch.bfloat16),
        "float32": (None, torch.float32),
    }
    head = f"{'shape':26s} {'dtype':9s} {'impl':6s} {'fwd ms':>8s} {'bwd ms':>8s} {'full ms':>8s}"
    print(head + f" {'full/plain':>10s} {'full/cudnn':>10s}")
    for shape in shapes:
        for dtype in dtypes:
            policy, torch_dtype = policies[dtype]
            timers = _timers(shape, torch_dtype, _layers(shape, policy, device), device)
            for _fwd, full in timers.values():  # warm-up: Triton JIT, cuDNN algorithm search
                for _ in range(3):
                    full()
            if device == "cuda":
                torch.cuda.synchronize()
            times = {name: {"fwd": [], "full": []} for name in timers}
            for _ in range(rounds):
                for name, (fwd, full) in timers.items():  # alternate implementations each round
                    times[name]["fwd"].append(_ms(fwd, iters, device))
                    times[name]["full"].append(_ms(full, iters, device))
            med = {k: {p: statistics.median(v) for p, v in t.items()} for k, t in times.items()}
            label = "N={} {}x{} {}->{}".format(*shape)
            for name, m in med.items():
                print(f"{label:26s} {dtype:9s} {name:6s} {m['fwd']:8.3f} {m['full'] - m['fwd']:8.3f} "
                      f"{m['full']:8.3f} {m['full'] / med['plain']['full']:10.2f} "
                      f"{m['full'] / med['cudnn']['full']:10.2f}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="two small shapes")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run the timing code on CPU (interpreter), tiny fp32",
    )
    args = parser.parse_args(argv)
    if os.environ["KERAS_BACKEND"] != "torch":
        print(
            f"the fused DoubleConv runs on the torch backend; KERAS_BACKEND={os.environ['KERAS_BACKEND']}"
        )
        return 2
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before Keras' torch backend imports triton
        print("CPU smoke run through Triton's interpreter: timings are meaningless here")
        _bench([(1, 8, 8, 3, 16)], ["float32"], rounds=1, iters=1, device="cpu")
        return 0
    if not _cuda_available():
        print(
            "no CUDA device: cannot time the kernels here (GPU speed is unmeasured on this machine)."
        )
        print("Saved-bytes figures, fused side in Triton's interpreter on CPU:\n")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        from kunet.kernels import double_conv as K

        for kernel in ("conv3x3", "elementwise"):  # fewer interpreted programs; same bytes
            K.CONFIGS[kernel] = {**K.CONFIGS[kernel], "BM": 256}
        _memory_report([None, "mixed_float16"])
        return 0
    _bench(QUICK_SHAPES if args.quick else SHAPES, args.dtypes.split(","), args.rounds, args.iters)
    print()
    _memory_report(["mixed_float16", "mixed_bfloat16"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
