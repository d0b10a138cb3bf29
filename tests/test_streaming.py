"""Datasets larger than memory: folders streamed from disk, and whole-slide tiled prediction.

* A streamed folder gives the same plan, the same batches, the same errors and notes and the same
  trained weights as the same folder held in memory.
* Training on a folder whose decoded size is several times a memory cap stays under the cap
  (measured in a subprocess), where holding the folder in memory does not.
* ``predict_tiled`` reads a memmap image tile by tile and writes into a memmap output row by row:
  the same probabilities as in memory, in memory bounded by a band of tiles.
* A file damaged while a streamed run trains stops it with the error naming the file, leaving the
  run folder consistent and resumable.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import kunet
from kunet import _failpoints, data
from kunet import plan as kplan
from kunet.inference import predict_tiled, tile_starts, window
from kunet.io import DataError, Guesses
from kunet.run_folder import RunFolder
from kunet.train import train

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


# ---------------------------------------------------------------------------------- folders
def _shapes(h, w, rng, classes):
    """A mask of a few disks (labels 1..classes-1) and a smooth image with them brighter."""
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), "uint8")
    for c in range(1, classes):
        for _ in range(2):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 9)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
    image = 40 + 30 * yy / h + 20 * xx / w + 60 * mask + rng.normal(0, 5, (h, w))
    return image.clip(0, 255).astype("uint8"), mask


def make_folder(root, sizes=((40, 48), (70, 33), (64, 64), (50, 90), (33, 40)), classes=3, seed=0):
    """images/ + masks/ of different sizes; binary masks as 0/255 PNGs, else class indices."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (h, w) in enumerate(sizes):
        image, mask = _shapes(h, w, rng, classes)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask * 255 if classes == 2 else mask).save(root / "masks" / f"im{i}.png")
    return root / "images", root / "masks"


def _both(images, masks, **kwargs):
    """The folder loaded in memory and streamed, with their guesses."""
    out = []
    for stream in (False, True):
        guesses = Guesses()
        loaded = data.load_folder(images, masks, stream=stream, guesses=guesses, **kwargs)
        assert loaded.streamed is stream
        out.append((loaded, guesses.lines()))
    return out


