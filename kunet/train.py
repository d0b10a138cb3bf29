"""The folder workflow behind ``kunet train | predict | evaluate``: plain functions, usable from Python.

``train`` fits a UNet on random augmented patches of a folder dataset into a run folder (best.keras,
last.keras, state.json, history.csv, history.png, overlays/; see :mod:`kunet.run_folder`, which
keeps it consistent whenever the process stops: a kill, Ctrl-C, a full disk). ``predict`` writes a
mask and an overlay per image, each published whole as soon as it is done. ``evaluate`` scores a
model on a folder pair.

Nothing is lost: bad input raises :class:`kunet.io.DataError` with a one-line message naming the
file before anything is written; an output folder is never an input folder (or inside or around
one); files already there are replaced only with ``overwrite=True``; NaN/inf pixels are refused
unless ``nan_policy`` says otherwise; what had to be guessed about the data is reported (or refused
with ``strict=True``).
"""

from __future__ import annotations

import csv
import gc
import io
import math
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import keras
import numpy as np

from kunet import _failpoints, inference
from kunet import io as kio
from kunet.callbacks import NonFiniteError, TerminateOnNonFinite
from kunet.data import PatchDataset, TileDataset, load_folder, model_num_classes, split
from kunet.io import DataError, Guesses
from kunet.outputs import (
    STAGING_PREFIX,
    FolderLock,
    SigintFlag,
    atomic_path,
    atomic_write_bytes,
    check_existing,
    check_separate,
    check_writable,
    clean_stale,
    deferred_sigint,
    finish,
)
from kunet.run_folder import RunFolder

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

__all__ = [
    "train",
    "predict",
    "evaluate",
    "load_model",
    "Interrupted",
    "RecordEpochs",
    "TimeBudget",
]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped ``train`` or ``predict`` at a safe point; ``str()`` says where, and the
    folder is consistent (``train``: resume it; ``predict``: the files written are complete)."""

    def __init__(self, message, epoch=None):
        super().__init__(message)
        self.epoch = epoch


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


class RecordEpochs(keras.callbacks.Callback):
    """Each epoch end: one history row, the best score (``monitor``, mode max) and the checkpoints,
    committed to the :class:`kunet.run_folder.RunFolder` as one unit.

    Keras' ``CSVLogger`` and ``ModelCheckpoint`` write their files one after the other and in place,
    so a kill between (or during) them left a history row the state did not cover, or a torn file.
    """

    def __init__(self, run, state, monitor="val_dice"):
        super().__init__()
        self.run = run
        self.state = state
        self.monitor = monitor

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        score = logs.get(self.monitor)
        score = float(score) if score is not None and math.isfinite(float(score)) else None
        best = self.state.get("best_score")
        improved = score is not None and (best is None or score > best)
        self.state["history"].append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
        self.state["epoch"] = epoch + 1
        if improved:
            self.state.update(best_score=score, best_epoch=epoch + 1)
        self.run.commit(self.model, self.state, improved=improved)


class _StopOnSigint(keras.callbacks.Callback):
    """Raises :class:`Interrupted` before the next batch (training or validation) once Ctrl-C was
    pressed (``flag.raised``), and after the epoch's commit when it came during one."""

    def __init__(self, flag, state):
        super().__init__()
        self.flag = flag
        self.state = state

    def _check(self, *args, **kwargs):
        if self.flag.raised:
            raise _interrupted(self.state)

    on_train_batch_begin = on_test_batch_begin = on_epoch_end = _check


def _interrupted(state):
    done = state["epoch"]
    return Interrupted(f"interrupted at epoch {done + 1} ({done} epoch(s) saved)", done)


class _Failpoints(keras.callbacks.Callback):
    """The per-batch failpoint of the fault-injection tests (added only when they are on)."""

    def on_train_batch_end(self, batch, logs=None):
        _failpoints.reached("train:batch")


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
        probs = inference.predict_image(model, image, tta=tta, nan_policy="ignore")
    else:
        probs = inference.predict_tiled(
            model, image, tile_size=tile, overlap=0.5, batch_size=batch_size, tta=tta,
            nan_policy="ignore",
        )  # fmt: skip
    return inference.to_labels(probs)


