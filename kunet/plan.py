"""Self-configuring training: a fingerprint of the dataset, and the plan derived from it.

``kunet plan`` (and ``kunet train`` when given no plan) reads the folder pair once and derives every
setting of the run from what it finds, the way nnU-Net does, instead of asking the user:

==================  ===============================================================================
setting             rule
==================  ===============================================================================
patch_size          the median image side, rounded down to a multiple of 16, within [64, 128] on a
                    CPU ([64, 256] on a GPU)
filters             4 levels of 16-32-64-128 (3 levels for patches under 128 px): the receptive
                    field (~140 px) covers the patch
batch_size          ~74k pixels per batch (8 patches of 96 px, 4 of 128 px), 4 to 16 patches
normalization       ``dataset``: the dataset's 1st-99th percentiles to [0, 1] for every image, when
                    the images' background levels agree (one acquisition); else ``percentile``:
                    each image's own 1st-99th percentiles (``zscore`` by hand: per-image mean/std
                    after clipping to the 0.5-99.5th percentiles)
foreground,         a third of the patches centred on an object, Dice per patch; when a foreground
batch_dice          class covers less than 10% of the pixels, half of them, and the Dice taken over
                    the whole batch (many patches hold no object)
augmentation        flips and 90-degree rotations always; zoom and intensity changes when the run
                    sees each pixel 40+ times (``medium``), elastic deformation from 200 (``heavy``)
learning_rate       Adam 2e-3, cosine decay to 1% of it -- over the time budget when there is one
                    (by elapsed time: it reaches its end as the budget runs out), else over the
                    planned epochs
epochs              with a time budget: ~12 epochs of equal length fill it (from an estimate of
                    this backend's pixel throughput); without one: 40
val_split           10% of the images from 20 images up; under 20 every image trains (one or two
                    held-out images are too noisy to pick a checkpoint by)
tile_size, tta      inference in tiles of twice the patch, Gaussian-blended; the removal of small
min_component_size  objects is measured on the held-out images at the end of training and kept
                    where it raises the Dice; flip TTA (the model trained on flips) is on unless
                    it lowers that Dice by more than 0.005; without held-out images, TTA on and
                    the removal off
==================  ===============================================================================

Volumes (3D: the fingerprint has ``"spatial_dims": 3``) follow the same rules with cubic patches
sized for 3D convolutions, which cost ~3x a 2D one per voxel and filter:

==================  ===============================================================================
patch_size          the median volume's smallest side, rounded down to a multiple of 8, within
                    [16, 48] on a CPU ([16, 128] on a GPU); smaller volumes are mirrored up
filters             3 levels of 8-16-32 under 64 voxels (receptive field ~76 voxels), else 4 levels
                    of 16-32-64-128
batch_size          ~131k voxels per batch (4 patches of 32^3), 2 to 8 patches
tile_size           inference in cubes of twice the patch, at most 128
==================  ===============================================================================

``model`` names a :func:`kunet.presets.names` architecture (``kunet train --model NAME``); set
that way, its own filters replace the plan's unless ``filters`` is set too (a plan file's ``model``
and ``filters`` are taken as written). Null: the plain UNet. ``precision`` (``kunet train
--precision``): ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``, the UNet's ``dtype_policy``
(:data:`PRECISIONS`: mixed precision, float32 variables and head).

A plan is JSON (``plan.json``): ``{"kunet_plan": 1, "settings": {...}, "fingerprint": {...},
"reasons": {...}}``. Every setting can be edited in the file or overridden (``--set NAME=VALUE``);
an unknown setting or a bad value is an error naming it. ``kunet train`` saves the plan it used in
its run folder, and ``kunet predict`` / ``evaluate`` read it next to the model they load.
"""

from __future__ import annotations

import difflib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from kunet import presets
from kunet.io import DataError