def _same_batches(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert xa.dtype == xb.dtype and ya.dtype == yb.dtype
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


# ---------------------------------------------------------------------------------- (a) equal
def test_a_streamed_folder_gives_the_plan_batches_and_notes_of_one_in_memory(tmp_path):
    images, masks = make_folder(tmp_path)
    Image.open(images / "im1.png").convert("RGBA").save(images / "im1.png")  # notes: alpha, RGB
    (held, held_notes), (streamed, streamed_notes) = _both(
        images, masks, normalization=None, fingerprint=True
    )
    assert streamed_notes == held_notes and len(held_notes) == 3, held_notes
    assert (streamed.num_classes, streamed.channels) == (held.num_classes, held.channels) == (3, 3)
    assert [s.shape for s in streamed.samples] == [s.shape for s in held.samples]
    assert streamed.decoded_bytes == held.decoded_bytes
    assert streamed.statistics is not None  # gathered while the folder was checked
    assert kplan.fingerprint(streamed) == kplan.fingerprint(held)
    fixed = kplan.make_plan(kplan.fingerprint(held))["settings"]
    for loaded in (held, streamed):
        loaded.normalize(fixed["normalization"], fixed["intensity_range"])
    for a, b in zip(held.samples, streamed.samples, strict=True):
        for x, y in zip(a.load(), b.load(), strict=True):
            np.testing.assert_array_equal(x, y)

    def datasets(loaded):
        train_samples, val_samples = data.split(loaded.samples, 0.4, seed=3)
        patches = data.PatchDataset(
            train_samples, 3, patch_size=24, batch_size=3, patches_per_epoch=10, seed=3,
            augment=kunet.augment.Augment.level("heavy"), foreground=0.5,
        )  # fmt: skip
        return patches, data.TileDataset(val_samples, 3, patch_size=24, batch_size=4)

    (patches, tiles), (streamed_patches, streamed_tiles) = datasets(held), datasets(streamed)
    assert streamed_patches.prefetch == 2 and patches.prefetch == 0  # decoding runs ahead
    for _ in range(3):  # each epoch draws new patches; the same ones either way
        _same_batches(patches, streamed_patches)
        patches.on_epoch_end()
        streamed_patches.on_epoch_end()
    _same_batches(tiles, streamed_tiles)


def test_streamed_volumes_give_the_batches_of_volumes_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    for kind in ("images", "masks"):
        (tmp_path / kind).mkdir()
    for i, shape in enumerate([(12, 14, 16), (10, 20, 9), (16, 16, 16)]):
        mask = np.zeros(shape, "uint8")
        mask[2:6, 3:9, 2:5] = 1 + i % 2
        np.save(tmp_path / "images" / f"v{i}.npy", (100 * mask + rng.normal(50, 9, shape)))
        np.save(tmp_path / "masks" / f"v{i}.npy", mask)
    (held, _), (streamed, _) = _both(tmp_path / "images", tmp_path / "masks", volumes=True)
    assert streamed.spatial_dims == held.spatial_dims == 3
    assert kplan.fingerprint(streamed) == kplan.fingerprint(held)
    for loaded in (held, streamed):
        loaded.patches = data.PatchDataset(
            loaded.samples, 3, patch_size=8, batch_size=2, patches_per_epoch=6, foreground=0.5
        )
        loaded.tiles = data.TileDataset(loaded.samples, 3, patch_size=8, batch_size=3)
    _same_batches(held.patches, streamed.patches)
    _same_batches(held.tiles, streamed.tiles)


def test_stream_auto_holds_the_folder_in_memory_only_when_it_fits(tmp_path, monkeypatch):
    images, masks = make_folder(tmp_path, classes=2)
    size = data.load_folder(images, masks, stream=False).decoded_bytes
    monkeypatch.setenv("KUNET_MEMORY_BUDGET", str(size))
    assert not data.load_folder(images, masks).streamed  # "auto" is the default
    monkeypatch.setenv("KUNET_MEMORY_BUDGET", str(size - 1))
    assert data.load_folder(images, masks).streamed
    train_ds, val_ds = data.folder_datasets(images, masks, patch_size=16, val_split=0.4)
    assert train_ds.streamed and val_ds.streamed
    with pytest.raises(ValueError, match="stream"):
        data.load_folder(images, masks, stream="yes")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("size", "im2.png is 30x20 (WxH) but its image"),
        ("garbage", "im2.png: cannot read image"),
        ("truncated", "im2.png: cannot read image"),
        ("label", "masks/im2.png has label 3 but num_classes is 3"),
        ("nan", "im2.tif holds 1 NaN/inf value(s)"),
    ],
)
def test_a_streamed_folder_refuses_bad_input_with_the_same_error(tmp_path, damage, message):
    images, masks = make_folder(tmp_path)
    if damage == "size":
        Image.fromarray(np.zeros((20, 30), "uint8")).save(masks / "im2.png")
    elif damage == "garbage":
        (images / "im2.png").write_bytes(b"not a png at all")
    elif damage == "truncated":  # a header that reads, pixels that do not
        raw = (images / "im2.png").read_bytes()
        (images / "im2.png").write_bytes(raw[: len(raw) // 2])
    elif damage == "label":
        Image.fromarray(np.full((64, 64), 3, "uint8")).save(masks / "im2.png")
    else:
        image = np.asarray(Image.open(images / "im2.png")).astype("float32")
        image[5, 5] = np.nan
        Image.fromarray(image).save(images / "im2.tif")
        (images / "im2.png").unlink()
    errors = []
    for stream in (False, True):
        with pytest.raises(DataError) as info:
            data.load_folder(images, masks, num_classes=3, stream=stream)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and message in errors[1], errors


def test_strict_refuses_the_same_guess_streamed(tmp_path):
    images, masks = make_folder(tmp_path, classes=2)
    errors = []
    for stream in (False, True):
        with pytest.raises(DataError) as info:
            data.load_folder(images, masks, guesses=Guesses(strict=True), stream=stream)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "refused under --strict" in errors[0]


def test_the_decoded_cache_is_bounded_in_bytes():
    cache = data.DecodedCache(max_bytes=100)
    reads = []

    def reader(key, size):
        def read():
            reads.append(key)
            return key * 2, size

        return read

    assert cache.get("a", reader("a", 60)) == "aa" and cache.get("a", reader("a", 60)) == "aa"
    cache.get("b", reader("b", 60))  # over the budget: "a", the least recently used, goes
    assert len(cache) == 1 and cache.nbytes == 60
    cache.get("c", reader("c", 500))  # larger than the budget: still kept, alone
    assert len(cache) == 1 and cache.nbytes == 500
    cache.get("d", reader("d", 10), keep=False)
    assert reads == ["a", "b", "c", "d"] and len(cache) == 1


def _tiny_run(data_root, out, stream, **kwargs):
    return train(
        data_root / "images", data_root / "masks", out, epochs=2, patch_size=32, batch_size=4,
        filters=[4, 8], val_split=0.4, seed=1, verbose=0, stream=stream, **kwargs,
    )  # fmt: skip


def _weights(path):
    return [np.asarray(w) for w in kunet.predict.load_model(path).get_weights()]


def test_a_streamed_run_trains_the_weights_of_an_in_memory_run(tmp_path):
    images, _ = make_folder(tmp_path / "data", classes=2)
    held = _tiny_run(images.parent, tmp_path / "held", stream=False)
    streamed = _tiny_run(images.parent, tmp_path / "streamed", stream=True)
    assert held["best_val_dice"] == pytest.approx(streamed["best_val_dice"], abs=1e-6)
    for a, b in zip(
        _weights(tmp_path / "held" / "last.keras"),
        _weights(tmp_path / "streamed" / "last.keras"),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    plans = [json.loads((tmp_path / r / "plan.json").read_text()) for r in ("held", "streamed")]
    assert plans[0] == plans[1]
    scores = [
        kunet.predict.evaluate(tmp_path / "streamed" / "best.keras", images, images.parent / "masks",
                               stream=stream)
        for stream in (False, True)
    ]  # fmt: skip
    assert scores[0] == scores[1]


# ---------------------------------------------------------------------------------- (d) damage
def test_a_file_damaged_while_a_streamed_run_trains_is_named(tmp_path):
    """The folder is checked, then the image is truncated (after the run's first commit, before
    its first batch): the run stops with the error naming the file, the run folder is consistent
    and resumes once the file is back."""
    images, _ = make_folder(tmp_path / "data", classes=2)
    victim = images / "im3.png"
    good = victim.read_bytes()
    out = tmp_path / "run"

    def damage(name):
        if name == "commit:done" and victim.read_bytes() == good:
            victim.write_bytes(good[: len(good) // 2])

    previous = _failpoints.set_hook(damage)
    try:
        with pytest.raises(DataError) as info:
            _tiny_run(images.parent, out, stream=True, settings={"val_split": 0.0})
    finally:
        _failpoints.set_hook(previous)
    message = str(info.value)
    assert message.startswith(f"{victim}: cannot read image") and "\n" not in message, message
    run = RunFolder(out)
    assert run.problems() == [] and run.read_state()["epoch"] == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # lock released
    victim.write_bytes(good)
    summary = _tiny_run(images.parent, out, stream=True, resume=True)
    assert summary["epochs"] == 2 and RunFolder(out).problems() == []


# ---------------------------------------------------------------------------------- (b) memory
_MEMORY_CHILD = r"""
import json, sys, time
from pathlib import Path


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return status("VmRSS")


import kunet  # noqa: E402
from kunet import data  # noqa: E402
from kunet.train import train  # noqa: E402

big, tiny, measure_in_memory = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
settings = {"tta": False, "min_component_size": {}, "val_split": 0.01, "patches_per_epoch": 8}
args = dict(epochs=1, patch_size=128, batch_size=4, filters=[4, 8], verbose=0, stream=True,
            settings=settings)
for i in range(2):  # the framework's own costs: build, compile, train, save, predict a model
    train(tiny / "images", tiny / "masks", tiny / f"warm{i}", **args)
baseline = reset_peak()
began = time.monotonic()
summary = train(big / "images", big / "masks", big / "run", **args)
result = {"baseline": baseline, "streamed": status("VmHWM") - baseline,
          "seconds": time.monotonic() - began, "time": summary["time"]}
if measure_in_memory:
    baseline = reset_peak()
    held = data.load_folder(big / "images", big / "masks", stream=False)
    result["in_memory"] = status("VmHWM") - baseline
print("RESULT " + json.dumps(result))
"""


def _big_folder(root, n, side, seed=0):
    """``n`` images of ``side`` x ``side``: smooth (cheap PNGs), each a shifted copy of one
    pattern of disks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.ogrid[:side, :side]
    disks = np.zeros((side, side), bool)
    for _ in range(30):
        cy, cx, r = rng.uniform(0, side, 2).tolist() + [rng.uniform(10, 40)]
        disks |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    ramp = 40 + 30 * yy / side + 20 * xx / side
    for i in range(n):
        mask = np.roll(disks, tuple(rng.integers(0, side, 2)), axis=(0, 1))
        image = (ramp + (80 + i % 50) * mask).astype("uint8")
        Image.fromarray(image).save(root / "images" / f"im{i:03d}.png", compress_level=1)
        Image.fromarray(mask.astype("uint8") * 255).save(
            root / "masks" / f"im{i:03d}.png", compress_level=1
        )
    return root


CAP = 300 * MiB


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_training_on_a_folder_several_times_the_memory_cap_stays_under_it(tmp_path):
    """110 images of 1280x1280: 1.34 GiB decoded (float32 images, int32 masks), 4.6x the cap.

    The child process trains on a tiny folder twice first (imports, a model built, compiled,
    trained, saved and used for prediction: what every run costs, whatever its data; JAX keeps
    some tens of MB per model it compiled), then resets its peak RSS (VmHWM) and trains on the
    big folder, streamed: checking and planning it, training steps, validation, the tuning of
    inference and the overlays. What the peak grew by must stay under the cap. Holding the same
    folder in memory (measured under torch: the data does not depend on the backend) exceeds it.
    """
    big = _big_folder(tmp_path / "big", 110, 1280)
    tiny = _big_folder(tmp_path / "tiny", 4, 128)
    decoded = data.load_folder(big / "images", big / "masks", stream=True).decoded_bytes
    assert decoded > 4 * CAP  # the in-memory path holds this much: the test can fail
    measure_in_memory = keras.backend.backend() == "torch"
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, big, tiny, "1" if measure_in_memory else "0"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    print(
        f"{keras.backend.backend()}: decoded {decoded / MiB:.0f} MiB, cap {CAP / MiB:.0f} MiB; "
        f"streamed run: peak +{result['streamed'] / MiB:.0f} MiB over {result['baseline'] / MiB:.0f}"
        f" MiB in {result['seconds']:.1f} s {result['time']}"
        + (f"; in memory: +{result['in_memory'] / MiB:.0f} MiB" if measure_in_memory else "")
    )
    assert result["streamed"] < CAP
    if measure_in_memory:
        assert result["in_memory"] > CAP


# ---------------------------------------------------------------------------------- (c) tiles
class _Pointwise:
    """A stand-in 2D or 3D model: a fixed non-linear map of each pixel's channels to 2 logits."""

    def __init__(self, spatial_dims=2, channels=1):
        self.spatial_dims = spatial_dims
        self.w = np.linspace(-1.5, 2.0, 2 * channels).reshape(channels, 2).astype("float32")

    def predict_on_batch(self, x):
        return np.tanh(x @ self.w) * 3.0 + np.float32(0.25)


def _reference(model, image, tile, overlap, tta=False):
    """Blending as it was: every tile added into full-size float32 accumulators."""
    from kunet.inference import _activation, _mirror_up, _run

    given = image.shape[:-1]
    sides = tuple(max(n, t) for n, t in zip(given, tile, strict=True))
    image = _mirror_up(image, sides)  # an image smaller than a tile: mirrored up to it
    starts = [
        tile_starts(n, t, max(1, int(round(t * (1 - overlap)))))
        for n, t in zip(sides, tile, strict=True)
    ]
    weights = window(tile)[..., None]
    out, norm = np.zeros((*sides, 2), "float32"), np.zeros((*sides, 1), "float32")
    for corner in itertools.product(*starts):
        where = tuple(slice(c, c + t) for c, t in zip(corner, tile, strict=True))
        pred = _run(model, image[where][None], _activation(model, "softmax"), tta)[0]
        out[where] += pred * weights
        norm[where] += weights
    return (out / norm)[tuple(slice(0, n) for n in given)]


@pytest.mark.parametrize(
    "shape, tile, overlap, batch",
    [
        ((150, 97, 2), (32, 24), 0.5, 3),
        ((61, 200, 1), (40, 40), 0.3, 5),
        ((17, 13, 9, 1), (8, 6, 4), 0.5, 4),
        ((20, 90, 1), (32, 32), 0.5, 2),
    ],
)
def test_predict_tiled_into_a_memmap_equals_predicting_in_memory(
    tmp_path, shape, tile, overlap, batch
):
    dims = len(shape) - 1
    model = _Pointwise(dims, shape[-1])
    image = np.random.default_rng(0).normal(size=shape).astype("float32")
    np.save(tmp_path / "image.npy", image)
    mapped = np.load(tmp_path / "image.npy", mmap_mode="r")
    args = dict(tile_size=tile, overlap=overlap, batch_size=batch, activation="softmax")
    held = predict_tiled(model, image, **args)
    to_path = predict_tiled(model, mapped, out=tmp_path / "probs.npy", **args)
    given = np.lib.format.open_memmap(tmp_path / "given.npy", "w+", "float32", (*shape[:-1], 2))
    assert predict_tiled(model, mapped, out=given, **args) is given
    assert isinstance(to_path, np.memmap) and to_path.shape == held.shape == (*shape[:-1], 2)
    reference = _reference(model, image, tile, overlap)
    for result in (held, to_path, given, np.load(tmp_path / "probs.npy")):
        np.testing.assert_allclose(result, reference, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="out must be a writable float array of shape"):
        predict_tiled(model, mapped, out=np.zeros((3, 3, 2), "float32"), **args)


def test_predict_tiled_reads_a_memmap_lazily_with_the_nan_policy(tmp_path):
    image = np.random.default_rng(1).normal(size=(90, 70)).astype("float32")  # (H, W): 1 channel
    image[40, 30] = np.nan
    np.save(tmp_path / "image.npy", image)
    mapped = np.load(tmp_path / "image.npy", mmap_mode="r")
    model = _Pointwise()
    with pytest.raises(ValueError, match="1 NaN/inf value"):
        predict_tiled(model, mapped, tile_size=32)
    zero = predict_tiled(model, mapped, tile_size=32, nan_policy="zero", out=tmp_path / "z.npy")
    np.testing.assert_array_equal(
        zero, predict_tiled(model, image, tile_size=32, nan_policy="zero")
    )
    as_uint8 = np.lib.format.open_memmap(tmp_path / "u8.npy", "w+", "uint8", (40, 50, 1))
    as_uint8[:] = 7
    np.testing.assert_array_equal(  # converted to float32 tile by tile
        predict_tiled(model, as_uint8, tile_size=16),
        predict_tiled(model, np.full((40, 50), 7.0), tile_size=16),
    )


_TILED_CHILD = r"""
import json, sys
import numpy as np


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


import kunet  # noqa: E402
from kunet.inference import predict_tiled  # noqa: E402


class Pointwise:
    spatial_dims = 2

    def predict_on_batch(self, x):
        return np.concatenate([x, 1.0 - x], axis=-1)


image = np.load(sys.argv[1], mmap_mode="r")
predict_tiled(Pointwise(), np.zeros((300, 300, 1), "float32"), tile_size=256)  # warm
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
baseline = status("VmRSS")
probs = predict_tiled(Pointwise(), image, tile_size=256, batch_size=8, activation="softmax",
                      out=sys.argv[2])
print("RESULT " + json.dumps({"peak": status("VmHWM") - baseline}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_predict_tiled_into_a_memmap_holds_a_band_not_the_image(tmp_path):
    """An 8000 x 4000 image (122 MiB as float32) whose 2-class probability map is 244 MiB: read
    from and written to memmaps, the peak RSS grows by less than a quarter of the map (what it
    holds is a band of tiles across the width: it does not grow with the height)."""
    h, w = 8000, 4000
    image = np.lib.format.open_memmap(tmp_path / "image.npy", "w+", "float32", (h, w, 1))
    for i in range(0, h, 500):
        image[i : i + 500] = np.random.default_rng(i).random((min(500, h - i), w, 1))
    image.flush()
    del image
    proc = subprocess.run(
        [sys.executable, "-c", _TILED_CHILD, tmp_path / "image.npy", tmp_path / "probs.npy"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    peak = json.loads(lines[-1][len("RESULT ") :])["peak"]
    full_map = h * w * 2 * 4
    print(
        f"predict_tiled into a memmap: peak +{peak / MiB:.0f} MiB; the map is {full_map / MiB:.0f} MiB"
    )
    assert peak < full_map / 4
    image = np.load(tmp_path / "image.npy", mmap_mode="r")
    probs = np.load(tmp_path / "probs.npy", mmap_mode="r")
    for rows in (slice(0, 7), slice(3990, 4010), slice(h - 5, h)):  # a pointwise model: exact
        e = np.exp(image[rows] - (1.0 - image[rows]))
        np.testing.assert_allclose(probs[rows, :, :1], e / (1 + e), atol=1e-6)