def _say(verbose, *parts):
    if verbose:
        print(*parts, flush=True)


def _note(line):
    """What kunet guessed or repaired: said even under --quiet (standard error)."""
    print(f"kunet: note: {line}", file=sys.stderr, flush=True)


def _input_folder(path):
    path = Path(path)
    return path if path.is_dir() else path.parent


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
    overwrite=False,
    filters=DEFAULT_FILTERS,
    patches_per_epoch=None,
    nan_policy="error",
    strict=False,
    verbose=1,
):
    """Train a UNet on the ``images``/``masks`` folders into the run folder ``out``.

    ``epochs`` is the total number of epochs of the run (a resumed run continues up to it).
    ``time_budget`` (seconds, from the call) stops training early, keeping the best checkpoint.
    ``resume`` continues the run in ``out``; without it a folder already holding a run is refused
    unless ``overwrite`` (then that run's files are replaced). ``nan_policy``: NaN/inf pixels are an
    error ('error'), set to 0 ('zero') or passed on ('ignore'). ``strict``: refuse to guess (the
    number of classes, channel conversions, 0/255 masks) instead of saying what was guessed.

    Returns a summary dict (best validation Dice and epoch, epochs done, seconds, paths). Raises
    :class:`Interrupted` (a KeyboardInterrupt) after Ctrl-C, with the run folder consistent and
    resumable, and :class:`kunet.callbacks.NonFiniteError` when the loss or the weights became
    NaN/inf (the folder keeps the last good epoch).
    """
    start = time.monotonic()
    for name, value in (("epochs", epochs), ("patch_size", patch_size), ("batch_size", batch_size)):
        if int(value) < 1:
            raise DataError(f"{name} must be >= 1; got {value}")
    if time_budget is not None and time_budget <= 0:
        raise DataError(f"time budget must be > 0 seconds; got {time_budget}")
    if resume and overwrite:
        raise DataError(
            "--resume continues the run in the folder, --overwrite replaces it: not both"
        )
    kio.check_nan_policy(nan_policy)
    out = Path(out)
    check_separate(out, [("images", images), ("masks", masks)], "run folder")
    run = RunFolder(out)
    state = run.read_state() if resume else None  # read-only here; again under the lock
    if resume and state is None:
        if run.started_before():
            raise DataError(
                f"{out}: the earlier run stopped before its first checkpoint (no state.json); "
                "start it again without --resume"
            )
        raise DataError(f"{out}: no kunet run to resume (no state.json); train without --resume")
    if not resume and run.holds_run() and not overwrite:
        _refuse_run(out, run)
    if (
        resume
        and num_classes is not None
        and model_num_classes(num_classes) != model_num_classes(state["num_classes"])
    ):
        raise DataError(
            f"{run.state_path}: the run has {state['num_classes']} classes, not {num_classes}"
        )
    guesses = Guesses(strict)
    data = load_folder(
        images,
        masks,
        num_classes=state["num_classes"] if state else num_classes,
        channels=state["channels"] if state else None,
        nan_policy=nan_policy,
        guesses=guesses,
    )
    created = check_writable(out, "run folder")
    try:
        with FolderLock(out, "run folder"):
            for line in run.recover():
                _note(f"{out}: {line}")
            if resume:
                state = run.read_state()
                problems = run.problems()
                if problems:
                    raise DataError(f"{out}: cannot resume: {'; '.join(problems)}")
            elif run.holds_run():
                if not overwrite:
                    _refuse_run(out, run)
                _note(
                    f"--overwrite: removed {run.remove_run()} file(s) of the earlier run in {out}"
                )
            for line in guesses.lines():  # after every check: an error is the only line printed
                _note(line)
            return _train_locked(
                run, data, state, start, epochs=epochs, time_budget=time_budget,
                patch_size=patch_size, batch_size=batch_size, val_split=val_split, seed=seed,
                filters=filters, patches_per_epoch=patches_per_epoch, nan_policy=nan_policy,
                verbose=verbose,
            )  # fmt: skip
    finally:
        if created and not any(out.iterdir()):
            out.rmdir()  # nothing was committed: leave no empty folder behind


