"""Training and inference throughput of kunet.UNet vs a plain PyTorch UNet of identical topology.

    KERAS_BACKEND=jax python benchmarks/throughput.py [--size 128] [--batch 8] [--rounds 5] [--json]

kunet runs in this process on the current Keras backend; the reference (benchmarks/reference_unet.py,
channels_last, eager) runs in a worker subprocess. Rounds alternate kunet / reference so both see the
same machine load; the figures are medians over rounds. kunet trains through ``model.fit`` (what users
run) with Adam and binary cross-entropy from logits (the reference's loss), and predicts through
``model.predict``. Peak memory is each process's peak resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Reference:
    """The PyTorch reference UNet in a worker process (never torch and TensorFlow in one process)."""

    def __init__(self, filters, size, batch, channels):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "reference_unet.py"), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = self._ask(
            op="init", filters=list(filters), size=size, batch=batch, channels=channels
        )

    def _ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the reference worker died (is torch installed?)")
        return json.loads(line)

    def train(self, steps):
        return self._ask(op="train", steps=steps)

    def infer(self, steps):
        return self._ask(op="infer", steps=steps)

    def close(self):
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Kunet:
    def __init__(self, filters, size, batch, channels, jit_compile="auto"):
        import kunet  # first, as users import it: it sets TensorFlow's oneDNN default

        import keras  # isort: skip
        import numpy as np  # isort: skip

        keras.utils.set_random_seed(0)
        self.keras = keras
        self.model = kunet.UNet(num_classes=1, filters=filters, input_shape=(size, size, channels))
        self.model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            metrics=[],
            jit_compile=jit_compile,
        )
        self.batch = batch
        rng = np.random.default_rng(0)
        self.x = rng.random((batch, size, size, channels), dtype="float32")
        self.y = (rng.random((batch, size, size, 1)) > 0.5).astype("float32")
        self.jit_compile = self.model.jit_compile
        self.trainable = sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)

    def _data(self, steps):
        import numpy as np

        return np.concatenate([self.x] * steps), np.concatenate([self.y] * steps)

    def train(self, steps):
        x, y = self._data(steps)
        start = time.perf_counter()
        self.model.fit(x, y, batch_size=self.batch, epochs=1, verbose=0, shuffle=False)
        return {"img_s": steps * self.batch / (time.perf_counter() - start)}

    def infer(self, steps):
        x, _ = self._data(steps)
        start = time.perf_counter()
        self.model.predict(x, batch_size=self.batch, verbose=0)
        return {"img_s": steps * self.batch / (time.perf_counter() - start)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jit-compile", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args(argv)
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    filters = tuple(args.filters)

    ref = None if args.no_reference else Reference(filters, args.size, args.batch, args.channels)
    ours = Kunet(filters, args.size, args.batch, args.channels, jit_compile=jit)
    import keras

    backend = keras.backend.backend()
    if ref is not None and ref.info["params"] != ours.trainable:
        raise SystemExit(
            f"topology mismatch: reference {ref.info['params']} vs kunet {ours.trainable} params"
        )
    # warm-up: compilation / tracing / allocator
    ours.train(2)
    ours.infer(2)
    if ref:
        ref.train(2)
        ref.infer(2)

    res = {"kunet_train": [], "kunet_infer": [], "ref_train": [], "ref_infer": []}
    ref_peak = 0.0
    for r in range(args.rounds):
        res["kunet_train"].append(ours.train(args.steps)["img_s"])
        if ref:
            out = ref.train(args.steps)
            res["ref_train"].append(out["img_s"])
        res["kunet_infer"].append(ours.infer(args.steps)["img_s"])
        if ref:
            out = ref.infer(args.steps)
            res["ref_infer"].append(out["img_s"])
            ref_peak = out["peak_rss_mb"]
        if not args.json:
            line = f"round {r + 1}: kunet train {res['kunet_train'][-1]:.2f}"
            if ref:
                line += f" | ref train {res['ref_train'][-1]:.2f}"
            print(line + " img/s", flush=True)
    if ref:
        ref.close()

    med = {k: (statistics.median(v) if v else None) for k, v in res.items()}
    summary = {
        "backend": backend,
        "jit_compile": ours.jit_compile,
        "filters": list(filters),
        "size": args.size,
        "batch": args.batch,
        "rounds": args.rounds,
        "params": ours.trainable,
        "kunet_train_img_s": med["kunet_train"],
        "kunet_infer_img_s": med["kunet_infer"],
        "ref_train_img_s": med["ref_train"],
        "ref_infer_img_s": med["ref_infer"],
        "train_ratio": med["kunet_train"] / med["ref_train"] if ref else None,
        "infer_ratio": med["kunet_infer"] / med["ref_infer"] if ref else None,
        "kunet_peak_rss_mb": _peak_rss_mb(),
        "ref_peak_rss_mb": ref_peak if ref else None,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"\nkunet on {backend} (jit_compile={ours.jit_compile}), filters {list(filters)}, "
            f"{args.size}x{args.size}, batch {args.batch}, medians of {args.rounds} rounds"
        )
        print(f"  train  kunet {med['kunet_train']:7.2f} img/s", end="")
        if ref:
            print(f"  reference {med['ref_train']:7.2f} img/s  ratio {summary['train_ratio']:.2f}")
        else:
            print()
        print(f"  infer  kunet {med['kunet_infer']:7.2f} img/s", end="")
        if ref:
            print(f"  reference {med['ref_infer']:7.2f} img/s  ratio {summary['infer_ratio']:.2f}")
        else:
            print()
        print(f"  peak RSS kunet {summary['kunet_peak_rss_mb']:.0f} MB", end="")
        print(f", reference {ref_peak:.0f} MB" if ref else "")
    return summary


if __name__ == "__main__":
    main()
