"""Training and inference throughput of each UNet-family variant, against its plain Keras twin.

    KERAS_BACKEND=torch python benchmarks/variants.py [--rounds 3] [--size 96] [--size3d 32] [--json]

For each variant (the presets' architectures at small filters, so a 2-core CPU finishes), the same
model runs with kunet's implementations as chosen by :mod:`kunet.dispatch` ("kunet") and with
every layer type forced to its Keras reference ("keras": the plain Keras twin, same weights, same
graph). Rounds alternate the two, so both see the same machine load; figures are medians over rounds:
images (volumes) per second of ``model.fit`` steps (Adam, the default loss) and of ``predict``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import numpy as np

import kunet  # before keras: sets TensorFlow's oneDNN default as users get it

# isort: split
import keras

from kunet import dispatch

VARIANTS = {  # name -> UNet arguments
    "unet": {},
    "residual-unet": {"block": "residual"},
    "attention-unet": {"attention": True},
    "unet++": {"skips": "nested", "deep_supervision": True},
    "unet-deep-supervision": {"deep_supervision": True},
    "unet3d": {"spatial_dims": 3},
    "residual-unet3d": {"spatial_dims": 3, "block": "residual", "deep_supervision": True},
}


@contextlib.contextmanager
def plain_keras():
    """Every dispatched layer type on its Keras reference."""
    with contextlib.ExitStack() as stack:
        for kind in list(dispatch._registry):
            stack.enter_context(dispatch.use(kind, dispatch.REFERENCE))
        yield


def measure(config, size, batch, steps, filters):
    keras.utils.set_random_seed(0)
    dims = config.get("spatial_dims", 2)
    model = kunet.UNet(num_classes=1, filters=filters, input_shape=(None,) * dims + (1,), **config)
    rng = np.random.default_rng(0)
    x = rng.random((batch * steps, *(size,) * dims, 1)).astype("float32")
    y = (x[..., 0] > 0.5).astype("float32")
    model.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, verbose=0)  # warm-up, compile
    model.predict(x[:batch], batch_size=batch, verbose=0)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    train = len(x) / (time.perf_counter() - start)
    start = time.perf_counter()
    model.predict(x, batch_size=batch, verbose=0)
    infer = len(x) / (time.perf_counter() - start)
    return train, infer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=96, help="2D image side")
    parser.add_argument("--size3d", type=int, default=32, help="3D volume side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    names = args.only or list(VARIANTS)
    results = {}
    for name in names:
        config = VARIANTS[name]
        three_d = config.get("spatial_dims") == 3
        size = args.size3d if three_d else args.size
        filters = (8, 16, 32) if three_d else (16, 32, 64, 128)
        runs = {"kunet": [], "keras": []}
        for _ in range(args.rounds):
            for label in ("kunet", "keras"):
                scope = plain_keras() if label == "keras" else contextlib.nullcontext()
                with scope:
                    runs[label].append(measure(config, size, args.batch, args.steps, filters))
        row = {}
        for label, values in runs.items():
            row[label] = [statistics.median(v[i] for v in values) for i in (0, 1)]
        row["ratio"] = [row["kunet"][i] / row["keras"][i] for i in (0, 1)]
        results[name] = row
        unit = "vol/s" if three_d else "img/s"
        print(
            f"{name:22s} train {row['kunet'][0]:7.1f} vs {row['keras'][0]:7.1f} {unit} "
            f"(x{row['ratio'][0]:.2f})   infer {row['kunet'][1]:7.1f} vs {row['keras'][1]:7.1f} "
            f"(x{row['ratio'][1]:.2f})",
            flush=True,
        )
    if args.json:
        print(json.dumps({"backend": keras.backend.backend(), "results": results}))


if __name__ == "__main__":
    main()
