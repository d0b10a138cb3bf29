"""Datasets larger than memory: peak memory and speed of a streamed folder against one held in memory,
and of ``predict_tiled`` into a memmap against an in-memory result.

    KERAS_BACKEND=torch python benchmarks/streaming.py [--images 100] [--size 1280] [--steps 20]
                                                        [--slide 8000x6000] [--data DIR] [--json]

A folder of ``--images`` smooth ``--size``-px gray PNGs with binary masks is generated (or ``--data``
reused). Each measurement runs in a fresh process, which first trains twice on a 4-image folder
(imports, a model built, compiled, trained, saved and used: what every run costs, whatever its
data), then resets its peak RSS (``/proc/self/clear_refs``) and measures:

* ``train``: ``kunet.train.train`` on the folder (filters 16-32, 128-px patches, batches of 8,
  ``--steps`` steps, 2% held out, TTA and small-object removal fixed so that the run is short),
  streamed and in memory: the peak RSS above the baseline, the seconds of the data pass (reading,
  checking and planning) and of the training steps, and patches per second of those steps.
* ``patches``: the training batches alone (no model): ``PatchDataset`` over the folder for
  ``--steps`` batches, streamed with 0 and 2 prefetch threads and in memory; patches per second.
* ``predict``: ``predict_tiled`` of a ``--slide`` image (float32 memmap, a pointwise stand-in model
  so that only the tiling is timed) into a memmap (``out=``) and into memory; peak RSS and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20

CHILD = r"""
import json, sys, time
from pathlib import Path


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


import numpy as np  # noqa: E402

import kunet  # noqa: E402
from kunet import data, inference  # noqa: E402
from kunet.train import train  # noqa: E402

what, folder, tiny, steps, arg = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
batch = 8
settings = {"tta": False, "min_component_size": {}, "val_split": 0.02,
            "patches_per_epoch": steps * batch}
args = dict(epochs=1, patch_size=128, batch_size=batch, filters=[16, 32], verbose=0,
            settings=settings)
if what == "train":
    for i in range(2):
        train(tiny / "images", tiny / "masks", tiny / f"warm{what}{arg}{i}", stream=True, **args)
base = reset_peak()
began = time.monotonic()
out = {}
if what == "train":
    summary = train(folder / "images", folder / "masks", folder / f"run-{arg}",
                    stream=arg == "streamed", **args)
    out = {"seconds": time.monotonic() - began, "pass": summary["time"]["data loading"],
           "training": summary["time"]["training"], "steps": summary["steps"]}
elif what == "patches":
    loaded = data.load_folder(folder / "images", folder / "masks", stream=arg != "memory",
                              num_classes=2)
    prefetch = 0 if arg != "prefetch" else 2
    ds = data.PatchDataset(loaded.samples, 2, patch_size=128, batch_size=batch,
                           patches_per_epoch=steps * batch, prefetch=prefetch)
    loading = time.monotonic() - began
    base_batches = reset_peak()
    began = time.monotonic()
    for i in range(len(ds)):
        ds[i]
    out = {"load": loading, "seconds": time.monotonic() - began, "steps": len(ds),
           "batches_peak": status("VmHWM") - base_batches}
else:
    class Pointwise:
        spatial_dims = 2

        def predict_on_batch(self, x):
            return np.concatenate([x, 1.0 - x], axis=-1)

    image = np.load(folder, mmap_mode="r")
    target = tiny if arg == "memmap" else None
    inference.predict_tiled(Pointwise(), np.zeros((300, 300, 1), "float32"), tile_size=256)
    base = reset_peak()
    began = time.monotonic()
    inference.predict_tiled(Pointwise(), image, tile_size=256, batch_size=8,
                            activation="softmax", out=target)
    out = {"seconds": time.monotonic() - began}
