"""Inference time of an exported kunet model in onnxruntime (and a SavedModel in TensorFlow) against
``model.predict`` / a direct call under the active backend, alternating, medians.

    KERAS_BACKEND=torch python benchmarks/export.py [--size 256] [--batch 4] [--rounds 7]

Prints the conditions (backend, threads, input) and, per runner, the median seconds per batch and
its ratio to ``predict``. The model is the default 4-level UNet with filters (16, 32, 64, 128).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

import kunet  # before keras: sets TensorFlow's oneDNN default as users get it

# isort: split
import keras

from kunet import export as kexport


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--formats", default="onnx,tf_saved_model")
    args = p.parse_args()

    model = kunet.UNet(num_classes=2, filters=(16, 32, 64, 128), input_shape=(None, None, 3))
    x = np.random.default_rng(0).random((args.batch, args.size, args.size, 3)).astype("float32")
    runners = {
        "predict": lambda: model.predict(x, verbose=0, batch_size=args.batch),
        "call": lambda: keras.ops.convert_to_numpy(model(x, training=False)),
    }
    work = tempfile.mkdtemp(prefix="kunet-export-bench-")
    for fmt in args.formats.split(","):
        path = os.path.join(work, "m.onnx" if fmt == "onnx" else "m_savedmodel")
        kexport.export(model, path, fmt, verify=True, verbose=False)
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            runners["onnxruntime"] = lambda s=session, n=name: s.run(None, {n: x})[0]
        else:
            import tensorflow as tf

            loaded = tf.saved_model.load(path)
            runners["tf SavedModel"] = lambda f=loaded.serve: f(tf.constant(x)).numpy()
    for run in runners.values():  # warm up (tracing, compilation, allocator)
        run()
        run()
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(
        f"backend {keras.backend.backend()}, input {args.batch}x{args.size}x{args.size}x3, "
        f"filters (16, 32, 64, 128), {args.rounds} alternating rounds, medians; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus {os.cpu_count()}"
    )
    base = statistics.median(times["predict"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:14s} {med * 1000:8.1f} ms/batch   predict/this x{base / med:5.2f}")


if __name__ == "__main__":
    main()
