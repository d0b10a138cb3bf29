"""Training throughput of data-parallel ``fit`` on 2 CPU devices against 1, on JAX and TensorFlow.

    python benchmarks/data_parallel.py [--backends jax tensorflow] [--rounds 5] [--steps 8]
                                       [--size 96] [--batch 8] [--json FILE]

Each backend runs in its own process (its devices are fixed when it starts): the CPU is split into
2 devices (:func:`kunet.distribute.configure_cpu_devices`), one UNet trains on device 0 alone and a
twin (same seed) under :func:`kunet.distribute.data_parallel` (JAX: DataParallel; TensorFlow:
MirroredStrategy with synchronized BatchNorm), with the same global batch. Rounds alternate the two,
so both see the same machine load; figures are medians of images per second over rounds, of
``fit`` epochs of ``--steps`` steps after a warm-up epoch (compilation). The conditions (cores,
thread pools, XLA flags) are printed with the figures.

On a CPU the two devices share the machine's cores (XLA:CPU and TensorFlow each run one thread pool
for all their devices), so expect no gain on a few cores: the split pays where each device has its
own compute (GPUs), which this script does not measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def conditions(backend):
    """What the figures depend on: cores, thread pools, flags, versions."""
    import keras

    info = {
        "backend": backend,
        "keras": keras.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", ""),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if backend == "jax":
        import jax

        info["jax"] = jax.__version__
        info["jax_num_cpu_devices"] = jax.config.jax_num_cpu_devices
        info["devices"] = [str(d) for d in jax.devices()]
    else:
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
        info["intra_op_threads"] = tf.config.threading.get_intra_op_parallelism_threads()
        info["inter_op_threads"] = tf.config.threading.get_inter_op_parallelism_threads()
        info["devices"] = [d.name for d in tf.config.list_logical_devices("CPU")]
    return info


def worker(args):
    """In the backend's own process: alternate rounds of 1 device and 2, print JSON."""
    import kunet  # before keras: TensorFlow's oneDNN default as users get it

    # isort: split
    import contextlib

    import keras
    import numpy as np

    from kunet import distribute

    distribute.configure_cpu_devices(2)
    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    x = rng.random((n, args.size, args.size, 1)).astype("float32")
    y = (x[..., 0] > 0.5).astype("float32")
    filters = tuple(args.filters)

    def make(parallel):
        scope = parallel.scope() if parallel else contextlib.nullcontext()
        with scope:
            keras.utils.set_random_seed(0)
            model = kunet.UNet(num_classes=1, filters=filters, input_shape=(None, None, 1))
            model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)  # warm-up: compile
        return model

    plans = {"1": None, "2": distribute.data_parallel(2)}
    if backend == "tensorflow":  # what synchronizing costs: the same without it
        plans["2 per-replica BN"] = distribute.data_parallel(2, sync_batchnorm=False)
    models = {name: make(plan) for name, plan in plans.items()}
    runs = {name: [] for name in plans}
    for _ in range(args.rounds):
        for name, model in models.items():
            scope = plans[name].scope() if plans[name] else contextlib.nullcontext()
            with scope:
                start = time.perf_counter()
                model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False)
                runs[name].append(n / (time.perf_counter() - start))
    result = {
        "conditions": conditions(backend),
        "describe": plans["2"].describe(),
        "images_per_s": {k: statistics.median(v) for k, v in runs.items()},
        "rounds": {k: [round(r, 2) for r in v] for k, v in runs.items()},
    }
    print(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow"],
                        choices=["jax", "tensorflow"])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed epoch")
    parser.add_argument("--size", type=int, default=96, help="image side")
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over devices)")
    parser.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
    results = {}
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", *forwarded], env=env, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        if proc.returncode:
            sys.exit(f"{backend} failed:\n{proc.stderr[-3000:]}")
        r = results[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
        c, speed = r["conditions"], r["images_per_s"]
        print(
            f"{backend:10s} 1 device {speed['1']:6.1f} img/s   2 devices {speed['2']:6.1f} img/s "
            f"(x{speed['2'] / speed['1']:.2f})   {r['describe']}",
            flush=True,
        )
        for name in [k for k in speed if k not in ("1", "2")]:
            print(f"{'':10s} {name}: {speed[name]:.1f} img/s (x{speed[name] / speed['1']:.2f})")
        threads = (f", TF threads intra {c['intra_op_threads']} inter {c['inter_op_threads']} "
                   "(0: TensorFlow's default)" if backend == "tensorflow" else "")  # fmt: skip
        print(
            f"{'':10s} {c['cores']} cores ({c['usable_cores']} usable, load {c['load_average']:.1f})"
            f"{threads}, XLA_FLAGS={c['XLA_FLAGS']!r}"
            + (f", jax_num_cpu_devices={c['jax_num_cpu_devices']}" if backend == "jax" else "")
            + f"; UNet filters {args.filters}, "
            f"{args.size}x{args.size}x1, global batch {args.batch}, medians of {args.rounds} "
            f"rounds of {args.steps} steps",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
