"""The folder workflow behind ``kunet train | predict | evaluate``: plain functions, usable from Python.

``train`` fits a UNet on random augmented patches of a folder dataset and keeps, in its run folder:

    best.keras      the model with the best validation Dice so far (written atomically)
    last.keras      the model after the latest epoch, optimizer state included (for --resume)
    state.json      epochs done, best score and epoch, classes, channels, settings
    history.csv     one row per epoch (Keras' CSVLogger)
    history.png     loss and Dice curves, training and validation
    overlays/       a few validation images: truth | prediction

Bad input raises :class:`kunet.io.DataError` with a one-line message naming the file, before anything
is written.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import time
from pathlib import Path

import keras
import numpy as np

from kunet import inference
from kunet import io as kio
from kunet.data import PatchDataset, TileDataset, load_folder, model_num_classes, split
from kunet.io import DataError

DEFAULT_FILTERS = (16, 32, 64, 128)
DEFAULT_PATCH_SIZE = 128
DEFAULT_BATCH_SIZE = 4
DEFAULT_EPOCHS = 40
DEFAULT_TILE_SIZE = 256
# Keras' default 0.99 averages the batch statistics over ~100 steps. A short run on a dozen images
# changes its weights faster than that, so the moving statistics used at validation and inference lag
# and the validation Dice swings from epoch to epoch; 0.9 (~10 steps) tracks them. Saved with the
# model (UNet's bn_momentum), so a resumed run keeps it.
BN_MOMENTUM = 0.9
OVERLAYS = 4

__all__ = ["train", "predict", "evaluate", "load_model", "AtomicCheckpoint", "TimeBudget"]


# ---------------------------------------------------------------------------------- callbacks
class TimeBudget(keras.callbacks.Callback):
    """Stops training at the first batch end once ``seconds`` have passed since ``start``.

    Keras still finishes that epoch's validation and ``on_epoch_end`` callbacks, so the checkpoint
    callbacks see the partial epoch and keep the best model.
    """

    def __init__(self, seconds, start=None):
        super().__init__()
        self.seconds = float(seconds)
        self.start = start
        self.stopped = False

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        if time.monotonic() - self.start >= self.seconds:
            self.model.stop_training = True
            self.stopped = True


class AtomicCheckpoint(keras.callbacks.Callback):
    """Each epoch end: ``last.keras``, ``best.keras`` when ``monitor`` improved (mode max), and
    ``state.json`` in ``run_dir``, every file written to a temporary name then ``os.replace``d.

    Keras' ``ModelCheckpoint`` writes in place, so an interrupted save can leave a torn file.
    """

    def __init__(self, run_dir, state, monitor="val_dice"):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.state = state
        self.monitor = monitor

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        score = logs.get(self.monitor)
        score = float(score) if score is not None and math.isfinite(float(score)) else None
        best = self.state.get("best_score")
        if score is not None and (best is None or score > best):
            kio.atomic_save_model(self.model, self.run_dir / "best.keras")
            self.state.update(best_score=score, best_epoch=epoch + 1)
        kio.atomic_save_model(self.model, self.run_dir / "last.keras")
        self.state["epoch"] = epoch + 1
        write_json(self.run_dir / "state.json", self.state)


def write_json(path, obj):
    kio.atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------- helpers
def load_model(path):
    """``keras.models.load_model`` with a DataError naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file")
    if path.suffix != ".keras":
        raise DataError(f"{path}: expected a .keras model file")
    import kunet  # noqa: F401 - registers kunet's serializable classes

    try:
        return keras.models.load_model(path)
    except Exception as e:  # noqa: BLE001 - any failure to load is a bad model file
        message = " ".join(str(e).split())[:200]
        raise DataError(f"{path}: cannot load model ({type(e).__name__}: {message})") from None


def _model_info(model):
    outputs = int(model.output_shape[-1])
    channels = int(model.input_shape[-1])
    depth = len(getattr(model, "filters", ())) or 0
    return outputs, channels, 2**depth


def _tile_for(model, tile_size):
    _, _, multiple = _model_info(model)
    tile = int(tile_size or DEFAULT_TILE_SIZE)
    return max(multiple, tile - tile % multiple)


def predict_labels(model, image, tile_size=None, tta=False, batch_size=4):
    """Class indices (H, W) for a normalized image, tiled when it is larger than a tile."""
    tile = _tile_for(model, tile_size)
    if image.shape[0] <= tile and image.shape[1] <= tile:
        probs = inference.predict_image(model, image, tta=tta)
    else:
        probs = inference.predict_tiled(
            model, image, tile_size=tile, overlap=0.5, batch_size=batch_size, tta=tta
        )
    return inference.to_labels(probs)


def _say(verbose, *parts):
    if verbose:
        print(*parts, flush=True)


