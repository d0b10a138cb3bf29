"""Prediction on image folders: ``kunet predict`` and ``kunet evaluate`` as plain functions.

``predict`` writes a mask and an overlay per image, each published whole as soon as it is done.
``evaluate`` scores a model on a folder pair (Dice and IoU per class). Both read the plan saved
beside the model (``plan.json``): its normalization, tile size, TTA and small-object removal. What
:mod:`kunet.train` shares with them is here too: loading a ``.keras`` file (:func:`load_model`),
the plan's inference settings, one image's class indices (:func:`predict_labels`), and Dice and
IoU per class (:func:`confusion_counts`, :func:`dice_iou`).

Nothing is lost: bad input raises :class:`kunet.io.DataError` with a one-line message naming the
file before anything is written; the output folder is never the images' folder (or inside or around
it); files already there are replaced only with ``overwrite=True``; NaN/inf pixels are refused
unless ``nan_policy`` says otherwise; what had to be guessed about the data is reported (or refused
with ``strict=True``).

A 3D model (``model.spatial_dims == 3``) reads its inputs as volumes (:mod:`kunet.volumes`: NIfTI,
``.npy``, TIFF stacks) and writes each mask in its input's format, a NIfTI mask with its image's
affine and header; its overlay shows the slice with the most predicted foreground.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import keras
import numpy as np

from kunet import _failpoints, inference
from kunet import io as kio
from kunet import volumes as kvol
from kunet.data import load_folder
from kunet.io import DataError, Guesses, print_note
from kunet.outputs import (
    STAGING_PREFIX,
    FolderLock,
    Interrupted,
    check_existing,
    check_separate,
    check_writable,
    clean_stale,
    deferred_sigint,
    finish,
)
from kunet.plan import plan_next_to

DEFAULT_TILE_SIZE = 256  # inference tiles for a model without a plan beside it

__all__ = [
    "predict",
    "evaluate",
    "load_model",
    "predict_labels",
    "inference_settings",
    "normalization_of",
    "confusion_counts",
    "dice_iou",
]


# ---------------------------------------------------------------------------------- helpers
def load_model(path):
    """``keras.models.load_model`` with a DataError naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file")
    if path.suffix != ".keras":
        raise DataError(f"{path}: expected a .keras model file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a .keras file (a .keras model is a zip archive; this is not)")
    with zipfile.ZipFile(path) as archive:
        if "config.json" not in archive.namelist():
            raise DataError(f"{path}: not a .keras file (the zip archive has no config.json)")
    import kunet  # noqa: F401 - registers kunet's serializable classes

    try:
        return keras.models.load_model(path)
    except Exception as e:  # noqa: BLE001 - any failure to load is a bad model file
        message = " ".join(str(e).split())[:200]
        raise DataError(f"{path}: cannot load model ({type(e).__name__}: {message})") from None


def _model_info(model):
    outputs = int(model.output_shape[-1])
    channels = int(model.input_shape[-1])
    multiple = getattr(model, "size_multiple", None)
    if not isinstance(multiple, int):
        multiple = 2 ** (len(getattr(model, "filters", ())) or 0)
    return outputs, channels, multiple


def spatial_dims(model):
    """2 for a model of images, 3 for one of volumes (from its input rank)."""
    dims = getattr(model, "spatial_dims", None)
    return dims if isinstance(dims, int) else len(model.input_shape) - 2


def _tile_for(model, tile_size):
    _, _, multiple = _model_info(model)
    tile = int(tile_size or DEFAULT_TILE_SIZE)
    return max(multiple, tile - tile % multiple)


def predict_labels(model, image, tile_size=None, tta=False, batch_size=4, min_sizes=None):
    """Class indices (H, W), or (D, H, W) for a volume, for a normalized image, tiled when it is
    larger than a tile, with the connected components smaller than ``min_sizes`` ({class: pixels})
    removed."""
    tile = _tile_for(model, tile_size)
    if all(n <= tile for n in image.shape[:-1]):
        probs = inference.predict_image(model, image, tta=tta, nan_policy="ignore")
    else:
        probs = inference.predict_tiled(
            model, image, tile_size=tile, overlap=0.5, batch_size=batch_size, tta=tta,
            nan_policy="ignore",
        )  # fmt: skip
    labels = inference.to_labels(probs)
    return inference.remove_small_components(labels, min_sizes) if min_sizes else labels


def inference_settings(plan, tile_size=None, tta=None):
    """(tile size, TTA, {class: min component size}) for a plan (None: kunet's defaults), the
    explicit arguments winning."""
    s = plan["settings"] if plan else {}
    tile = tile_size or s.get("tile_size") or DEFAULT_TILE_SIZE
    if tta is None:
        tta = s.get("tta") is True
    sizes = s.get("min_component_size")
    return tile, bool(tta), sizes if isinstance(sizes, dict) else {}