def _refuse_run(out, run):
    raise DataError(
        f"{out} already holds a run ({kio.show(run.holds_run())}); pass --resume to continue "
        "it, --overwrite to replace it, or choose another output folder"
    )


def _train_locked(
    run, data, state, start, *, epochs, time_budget, patch_size, batch_size, val_split, seed,
    filters, patches_per_epoch, nan_policy, verbose,
):  # fmt: skip
    out = run.path
    keras.utils.set_random_seed(seed)
    train_samples, val_samples = split(data.samples, val_split, seed)
    if state is not None:  # resume: keep the run's own validation images when they are all there
        by_name = {s.name: s for s in data.samples}
        held_out = state.get("val_images") or []
        if held_out and all(name in by_name for name in held_out):
            val_samples = [by_name[name] for name in held_out]
            train_samples = [s for s in data.samples if s.name not in set(held_out)] or val_samples
        model = load_model(out / "last.keras")
    else:
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
            "history": [],
        }
        # Epoch 0: a run killed in its first epoch resumes from here. The optimizer is built first
        # so that its (zero) state is saved too and loads without Keras' "skipping variables".
        model.optimizer.build(model.trainable_variables)
        run.commit(model, state)
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
    stop = None
    with SigintFlag() as flag:
        # The NaN guard first: an epoch whose weights went NaN is never committed.
        callbacks = [TerminateOnNonFinite(), RecordEpochs(run, state), _StopOnSigint(flag, state)]
        if budget is not None:
            callbacks.append(budget)
        if _failpoints.active():
            callbacks.append(_Failpoints())
        try:
            if initial_epoch < epochs:
                model.fit(
                    train_ds,
                    validation_data=val_ds,
                    epochs=epochs,
                    initial_epoch=initial_epoch,
                    callbacks=callbacks,
                    verbose=verbose,
                    # PatchDataset orders each epoch from (seed, epoch); Keras' own shuffle of the
                    # batch order draws from Python's global RNG, which a resumed run cannot replay
                    shuffle=False,
                    # 'zero' was applied when the images were read
                    nan_policy="ignore" if nan_policy == "ignore" else "error",
                )
        except KeyboardInterrupt:  # Interrupted at a safe point, or a second Ctrl-C
            stop = _interrupted(state)
        except NonFiniteError as e:
            stop = NonFiniteError(
                f"{e}; {out} keeps the last good epoch ({state['epoch']}): resume it with a "
                "lower learning rate or fix the data"
            )
        finally:
            # An epoch cut short leaves a data iterator alive; collect it now, not at interpreter
            # exit (where TensorFlow logs an error finalizing it).
            gc.collect()
    if isinstance(stop, Interrupted) and verbose:
        print(flush=True)  # end the progress bar's line
    plot_history(state["history"], out / "history.png")
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
    if stop is not None:
        raise stop
    return summary


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