# ---------------------------------------------------------------------------------- train
def train(
    images,
    masks,
    out,
    *,
    num_classes=None,
    epochs=DEFAULT_EPOCHS,
    time_budget=None,
    patch_size=DEFAULT_PATCH_SIZE,
    batch_size=DEFAULT_BATCH_SIZE,
    val_split=0.2,
    seed=0,
    resume=False,
    filters=DEFAULT_FILTERS,
    patches_per_epoch=None,
    verbose=1,
):
    """Train a UNet on the ``images``/``masks`` folders into the run folder ``out``.

    ``epochs`` is the total number of epochs of the run (a resumed run continues up to it).
    ``time_budget`` (seconds, from the call) stops training early, keeping the best checkpoint.
    Returns a summary dict (best validation Dice and epoch, epochs done, seconds, paths).
    """
    start = time.monotonic()
    for name, value in (("epochs", epochs), ("patch_size", patch_size), ("batch_size", batch_size)):
        if int(value) < 1:
            raise DataError(f"{name} must be >= 1; got {value}")
    if time_budget is not None and time_budget <= 0:
        raise DataError(f"time budget must be > 0 seconds; got {time_budget}")
    out = Path(out)
    state = None
    if resume:
        state_path = out / "state.json"
        for needed in (state_path, out / "last.keras"):
            if not needed.is_file():
                raise DataError(f"{needed}: not found; nothing to resume (train without --resume)")
        try:
            state = json.loads(state_path.read_text())
            state["epoch"] = int(state["epoch"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{state_path}: not a kunet run state file") from None
        if num_classes is not None and model_num_classes(num_classes) != model_num_classes(
            state["num_classes"]
        ):
            raise DataError(
                f"{state_path}: the run has {state['num_classes']} classes, not {num_classes}"
            )
        num_classes = state["num_classes"]
    elif (out / "state.json").exists() or (out / "best.keras").exists():
        raise DataError(
            f"{out} already holds a run (state.json / best.keras); pass --resume to continue it "
            "or choose another output folder"
        )

    data = load_folder(
        images, masks, num_classes=num_classes, channels=state["channels"] if state else None
    )
    kio.check_writable(out, "run folder")
    keras.utils.set_random_seed(seed)
    train_samples, val_samples = split(data.samples, val_split, seed)
    if state is not None:  # resume: keep the run's own validation images when they are all there
        by_name = {s.name: s for s in data.samples}
        held_out = state.get("val_images") or []
        if held_out and all(name in by_name for name in held_out):
            val_samples = [by_name[name] for name in held_out]
            train_samples = [s for s in data.samples if s.name not in set(held_out)] or val_samples
    if state is None:
        from kunet.model import UNet

        model = UNet(
            num_classes=data.model_num_classes,
            filters=tuple(filters),
            input_shape=(None, None, data.channels),
            bn_momentum=BN_MOMENTUM,
        )
        state = {
            "epoch": 0,
            "best_score": None,
            "best_epoch": None,
            "monitor": "val_dice",
            "num_classes": data.num_classes,
            "channels": data.channels,
            "filters": list(filters),
            "patch_size": int(patch_size),
            "batch_size": int(batch_size),
            "seed": int(seed),
            "train_images": [s.name for s in train_samples],
            "val_images": [s.name for s in val_samples],
        }
    else:
        model = load_model(out / "last.keras")
    initial_epoch = state["epoch"]
    _say(
        verbose,
        f"kunet: {len(data.samples)} image(s) ({len(train_samples)} train, {len(val_samples)} "
        f"validation), {data.num_classes} classes, {data.channels} channel(s); run folder {out}",
    )
    if val_samples == train_samples:
        _say(verbose, "kunet: too few images to hold some out: validating on the training images")
    if initial_epoch >= epochs:
        _say(verbose, f"kunet: the run already has {initial_epoch} epochs (--epochs {epochs})")
    train_ds = PatchDataset(
        train_samples,
        data.num_classes,
        patch_size=patch_size,
        batch_size=batch_size,
        patches_per_epoch=patches_per_epoch,
        seed=seed,
    )
    train_ds.epoch = initial_epoch
    val_ds = TileDataset(val_samples, data.num_classes, patch_size, batch_size)

    budget = TimeBudget(time_budget, start=start) if time_budget else None
    callbacks = [
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=initial_epoch > 0),
        AtomicCheckpoint(out, state),
    ]
    if budget is not None:
        callbacks.append(budget)
    if initial_epoch < epochs:
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=verbose,
        )
        # An epoch cut short by the time budget leaves a data iterator alive; collect it now, not
        # at interpreter exit (where TensorFlow logs an error finalizing it).
        gc.collect()
    plot_history(out / "history.csv", out / "history.png")
    if (out / "best.keras").is_file():
        best = load_model(out / "best.keras")
        write_overlays(best, val_samples[:OVERLAYS], data.num_classes, out / "overlays")
    summary = {
        "best_val_dice": state.get("best_score"),
        "best_epoch": state.get("best_epoch"),
        "epochs": state["epoch"],
        "seconds": round(time.monotonic() - start, 1),
        "stopped_by_time_budget": bool(budget and budget.stopped),
        "best_model": str(out / "best.keras"),
    }
    _say(
        verbose,
        f"kunet: {summary['epochs']} epoch(s) in {summary['seconds']} s"
        + (" (time budget reached)" if summary["stopped_by_time_budget"] else "")
        + f"; best validation Dice {_fmt(summary['best_val_dice'])} at epoch "
        f"{summary['best_epoch']} -> {summary['best_model']}",
    )
    return summary


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