PLAN_VERSION = 1
NORMALIZATIONS = ("percentile", "zscore", "dataset")
AUGMENTATIONS = ("none", "light", "medium", "heavy")
SCHEDULES = ("cosine", "constant")
# Training throughput assumed when sizing epochs for a time budget: pixels per second of the
# default UNet (filters 16-128) on a 2-core CPU (benchmarks/README.md); a faster machine simply runs
# more, shorter epochs. On a GPU, ~20x.
PIXELS_PER_SECOND = {"tensorflow": 4.5e5, "torch": 4.0e5, "jax": 2.5e5}
# The same for volumes: voxels per second of the 3D UNet (filters 8-16-32, 32^3 patches) on the
# same 2-core CPU (benchmarks/README.md, "3D volumes").
VOXELS_PER_SECOND = {"tensorflow": 4.5e5, "torch": 4.5e5, "jax": 4.0e4}
VOXELS_PER_BATCH = 131072  # 4 patches of 32^3
MAX_PATCH_3D_CPU, MAX_PATCH_3D_GPU = 48, 128
EPOCHS_PER_BUDGET = 12
DEFAULT_EPOCHS = 40
PIXELS_PER_BATCH = 73728  # 8 patches of 96 px, 4 of 128 px
MAX_PATCH_CPU, MAX_PATCH_GPU = 128, 256
MIN_IMAGES_TO_HOLD_OUT = 20
# Images whose 1st percentiles (background levels) differ by more than this fraction of the
# dataset's intensity range come from different exposures or instruments: each is normalized on
# its own. Otherwise one range serves all, keeping a dim tile dim (per-image stretching turned an
# empty aerial tile's noise into structure and lowered the landcover Dice: benchmarks/README.md).
MAX_BACKGROUND_SHIFT = 0.15


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _fraction(value, upper=1.0):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= upper


def _numbers(values):
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