def normalization_of(plan):
    """(method, value range) of a plan's normalization (kunet's default without a plan)."""
    if not plan:
        return "percentile", None
    s = plan["settings"]
    return s["normalization"], s.get("intensity_range")


def _input_folder(path):
    path = Path(path)
    return path if path.is_dir() else path.parent


# ---------------------------------------------------------------------------------- predict
def predict(
    model_path,
    images,
    out,
    *,
    tile_size=None,
    tta=None,
    overwrite=False,
    nan_policy="error",
    strict=False,
    verbose=1,
):
    """Write ``<stem>.png`` (class-index palette PNG) and ``<stem>_overlay.png`` for each image.

    ``images`` is a folder or one file. Every image is read and checked before the first
    prediction, so bad input leaves nothing behind; then each image's two files are published
    (renamed into ``out``) as soon as they are done, and only then printed, so a run stopped by a
    kill or Ctrl-C leaves complete files only. ``out`` must not be, be inside or contain the images'
    folder, and files already there are replaced only with ``overwrite``. ``nan_policy``: NaN/inf
    pixels are an error ('error'), set to 0 ('zero') or passed on ('ignore'). ``strict``: refuse to
    guess (a channel conversion, say) instead of saying what was guessed. The normalization, tile
    size, TTA and small-object removal are the plan's saved beside the model (``plan.json``),
    ``tile_size`` and ``tta`` winning. Returns the list of mask paths written.
    """
    images = Path(images)
    out = Path(out)
    model = load_model(model_path)
    volumes = spatial_dims(model) == 3
    if not volumes and kvol.holds_volumes(images):
        raise DataError(
            f"{images} holds 3D volumes (NIfTI/.npy) but {model_path} is a 2D model; predict "
            "them with a model trained on volumes"
        )
    listing, is_file = (
        (kvol.list_volumes, kvol.is_volume_file)
        if volumes
        else (kio.list_images, kio.is_image_file)
    )
    if images.is_dir():
        files = listing(images, "images")
    elif images.is_file():
        if not is_file(images):
            kind, suffixes = (
                ("volume", kvol.VOLUME_SUFFIXES) if volumes else ("image", kio.IMAGE_SUFFIXES)
            )
            raise DataError(f"{images}: not an {kind} file ({', '.join(suffixes)})")
        files = [images]
    else:
        raise DataError(f"{images}: no such file or folder")
    check_separate(out, [("images", _input_folder(images))], "output folder")

    def outputs_of(f):
        if volumes:
            return kvol.mask_name(f), f"{kvol.volume_stem(f)}_overlay.png"
        return f"{f.stem}.png", f"{f.stem}_overlay.png"

    names = {}
    for f in files:
        for name in outputs_of(f):
            if name in names:
                raise DataError(f"{names[name]} and {f} would both write {out / name}")
            names[name] = f
    if tile_size is not None and int(tile_size) < 1:
        raise DataError(f"tile size must be >= 1; got {tile_size}")
    if out.is_dir():  # fail fast; checked again under the lock
        check_existing(out, list(names), overwrite)
    plan = plan_next_to(model_path)
    tile, tta, sizes = inference_settings(plan, tile_size, tta)
    norm = normalization_of(plan)
    outputs, channels, _ = _model_info(model)
    num_classes = 2 if outputs == 1 else outputs
    guesses = Guesses(strict)

    def load(f, guesses):
        if volumes:
            return kvol.load_volume(f, channels, nan_policy, guesses, *norm)
        return kio.load_image(f, channels, nan_policy, guesses, *norm), None

    for f in files:  # every image is read and checked before any work
        load(f, guesses)
    created = check_writable(out)
    written = []
    try:
        with FolderLock(out):
            removed = clean_stale(out)
            if removed:
                print_note(f"{out}: removed {len(removed)} temporary file(s) of an interrupted run")
            replaced = set(check_existing(out, list(names), overwrite))
            for line in guesses.lines():
                print_note(line)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
            try:
                for f in files:
                    image, meta = load(f, None)
                    labels = predict_labels(model, image, tile, tta, min_sizes=sizes)
                    mask, over = outputs_of(f)
                    if volumes:
                        kvol.write_mask(staging / mask, labels, like=meta, overwrite=True)
                        k = int(np.argmax((labels > 0).sum(axis=(1, 2))))
                        shown, shown_labels = image[k], labels[k]
                    else:
                        kio.write_mask(staging / mask, labels, num_classes)
                        shown, shown_labels = image, labels
                    kio.write_rgb(staging / over, kio.overlay(shown, shown_labels, num_classes))
                    _failpoints.reached("predict:staged")
                    with deferred_sigint():  # the overlay, then the mask: published as a pair
                        for name in (over, mask):
                            _publish(staging / name, out / name)
                    written.append(out / mask)
                    fractions = np.bincount(labels.ravel(), minlength=num_classes) / labels.size
                    if verbose:
                        size = (
                            "x".join(map(str, labels.shape)) + " DxHxW"
                            if volumes
                            else f"{labels.shape[1]}x{labels.shape[0]}"
                        )
                        print(
                            f"{f} -> {out / mask} ({size}, foreground {1 - fractions[0]:.1%})",
                            flush=True,
                        )
            except KeyboardInterrupt:
                raise Interrupted(
                    f"interrupted after {len(written)} of {len(files)} image(s); the files "
                    f"written to {out} are complete"
                ) from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                done = {n for f in files[: len(written)] for n in outputs_of(f)}
                if replaced & done:
                    print_note(
                        f"--overwrite: replaced {len(replaced & done)} existing file(s) in {out}"
                    )
    finally:
        if created and not any(out.iterdir()):
            out.rmdir()
    return written