def plot_history(csv_path, png_path):
    """Loss and Dice per epoch (training and validation) from a CSVLogger file; skipped without
    matplotlib or history."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not Path(csv_path).is_file():
        return False
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return False
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ("loss", "dice"), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            name = prefix + key
            if name in rows[0]:
                ax.plot(epochs, [float(r[name]) for r in rows], style, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    kio.atomic_write_bytes(png_path, buffer.getvalue())
    return True


def write_overlays(model, samples, num_classes, folder):
    """For each sample, ``<name>.png``: truth overlay | prediction overlay, side by side."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    for s in samples:
        pred = predict_labels(model, s.image)
        truth = kio.overlay(s.image, s.mask, num_classes)
        guess = kio.overlay(s.image, pred, num_classes)
        gap = np.full((truth.shape[0], 4, 3), 255, dtype="uint8")
        kio.write_rgb(folder / f"{s.name}.png", np.concatenate([truth, gap, guess], axis=1))


# ---------------------------------------------------------------------------------- predict
def predict(model_path, images, out, *, tile_size=None, tta=False, verbose=1):
    """Write ``<stem>.png`` (class-index palette PNG) and ``<stem>_overlay.png`` for each image.

    ``images`` is a folder or one file. Outputs appear only when every image succeeded.
    Returns the list of mask paths written.
    """
    images = Path(images)
    if images.is_dir():
        files = kio.list_images(images, "images")
    elif images.is_file():
        if not kio.is_image_file(images):
            raise DataError(f"{images}: not an image file ({', '.join(kio.IMAGE_SUFFIXES)})")
        files = [images]
    else:
        raise DataError(f"{images}: no such file or folder")
    outputs = {}
    for f in files:
        for name in (f"{f.stem}.png", f"{f.stem}_overlay.png"):
            if name in outputs:
                raise DataError(f"{outputs[name]} and {f} would both write {Path(out) / name}")
            outputs[name] = f
    if tile_size is not None and int(tile_size) < 1:
        raise DataError(f"tile size must be >= 1; got {tile_size}")
    model = load_model(model_path)
    outputs, channels, _ = _model_info(model)
    num_classes = 2 if outputs == 1 else outputs
    written = []
    with kio.staged_outputs(out) as staging:
        for f in files:
            image = kio.normalize(kio.to_channels(kio.read_image(f), channels, f))
            labels = predict_labels(model, image, tile_size=tile_size, tta=tta)
            kio.write_mask(staging / f"{f.stem}.png", labels, num_classes)
            kio.write_rgb(
                staging / f"{f.stem}_overlay.png", kio.overlay(image, labels, num_classes)
            )
            fractions = np.bincount(labels.ravel(), minlength=num_classes) / labels.size
            _say(
                verbose,
                f"{f} -> {Path(out) / (f.stem + '.png')} ({labels.shape[1]}x{labels.shape[0]}, "
                f"foreground {1 - fractions[0]:.1%})",
            )
            written.append(Path(out) / f"{f.stem}.png")
    return written


# ---------------------------------------------------------------------------------- evaluate
def evaluate(model_path, images, masks, *, tile_size=None, tta=False):
    """Dice and IoU per class over every pixel of the folder, and their foreground means.

    Returns ``{"dice": {class: score}, "iou": {...}, "mean_dice": .., "mean_iou": .., "images": n,
    "num_classes": K, "per_image_dice": {name: foreground Dice}}``; means are over classes
    1..K-1. A class absent from both truth and prediction scores 1.0 (as in :mod:`kunet.metrics`).
    """
    model = load_model(model_path)
    outputs, channels, _ = _model_info(model)
    num_classes = 2 if outputs == 1 else outputs
    data = load_folder(images, masks, num_classes=num_classes, channels=channels)
    totals = np.zeros((3, num_classes))  # tp, fp, fn per class
    per_image = {}
    for s in data.samples:
        pred = predict_labels(model, s.image, tile_size=tile_size, tta=tta).ravel()
        counts = _confusion(pred, s.mask.ravel(), num_classes)
        totals += counts
        per_image[s.name] = round(float(_scores(*counts)[0][1:].mean()), 6)
    dice, iou = _scores(*totals)
    return {
        "images": len(data.samples),
        "num_classes": num_classes,
        "dice": {str(c): round(float(v), 6) for c, v in enumerate(dice)},
        "iou": {str(c): round(float(v), 6) for c, v in enumerate(iou)},
        "mean_dice": round(float(dice[1:].mean()), 6),
        "mean_iou": round(float(iou[1:].mean()), 6),
        "per_image_dice": per_image,
    }


def _confusion(pred, truth, num_classes):
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


def _scores(tp, fp, fn):
    """Dice and IoU per class; a class absent from truth and prediction scores 1."""
    dice = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
    iou = np.where(tp + fp + fn > 0, tp / np.maximum(tp + fp + fn, 1), 1.0)
    return dice, iou