# kunet train --precision: the UNet's dtype_policy for each name
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
# name -> (check, description of the valid values)
SETTINGS = {
    "patch_size": (lambda v: _positive_int(v) and v >= 16, "an int >= 16"),
    "batch_size": (_positive_int, "an int >= 1"),
    "filters": (
        lambda v: isinstance(v, list) and v != [] and all(_positive_int(f) for f in v),
        "a list of positive ints",
    ),
    "normalization": (lambda v: v in NORMALIZATIONS, f"one of {', '.join(NORMALIZATIONS)}"),
    "intensity_range": (
        lambda v: (
            v is None or (isinstance(v, list) and len(v) == 2 and _numbers(v) and v[1] > v[0])
        ),
        "null or [low, high], low < high (what 'dataset' normalization maps to [0, 1])",
    ),
    "foreground": (_fraction, "a number in [0, 1]"),
    "augmentation": (lambda v: v in AUGMENTATIONS, f"one of {', '.join(AUGMENTATIONS)}"),
    "learning_rate": (_positive_number, "a number > 0"),
    "warmup": (lambda v: _fraction(v, 0.5), "a number in [0, 0.5]"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    "final_lr": (lambda v: _fraction(v), "a fraction of learning_rate, in [0, 1]"),
    "epochs": (_positive_int, "an int >= 1"),
    "patches_per_epoch": (_positive_int, "an int >= 1"),
    "time_budget": (lambda v: v is None or _positive_number(v), "null or seconds > 0"),
    "val_split": (lambda v: _fraction(v) and v < 1, "a number in [0, 1)"),
    "bn_momentum": (lambda v: _fraction(v) and 0 < v < 1, "a number in (0, 1)"),
    "ce_weight": (lambda v: _fraction(v, math.inf), "a number >= 0"),
    "batch_dice": (lambda v: isinstance(v, bool), "true or false"),
    "dice_weight": (lambda v: _fraction(v, math.inf), "a number >= 0"),
    "tile_size": (lambda v: _positive_int(v) and v >= 16, "an int >= 16"),
    "tta": (lambda v: v in (True, False, "auto"), 'true, false or "auto"'),
    "min_component_size": (
        lambda v: (
            v == "auto" or (isinstance(v, dict) and all(_fraction(n, math.inf) for n in v.values()))
        ),
        '"auto" or {class: pixels}',
    ),
    "precision": (lambda v: v in PRECISIONS, '"fp32", "bf16" or "fp16"'),
    "model": (
        lambda v: v is None or v in presets.names(),
        f"null (the plain UNet) or one of the presets {', '.join(presets.names())}",
    ),
}
# Settings added after plan files were first written: a plan without them gets these values.
OPTIONAL_SETTINGS = {"model": None, "precision": "fp32"}


# ---------------------------------------------------------------------------------- fingerprint
def _components(mask):
    """Areas (voxel counts) of the 8-connected (in 3D: 26-connected) components of a boolean mask."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    return np.bincount(labels.ravel())[1:] if count else np.zeros(0, int)


# Intensities drawn from each image for the dataset's 1st/99th percentiles, and the most kept in
# all: beyond it the pool is a uniform random sample of every value drawn (a reservoir), so memory
# stays bounded however many images there are. Up to POOLED_MAX values (10 images of 100k pixels
# or more, more smaller ones) the pool is every value drawn, as kunet's plans always computed it.
POOLED_PER_IMAGE = 100_000
POOLED_MAX = 1_000_000
# Above this many objects (or images), medians and percentiles of object areas (image sides) are
# interpolated from the counts directly instead of numpy's percentile over the expanded values.
_EXPAND_MAX = 1 << 22


class DatasetStatistics:
    """What :func:`fingerprint` reports, gathered one image at a time in bounded memory.

    ``add(image, mask, raw)`` takes one pair (the image as it will be trained on, before
    normalization for a plan: its channels converted; the mask's class indices; the stored pixel
    type), in the folder's order; ``result(num_classes, channels)`` gives the fingerprint. Image
    sides and object areas are kept as histograms (exact medians and percentiles), class pixel
    counts as sums, each image's 1st/99th percentiles as running minima and maxima, and the pooled
    intensities as described at :data:`POOLED_MAX`. :func:`kunet.data.load_folder` fills one while
    it checks a folder it streams (``fingerprint=True``), so planning reads each file once.
    """

    def __init__(self, normalized=None):
        self.normalized = normalized  # the normalization of the images added (None: as stored)
        self.images = 0
        self.dims = None
        self.sides = [Counter(), Counter(), Counter()]  # depths, heights, widths
        self.pixels = 0
        self.counts = np.zeros(0, np.int64)
        self.areas = {}  # class -> Counter({area: objects})
        self.dtypes = set()
        self.p1 = [math.inf, -math.inf]  # min and max over images of their 1st percentile
        self.p99 = [math.inf, -math.inf]
        self.finite_images = 0
        self._rng = np.random.default_rng(0)  # the draws of each image's pooled values
        self._keys = np.random.default_rng(1)  # which values the pool keeps once it is full
        self.pool = np.zeros(0, np.float32)
        self.pooled = 0  # values drawn in all

    def add(self, image, mask, raw=None):
        dims = mask.ndim
        self.dims = self.dims or dims
        self.images += 1
        if dims == 3:
            self.sides[0][int(mask.shape[0])] += 1
        self.sides[1][int(mask.shape[-2])] += 1
        self.sides[2][int(mask.shape[-1])] += 1
        self.pixels += int(mask.size)
        counts = np.bincount(mask.ravel())
        if counts.size > self.counts.size:
            self.counts = np.pad(self.counts, (0, counts.size - self.counts.size))
        self.counts[: counts.size] += counts
        for c in np.flatnonzero(counts[1:]) + 1:
            areas, n = np.unique(_components(mask == c), return_counts=True)
            found = dict(zip(areas.tolist(), n.tolist(), strict=True))
            self.areas.setdefault(int(c), Counter()).update(found)
        if raw:
            self.dtypes.add(raw)
        finite = image[np.isfinite(image)]
        if finite.size:
            lo, hi = np.percentile(finite, (1.0, 99.0))
            self.p1 = [min(self.p1[0], float(lo)), max(self.p1[1], float(lo))]
            self.p99 = [min(self.p99[0], float(hi)), max(self.p99[1], float(hi))]
            self.finite_images += 1
            self._pool(self._rng.choice(finite, min(finite.size, POOLED_PER_IMAGE), replace=False))

    def _pool(self, values):
        """Add the values drawn from one image (a uniform sample of it, in random order) to the
        pool, which stays a uniform sample of at most POOLED_MAX of every value drawn: the number
        it takes from ``values`` is hypergeometric, those replace uniformly chosen old ones."""
        total = self.pooled + values.size
        values = values.astype(np.float32, copy=False)
        if total <= POOLED_MAX:
            self.pool = np.concatenate([self.pool, values])
        else:
            rng = self._keys
            if total < 10**9:
                new = int(rng.hypergeometric(values.size, self.pooled, POOLED_MAX))
            else:  # beyond numpy's hypergeometric: its binomial limit
                new = int(rng.binomial(POOLED_MAX, values.size / total))
            if self.pool.size < POOLED_MAX:  # the first overflow: the pool holds every old value
                old = rng.choice(self.pool.size, POOLED_MAX - new, replace=False)
                self.pool = np.concatenate([self.pool[old], values[:new]])
            elif new:
                self.pool[rng.choice(POOLED_MAX, new, replace=False)] = values[:new]
        self.pooled = total

    def result(self, num_classes, channels):
        """The fingerprint (see :func:`fingerprint`) of the pairs added."""
        if not self.images:
            raise DataError("no images to plan from")
        counts = np.zeros(num_classes, np.int64)
        counts[: min(num_classes, self.counts.size)] = self.counts[:num_classes]
        objects = {}
        for c in range(1, num_classes):
            areas = self.areas.get(c, Counter())
            n = sum(areas.values())
            objects[str(c)] = {
                "count": int(n),
                "median_area": _percentile(areas, 50.0) if n else 0.0,
                "p5_area": _percentile(areas, 5.0) if n else 0.0,
                "min_area": float(min(areas)) if n else 0.0,
            }

        def side(counter):
            return {
                "min": int(min(counter)),
                "median": _percentile(counter, 50.0),
                "max": int(max(counter)),
            }

        pooled = self.pool if self.pool.size else np.zeros(1)
        p1 = self.p1 if self.finite_images else [math.nan, math.nan]
        p99 = self.p99 if self.finite_images else [math.nan, math.nan]
        extra = {"spatial_dims": 3, "depth": side(self.sides[0])} if self.dims == 3 else {}
        return {
            "images": self.images,
            **extra,
            "channels": channels,
            "num_classes": num_classes,
            "height": side(self.sides[1]),
            "width": side(self.sides[2]),
            "pixels": self.pixels,
            "class_fractions": [round(float(c), 5) for c in counts / max(counts.sum(), 1)],
            "objects": objects,
            "intensity": {
                "as_stored": self.normalized is None,
                "dtypes": sorted(self.dtypes),
                "p1": float(np.percentile(pooled, 1.0)),
                "p99": float(np.percentile(pooled, 99.0)),
                "per_image_p1": p1,
                "per_image_p99": p99,
            },
        }


def _percentile(counter, q):
    """numpy's (linear) percentile ``q`` of the values a Counter holds with their multiplicities."""
    values = np.asarray(sorted(counter), dtype=float)
    n = np.asarray([counter[v] for v in sorted(counter)], dtype=np.int64)
    if n.sum() <= _EXPAND_MAX:
        expanded = np.repeat(values, n)
        return float(np.median(expanded) if q == 50.0 else np.percentile(expanded, q))
    ends = np.cumsum(n)  # values[i] fills sorted positions [ends[i] - n[i], ends[i])
    at = (int(ends[-1]) - 1) * q / 100.0
    lo, hi = math.floor(at), min(math.floor(at) + 1, int(ends[-1]) - 1)
    a, b = (float(values[np.searchsorted(ends, k, side="right")]) for k in (lo, hi))
    return a + (b - a) * (at - lo)


def fingerprint(data):
    """What the plan is derived from, for a :class:`kunet.data.FolderData`: sizes, channels,
    intensities (as stored, unless the data was normalized), class frequencies and object sizes.

    Computed by :class:`DatasetStatistics`, one image at a time; a folder that was streamed with
    ``fingerprint=True`` already holds them (``data.statistics``), otherwise each sample is read
    once (decoded one at a time when streamed)."""
    stats = getattr(data, "statistics", None)
    if stats is None or stats.normalized != data.normalized:
        stats = DatasetStatistics(data.normalized)
        for s in data.samples:
            image, mask = s.load()
            stats.add(image, mask, s.raw)
    return stats.result(data.num_classes, data.channels)


# ---------------------------------------------------------------------------------- plan
def _round_down(value, multiple):
    return max(multiple, int(value) // multiple * multiple)


def _sizes_3d(fp, gpu):
    """Patch side, filters, batch size and tile side for volumes (module docstring)."""
    side = min(fp["depth"]["median"], fp["height"]["median"], fp["width"]["median"])
    patch = min(MAX_PATCH_3D_GPU if gpu else MAX_PATCH_3D_CPU, max(16, _round_down(side, 8)))
    filters = [8, 16, 32] if patch < 64 else [16, 32, 64, 128]
    batch = min(8, max(2, round(VOXELS_PER_BATCH / patch**3)))
    return patch, filters, batch, min(128, 2 * patch)


def make_plan(fp, *, time_budget=None, backend="tensorflow", gpu=False):
    """The settings (and the reason for each) for a fingerprint ``fp`` (see the module docstring)."""
    dims = fp.get("spatial_dims", 2)
    if dims == 3:
        patch, filters, batch, tile = _sizes_3d(fp, gpu)
        depth = len(filters)
        rate = VOXELS_PER_SECOND.get(backend, 5e4) * (20 if gpu else 1)
    else:
        side = min(fp["height"]["median"], fp["width"]["median"])
        patch = min(MAX_PATCH_GPU if gpu else MAX_PATCH_CPU, max(64, _round_down(side, 16)))
        depth = 4 if patch >= 128 else 3
        filters = [16 * 2**i for i in range(depth)]
        batch = min(16, max(4, round(PIXELS_PER_BATCH / patch**2)))
        tile = min(512, 2 * patch)
        rate = PIXELS_PER_SECOND.get(backend, 3e5) * (20 if gpu else 1)
    voxels = patch**dims  # per patch
    fractions = fp["class_fractions"][1:] or [1.0]
    sparse = min(fractions) < 0.10
    foreground = 0.5 if sparse else round(1 / 3, 4)
    if time_budget:
        total_patches = rate * float(time_budget) / voxels
        per_epoch = max(batch * 8, int(total_patches / EPOCHS_PER_BUDGET) // batch * batch)
        epochs = 10_000  # the budget ends the run
        passes = total_patches * voxels / max(fp["pixels"], 1)
        why_epochs = (
            f"{time_budget:g} s at ~{rate / 1e6:.2g} {'Mvoxel' if dims == 3 else 'Mpx'}/s "
            f"({backend}{', GPU' if gpu else ''}): "
            f"~{EPOCHS_PER_BUDGET} epochs of {per_epoch} patches"
        )
    else:
        per_epoch = max(16, math.ceil(2 * fp["pixels"] / voxels))
        epochs = DEFAULT_EPOCHS
        passes = epochs * 2
        why_epochs = f"no time budget: {DEFAULT_EPOCHS} epochs, each covering the images twice"
    augmentation = "heavy" if passes >= 200 else "medium" if passes >= 40 else "light"
    n = fp["images"]
    val_split = 0.0 if n < MIN_IMAGES_TO_HOLD_OUT else 0.1
    intensity = fp["intensity"]
    span = max(intensity["p99"] - intensity["p1"], 1e-6)
    offset = (intensity["per_image_p1"][1] - intensity["per_image_p1"][0]) / span
    per_image = offset > MAX_BACKGROUND_SHIFT or not intensity.get("as_stored", True)
    settings = {
        "patch_size": patch,
        "batch_size": batch,
        "filters": filters,
        "normalization": "percentile" if per_image else "dataset",
        "intensity_range": None
        if per_image
        else [round(intensity["p1"], 6), round(intensity["p99"], 6)],
        "foreground": foreground,
        "augmentation": augmentation,
        "learning_rate": 2e-3,
        "warmup": 0.03,
        "schedule": "cosine",
        "final_lr": 0.01,
        "epochs": epochs,
        "patches_per_epoch": per_epoch,
        "time_budget": float(time_budget) if time_budget else None,
        "val_split": round(val_split, 4),
        "bn_momentum": 0.9,
        "ce_weight": 1.0,
        "dice_weight": 1.0,
        "batch_dice": sparse,
        "tile_size": tile,
        "tta": "auto",
        "min_component_size": "auto",
        "model": None,
        "precision": "fp32",
    }
    if dims == 3:
        median = "x".join(f"{fp[k]['median']:g}" for k in ("depth", "height", "width"))
        size_reasons = {
            "patch_size": f"median volume {median} (DxHxW): cubes of {patch}^3",
            "filters": f"{depth} levels: receptive field ~{2 ** (depth + 3) + 12} voxels for "
            f"{patch}-voxel patches, few filters as 3D convolutions cost ~3x per voxel",
            "batch_size": f"~{VOXELS_PER_BATCH // 1000}k voxels per batch, at least 2",
            "tile_size": "twice the patch, at most 128",
        }
    else:
        size_reasons = {
            "patch_size": f"median image {fp['height']['median']:g}x{fp['width']['median']:g}",
            "filters": f"{depth} levels: receptive field ~{2 ** (depth + 3) + 12} px for "
            f"{patch}-px patches",
            "batch_size": f"~{PIXELS_PER_BATCH // 1000}k pixels per batch, at least 4 for batch norm",
        }
    reasons = {
        **size_reasons,
        "foreground": "a foreground class under 10% of the pixels" if sparse else "objects common",
        "batch_dice": (
            "sparse objects, absent from many patches: Dice over the whole batch is steadier"
            if sparse
            else "objects in most patches: Dice per patch"
        ),
        "augmentation": f"each pixel seen ~{passes:.0f} times",
        "epochs": why_epochs,
        "val_split": f"{n} images"
        + (
            f": under {MIN_IMAGES_TO_HOLD_OUT}, all train (a held-out image or two is too noisy "
            "to pick a checkpoint by; the annealed last one is validated on the training images)"
            if n < MIN_IMAGES_TO_HOLD_OUT
            else ""
        ),
        "bn_momentum": "0.9 (~10 steps): Keras' 0.99 lags the weights of a short run",
        "normalization": (
            f"the images' background levels (1st percentiles) differ by {offset:.0%} of the "
            + (
                "intensity range: each image on its own"
                if per_image
                else "intensity range: one range for all, so intensities stay comparable"
            )
        ),
    }
    return {"kunet_plan": PLAN_VERSION, "settings": settings, "fingerprint": fp, "reasons": reasons}


def with_preset(plan, spatial_dims, replace_filters=True):
    """The plan with its ``model`` preset checked against the data's ``spatial_dims`` (a 3D preset
    on images is a DataError) and, with ``replace_filters``, the preset's filters in place of the
    plan's (what ``--model NAME`` without ``--filters`` means)."""
    name = plan["settings"].get("model")
    if not name:
        return plan
    config = presets.config(name)
    if config.get("spatial_dims", 2) == 3 and spatial_dims == 2:
        raise DataError(f"--model {name} is a 3D architecture, but the images are 2D")
    if "filters" in config and replace_filters:
        plan = {
            **plan,
            "settings": dict(plan["settings"]),
            "reasons": dict(plan.get("reasons", {})),
        }
        plan["settings"]["filters"] = list(config["filters"])
        plan["reasons"]["filters"] = f"the preset's ({name})"
    return plan


# ---------------------------------------------------------------------------------- files
def check_settings(settings, where="plan"):
    """DataError naming the first unknown setting (with the closest valid one) or bad value."""
    for name, value in settings.items():
        if name not in SETTINGS:
            close = difflib.get_close_matches(name, SETTINGS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(
                f"{where}: unknown setting {name!r}{hint} (valid: {', '.join(SETTINGS)})"
            )
        check, valid = SETTINGS[name]
        if not check(value):
            raise DataError(f"{where}: setting {name!r} must be {valid}; got {value!r}")
    return settings


def parse_overrides(pairs):
    """``["patch_size=96", "augmentation=light"]`` -> settings (values read as JSON, else text)."""
    out = {}
    for pair in pairs or ():
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise DataError(f"--set expects NAME=VALUE; got {pair!r}")
        try:
            out[name.strip()] = json.loads(text)
        except ValueError:
            out[name.strip()] = text
    return check_settings(out, "--set")


def read_plan(path):
    """A plan file, checked: DataError naming the file and the field at fault."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such plan file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a kunet plan (cannot parse it as JSON: {e})") from None
    if not isinstance(plan, dict) or plan.get("kunet_plan") != PLAN_VERSION:
        raise DataError(f'{path}: not a kunet plan (no "kunet_plan": {PLAN_VERSION})')
    if not isinstance(plan.get("settings"), dict):
        raise DataError(f'{path}: the plan has no "settings" object')
    check_settings(plan["settings"], str(path))
    for name, value in OPTIONAL_SETTINGS.items():
        plan["settings"].setdefault(name, value)
    missing = [name for name in SETTINGS if name not in plan["settings"]]
    if missing:
        raise DataError(f"{path}: the plan lacks the setting(s) {', '.join(missing)}")
    return plan


def plan_next_to(model_path):
    """The plan saved beside a model (``RUN/plan.json`` for ``RUN/best.keras``), or None."""
    path = Path(model_path).parent / "plan.json"
    return read_plan(path) if path.is_file() else None


def table(plan):
    """The plan as lines of text: setting, value, reason."""
    settings, reasons = plan["settings"], plan.get("reasons", {})
    width = max(len(k) for k in settings)
    lines = []
    for name, value in settings.items():
        shown = json.dumps(value) if not isinstance(value, str) else value
        reason = reasons.get(name, "")
        lines.append(f"{name:<{width}}  {shown:<22}  {reason}".rstrip())
    return lines