out["peak"] = status("VmHWM") - base
print("RESULT " + json.dumps(out))
"""


def make_folder(root, n, side, seed=0):
    """``n`` smooth ``side``-px gray PNGs (shifted copies of one pattern of disks) and masks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    yy, xx = np.ogrid[:side, :side]
    disks = np.zeros((side, side), bool)
    for _ in range(30):
        cy, cx, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(10, 40)
        disks |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    ramp = 40 + 30 * yy / side + 20 * xx / side
    for i in range(n):
        mask = np.roll(disks, tuple(rng.integers(0, side, 2)), axis=(0, 1))
        image = (ramp + (80 + i % 50) * mask + rng.normal(0, 3, (side, side))).clip(0, 255)
        Image.fromarray(image.astype("uint8")).save(root / "images" / f"im{i:04d}.png")
        Image.fromarray(mask.astype("uint8") * 255).save(root / "masks" / f"im{i:04d}.png")
    return root


def run_child(what, folder, tiny, steps, arg):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, what, folder, tiny, str(steps), arg],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{what} {arg} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=1280)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--slide", default="8000x6000", help="HxW of the tiled prediction")
    parser.add_argument("--data", default=None, help="a folder to reuse (images/, masks/)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import keras
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.data) if args.data else make_folder(tmp / "data", args.images, args.size)
        tiny = make_folder(tmp / "tiny", 4, 128)
        n = len(list((folder / "images").iterdir()))
        side = args.size
        decoded = n * side * side * 8
        results = {"backend": keras.backend.backend(), "cpus": os.cpu_count(), "images": n,
                   "size": side, "decoded_mib": decoded / MiB}  # fmt: skip
        for mode in ("streamed", "memory"):
            results[f"train_{mode}"] = run_child("train", folder, tiny, args.steps, mode)
        for mode in ("memory", "streamed", "prefetch"):
            results[f"patches_{mode}"] = run_child("patches", folder, tiny, args.steps, mode)
        h, w = (int(v) for v in args.slide.split("x"))
        image = np.lib.format.open_memmap(tmp / "slide.npy", "w+", "float32", (h, w, 1))
        for i in range(0, h, 500):
            image[i : i + 500] = np.random.default_rng(i).random((min(500, h - i), w, 1))
        image.flush()
        del image
        for mode in ("memmap", "memory"):
            results[f"predict_{mode}"] = run_child(
                "predict", tmp / "slide.npy", tmp / "probs.npy", 0, mode
            )
        results["slide"] = [h, w]
    if args.json:
        print(json.dumps(results))
        return
    r = results
    print(
        f"{r['backend']}, {r['cpus']} CPUs; {n} images of {side}x{side} "
        f"({r['decoded_mib']:.0f} MiB decoded: float32 images + int32 masks)"
    )
    print("train (whole run: pass, steps, validation, inference tuning, overlays)")
    for mode in ("streamed", "memory"):
        t = r[f"train_{mode}"]
        print(
            f"  {mode:9s} peak +{t['peak'] / MiB:6.0f} MiB   pass {t['pass']:5.1f} s   "
            f"{t['steps']} steps {t['training']:5.1f} s ({t['steps'] * 8 / max(t['training'], 1e-9):5.1f}"
            " patches/s)"
        )
    print("training batches alone (no model)")
    for mode, label in (
        ("memory", "memory"),
        ("streamed", "streamed"),
        ("prefetch", "streamed, 2 prefetch threads"),
    ):
        t = r[f"patches_{mode}"]
        print(
            f"  {label:29s} {t['steps'] * 8 / t['seconds']:6.1f} patches/s   "
            f"batches peak +{t['batches_peak'] / MiB:5.0f} MiB   (load_folder {t['load']:.1f} s,"
            f" peak with it +{t['peak'] / MiB:.0f} MiB)"
        )
    full = h * w * 2 * 4
    print(f"predict_tiled {h}x{w}, 2 classes ({full / MiB:.0f} MiB of probabilities)")
    for mode in ("memmap", "memory"):
        t = r[f"predict_{mode}"]
        print(f"  into {mode:7s} peak +{t['peak'] / MiB:6.0f} MiB   {t['seconds']:5.1f} s")


if __name__ == "__main__":
    main()