def _publish(source, target):
    finish(source, target)
    _failpoints.reached(f"predict:published:{target.name}")


# ---------------------------------------------------------------------------------- evaluate
def evaluate(model_path, images, masks, *, tile_size=None, tta=None, nan_policy="error",
             strict=False, stream="auto"):  # fmt: skip
    """Dice and IoU per class over every pixel of the folder, and their foreground means.

    Returns ``{"dice": {class: score}, "iou": {...}, "mean_dice": .., "mean_iou": .., "images": n,
    "num_classes": K, "per_image_dice": {name: foreground Dice}}``; means are over classes
    1..K-1. A class absent from both truth and prediction scores 1.0 (as in :mod:`kunet.metrics`).
    ``nan_policy``, ``strict`` and inference as in :func:`predict`. ``stream``: as in
    :func:`kunet.data.load_folder` ("auto": a folder larger than memory is streamed, one image in
    memory at a time; the scores are the same).
    """
    model = load_model(model_path)
    plan = plan_next_to(model_path)
    tile, tta, sizes = inference_settings(plan, tile_size, tta)
    outputs, channels, _ = _model_info(model)
    num_classes = 2 if outputs == 1 else outputs
    guesses = Guesses(strict)
    volumes = spatial_dims(model) == 3
    if not volumes and kvol.holds_volumes(images):
        raise DataError(f"{images} holds 3D volumes (NIfTI/.npy) but {model_path} is a 2D model")
    data = load_folder(
        images, masks, num_classes=num_classes, channels=channels, nan_policy=nan_policy,
        guesses=guesses, normalization=None, volumes=volumes, stream=stream,
    ).normalize(*normalization_of(plan), nan_policy)  # fmt: skip
    for line in guesses.lines():
        print_note(line)
    totals = np.zeros((3, num_classes))  # tp, fp, fn per class
    per_image = {}
    for s in data.samples:
        image, mask = s.load()  # a streamed folder: one image decoded at a time
        pred = predict_labels(model, image, tile, tta, min_sizes=sizes).ravel()
        counts = confusion_counts(pred, mask.ravel(), num_classes)
        totals += counts
        per_image[s.name] = round(float(dice_iou(*counts)[0][1:].mean()), 6)
    dice, iou = dice_iou(*totals)
    return {
        "images": len(data.samples),
        "num_classes": num_classes,
        "dice": {str(c): round(float(v), 6) for c, v in enumerate(dice)},
        "iou": {str(c): round(float(v), 6) for c, v in enumerate(iou)},
        "mean_dice": round(float(dice[1:].mean()), 6),
        "mean_iou": round(float(iou[1:].mean()), 6),
        "per_image_dice": per_image,
    }


def confusion_counts(pred, truth, num_classes):
    """(3, K) true positives, false positives, false negatives per class."""
    counts = np.zeros((3, num_classes))
    for c in range(num_classes):
        p, t = pred == c, truth == c
        counts[:, c] = (
            np.count_nonzero(p & t),
            np.count_nonzero(p & ~t),
            np.count_nonzero(~p & t),
        )
    return counts


def dice_iou(tp, fp, fn):
    """Dice and IoU per class; a class absent from truth and prediction scores 1."""
    dice = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
    iou = np.where(tp + fp + fn > 0, tp / np.maximum(tp + fp + fn, 1), 1.0)
    return dice, iou