def plot_history(rows, png_path):
    """Loss and Dice per epoch (training and validation) from history rows (dicts, or the path of a
    history CSV); skipped without matplotlib or history."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if isinstance(rows, (str, Path)):
        if not Path(rows).is_file():
            return False
        with open(rows, newline="") as f:
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
    atomic_write_bytes(png_path, buffer.getvalue())
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
        with atomic_path(folder / f"{s.name}.png") as tmp:
            kio.write_rgb(tmp, np.concatenate([truth, gap, guess], axis=1))


# ---------------------------------------------------------------------------------- predict
def predict(
    model_path,
    images,
    out,
    *,
    tile_size=None,
    tta=False,
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
    folder, and files already there are replaced only with ``overwrite``. ``nan_policy`` and
    ``strict`` as in :func:`train`. Returns the list of mask paths written.
    """
    images = Path(images)
    out = Path(out)
    if images.is_dir():
        files = kio.list_images(images, "images")
    elif images.is_file():
        if not kio.is_image_file(images):
            raise DataError(f"{images}: not an image file ({', '.join(kio.IMAGE_SUFFIXES)})")
        files = [images]
    else:
        raise DataError(f"{images}: no such file or folder")
    check_separate(out, [("images", _input_folder(images))], "output folder")
    names = {}
    for f in files:
        for name in (f"{f.stem}.png", f"{f.stem}_overlay.png"):
            if name in names:
                raise DataError(f"{names[name]} and {f} would both write {out / name}")
            names[name] = f
    if tile_size is not None and int(tile_size) < 1:
        raise DataError(f"tile size must be >= 1; got {tile_size}")
    if out.is_dir():  # fail fast; checked again under the lock
        check_existing(out, list(names), overwrite)
    model = load_model(model_path)
    outputs, channels, _ = _model_info(model)
    num_classes = 2 if outputs == 1 else outputs
    guesses = Guesses(strict)
    for f in files:  # every image is read and checked before any work
        kio.load_image(f, channels, nan_policy, guesses)
    created = check_writable(out)
    written = []
    try:
        with FolderLock(out):
            removed = clean_stale(out)
            if removed:
                _note(f"{out}: removed {len(removed)} temporary file(s) of an interrupted run")
            replaced = set(check_existing(out, list(names), overwrite))
            for line in guesses.lines():
                _note(line)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
            try:
                for f in files:
                    image = kio.load_image(f, channels, nan_policy)
                    labels = predict_labels(model, image, tile_size=tile_size, tta=tta)
                    mask, over = f"{f.stem}.png", f"{f.stem}_overlay.png"
                    kio.write_mask(staging / mask, labels, num_classes)
                    kio.write_rgb(staging / over, kio.overlay(image, labels, num_classes))
                    _failpoints.reached("predict:staged")
                    with deferred_sigint():  # the overlay, then the mask: published as a pair
                        for name in (over, mask):
                            _publish(staging / name, out / name)
                    written.append(out / mask)
                    fractions = np.bincount(labels.ravel(), minlength=num_classes) / labels.size
                    _say(
                        verbose,
                        f"{f} -> {out / mask} ({labels.shape[1]}x{labels.shape[0]}, "
                        f"foreground {1 - fractions[0]:.1%})",
                    )
            except KeyboardInterrupt:
                raise Interrupted(
                    f"interrupted after {len(written)} of {len(files)} image(s); the files "
                    f"written to {out} are complete"
                ) from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                done = {n for p in written for n in (p.name, f"{p.stem}_overlay.png")}
                if replaced & done:
                    _note(f"--overwrite: replaced {len(replaced & done)} existing file(s) in {out}")
    finally:
        if created and not any(out.iterdir()):
            out.rmdir()
    return written


def _publish(source, target):
    finish(source, target)
    _failpoints.reached(f"predict:published:{target.name}")


# ---------------------------------------------------------------------------------- evaluate
def evaluate(model_path, images, masks, *, tile_size=None, tta=False, nan_policy="error",
             strict=False):  # fmt: skip
    """Dice and IoU per class over every pixel of the folder, and their foreground means.

    Returns ``{"dice": {class: score}, "iou": {...}, "mean_dice": .., "mean_iou": .., "images": n,
    "num_classes": K, "per_image_dice": {name: foreground Dice}}``; means are over classes
    1..K-1. A class absent from both truth and prediction scores 1.0 (as in :mod:`kunet.metrics`).
    ``nan_policy`` and ``strict`` as in :func:`train`.
    """
    model = load_model(model_path)
    outputs, channels, _ = _model_info(model)
    num_classes = 2 if outputs == 1 else outputs
    guesses = Guesses(strict)
    data = load_folder(
        images, masks, num_classes=num_classes, channels=channels, nan_policy=nan_policy,
        guesses=guesses,
    )  # fmt: skip
    for line in guesses.lines():
        _note(line)
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
