"""The folder workflow behind ``kunet train``: a plain function, usable from Python.

``train`` fits a UNet on random augmented patches of a folder dataset into a run folder (best.keras,
last.keras, state.json, history.csv, history.png, overlays/; see :mod:`kunet.run_folder`, which
keeps it consistent whenever the process stops: a kill, Ctrl-C, a full disk). Prediction and
evaluation on folders (``kunet predict | evaluate``) are :mod:`kunet.predict`.

Nothing is lost: bad input raises :class:`kunet.io.DataError` with a one-line message naming the
file before anything is written; the run folder is never an input folder (or inside or around
one); a run already there is replaced only with ``overwrite=True``; NaN/inf pixels are refused
unless ``nan_policy`` says otherwise; what had to be guessed about the data is reported (or refused
with ``strict=True``).

Folders of 3D volumes (NIfTI, ``.npy``, TIFF stacks: :mod:`kunet.volumes`) train a 3D UNet the same
way: a folder holding ``.nii``/``.nii.gz``/``.npy`` files is read as volumes by itself, a folder of
TIFF stacks with ``volumes=True`` (``--3d``).

A folder larger than memory is streamed (``stream``, see :mod:`kunet.data`): it is read once to
check it and to plan (one pair at a time), then training patches, validation tiles, the tuning of
inference and the overlays decode each image when they need it, so memory does not grow with the
number of images. The run is the same as in memory: same plan, same batches, same weights.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from kunet import _failpoints, dispatch, distribute
from kunet import io as kio
from kunet import volumes as kvol
from kunet.augment import Augment
from kunet.callbacks import LearningRateSchedule, NonFiniteError, TerminateOnNonFinite
from kunet.data import (
    PatchDataset,
    TileDataset,
    load_folder,
    memory_budget,
    model_num_classes,
    split,
)
from kunet.io import DataError, Guesses, print_note
from kunet.losses import CEDice
from kunet.outputs import (
    FolderLock,
    Interrupted,
    SigintFlag,
    atomic_path,
    atomic_write_bytes,
    check_separate,
    check_writable,
)
from kunet.plan import (
    DEFAULT_EPOCHS,
    PRECISIONS,
    check_settings,
    fingerprint,
    make_plan,
    read_plan,
    with_preset,
)
from kunet.predict import (
    confusion_counts,
    dice_iou,
    inference_settings,
    load_model,
    normalization_of,
    predict_labels,
)
from kunet.run_folder import RunFolder

OVERLAYS = 4

__all__ = [
    "train",
    "RecordEpochs",
    "TimeBudget",
]


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


# Validation Dice differences smaller than this are within the noise of a held-out set of a few
# images: the later epoch (further down the learning-rate schedule) is then the one kept as best,
# and flip TTA (an ensemble over flips the model trained on) stays on. Picking by such differences
# kept an early checkpoint without TTA and lowered the test Dice (benchmarks/README.md, Quality).
VALIDATION_NOISE = 0.005


class RecordEpochs(keras.callbacks.Callback):
    """Each epoch end: one history row, the best score (``monitor``, mode max) and the checkpoints,
    committed to the :class:`kunet.run_folder.RunFolder` as one unit.

    Keras' ``CSVLogger`` and ``ModelCheckpoint`` write their files one after the other and in place,
    so a kill between (or during) them left a history row the state did not cover, or a torn file.
    """

    def __init__(self, run, state, schedule=None, monitor="val_dice"):
        super().__init__()
        self.run = run
        self.state = state
        self.schedule = schedule
        self.monitor = monitor
        self.seconds = 0.0  # spent committing

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor is None:  # nothing held out to judge by: the latest epoch is the best
            score, improved = None, True
        else:
            score = logs.get(self.monitor)
            score = float(score) if score is not None and math.isfinite(float(score)) else None
            earlier = [h.get(self.monitor) for h in self.state["history"]]
            peak = max((v for v in earlier if v is not None and math.isfinite(v)), default=None)
            # A later, further-annealed epoch is kept unless it is clearly worse than the best one
            improved = score is not None and (peak is None or score >= peak - VALIDATION_NOISE)
        self.state["history"].append({"epoch": epoch, **{k: float(v) for k, v in logs.items()}})
        self.state["epoch"] = epoch + 1
        if improved:
            self.state.update(best_score=score, best_epoch=epoch + 1, monitor=self.monitor)
        if self.schedule is not None:  # where a resumed run's learning rate continues from
            self.state["schedule_progress"] = round(self.schedule.progress, 6)
        began = time.monotonic()
        self.run.commit(self.model, self.state, improved=improved)
        self.seconds += time.monotonic() - began


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


class Stopwatch(keras.callbacks.Callback):
    """Where fit's time goes: training steps (with the wait for their batches) and validation."""

    def __init__(self):
        super().__init__()
        self.training = self.validation = 0.0
        self.steps = 0
        self._t = None

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        self.training += time.monotonic() - self._t
        self.steps += 1

    def on_test_begin(self, logs=None):
        self._t = time.monotonic()

    def on_test_end(self, logs=None):
        self.validation += time.monotonic() - self._t


# ---------------------------------------------------------------------------------- helpers
def tune_inference(model, samples, plan, num_classes):
    """Resolve a plan's "auto" TTA and small-object removal by measuring them on ``samples`` (the
    held-out validation images, in memory or streamed: read one at a time). Small-object removal is
    kept only where it raises the Dice; flip TTA, for a model trained on flips, unless it lowers the
    Dice by more than ``VALIDATION_NOISE`` (with no images to measure on: removal off, TTA on when
    training augmented with flips)."""
    plan = {**plan, "settings": dict(plan["settings"]), "reasons": dict(plan.get("reasons", {}))}
    s, reasons = plan["settings"], plan["reasons"]
    tile = s["tile_size"]
    if not samples:
        # flips averaged over a model trained on flips: an ensemble, not a bet
        if s["tta"] == "auto":
            s["tta"] = s["augmentation"] != "none"
            reasons["tta"] = (
                "no held-out images to measure it on; on, as the model was trained on flips"
                if s["tta"]
                else "no held-out images to measure it on, and no flips in training: off"
            )
        if s["min_component_size"] == "auto":
            s["min_component_size"] = {}
            reasons["min_component_size"] = "no held-out images to measure it on: off"
        return plan

    def dice(tta, sizes=None):
        totals = np.zeros((3, num_classes))
        for smp in samples:
            image, mask = _arrays(smp)
            pred = predict_labels(model, image, tile, tta, min_sizes=sizes)
            totals += confusion_counts(pred.ravel(), mask.ravel(), num_classes)
        return float(dice_iou(*totals)[0][1:].mean())

    base = dice(False)
    if s["tta"] == "auto":
        flipped = dice(True)
        if s["augmentation"] != "none":  # on unless it clearly hurts
            s["tta"] = flipped >= base - VALIDATION_NOISE
        else:  # a model that never saw a flip: on only where it helps
            s["tta"] = flipped > base + 0.001
        reasons["tta"] = f"validation Dice {base:.4f} without, {flipped:.4f} with flips"
        base = flipped if s["tta"] else base
    if s["min_component_size"] == "auto":
        objects = plan.get("fingerprint", {}).get("objects", {})
        sizes = {c: int(o["p5_area"] // 2) for c, o in objects.items() if o["p5_area"] >= 4}
        cleaned = dice(s["tta"], sizes) if sizes else base
        keep = bool(sizes) and cleaned > base + 0.001
        s["min_component_size"] = sizes if keep else {}
        reasons["min_component_size"] = (
            f"validation Dice {base:.4f}, {cleaned:.4f} without objects under {sizes} px"
            if sizes
            else "objects too small to filter"
        )
    return plan


def _arrays(sample):
    """(image, mask) of a :class:`kunet.data.Sample` or :class:`kunet.data.StreamedSample` (decoded
    now), or of any object with ``image`` and ``mask``."""
    load = getattr(sample, "load", None)
    return load() if load is not None else (sample.image, sample.mask)


def _say(verbose, *parts):
    if verbose:
        print(*parts, flush=True)


# ---------------------------------------------------------------------------------- train
RESUME_SETTINGS = ("epochs", "time_budget")  # what a resumed run may change


def train(
    images,
    masks,
    out,
    *,
    plan=None,
    settings=None,
    num_classes=None,
    time_budget=None,
    epochs=None,
    patch_size=None,
    batch_size=None,
    val_split=None,
    filters=None,
    patches_per_epoch=None,
    seed=0,
    resume=False,
    overwrite=False,
    nan_policy="error",
    strict=False,
    verbose=1,
    volumes=None,
    model=None,
    precision=None,
    stream="auto",
    workers=None,
    devices=None,
    coordinator=None,
    num_processes=None,
    process_id=None,
):
    """Train a UNet on the ``images``/``masks`` folders into the run folder ``out``.

    The run's settings come from a plan (:mod:`kunet.plan`): ``plan`` (a plan file or dict), else
    one derived from the data and ``time_budget`` here. ``settings`` ({name: value}) and the
    keyword arguments ``epochs``, ``patch_size``, ``batch_size``, ``val_split``, ``filters``,
    ``patches_per_epoch`` override it; the plan used is saved in ``out/plan.json``.

    ``epochs`` is the total number of epochs of the run (a resumed run continues up to it).
    ``time_budget`` (seconds, from the call) stops training, keeping the best checkpoint; the
    learning rate anneals to its end as the budget runs out. ``resume`` continues the run in
    ``out`` (only ``epochs`` and ``time_budget`` may change); without it a folder already holding a
    run is refused unless ``overwrite`` (then that run's files are replaced). ``nan_policy``: NaN/inf
    pixels are an error ('error'), set to 0 ('zero') or passed on ('ignore'). ``strict``: refuse to
    guess (the number of classes, channel conversions, 0/255 masks) instead of saying what was
    guessed. ``volumes``: the folders hold 3D volumes (None: when ``images`` holds NIfTI or
    ``.npy`` files; True is needed for TIFF stacks). ``model``: a :func:`kunet.presets.names`
    architecture (the plan's ``model`` setting; its filters replace the plan's unless ``filters``
    is given). ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (the plan's ``precision``
    setting: the UNet's ``dtype_policy``, :data:`kunet.plan.PRECISIONS`). ``stream``: hold the decoded images in memory (False), stream them from disk (True:
    memory does not grow with their number), or "auto" (default): stream when they would take more
    than :func:`kunet.data.memory_budget`; the run is the same either way. ``workers``: threads
    preparing training batches ahead (default: none in memory, 2 streamed; the batches, and so
    the run, are the same with any number).

    ``devices``: train data-parallel on that many devices (:mod:`kunet.distribute`: JAX or
    TensorFlow; the GPUs, else the CPU split into that many); the plan's batch size is the global
    batch, split evenly over them, so the run is the same optimization as on one device.
    ``coordinator`` (``"host:port"`` of process 0), ``num_processes`` and ``process_id``: one of
    several JAX processes training together (each with ``devices`` devices, default all of its
    own; same data, settings and seed in every process); process 0 writes ``out``, the others a
    temporary folder they remove.

    Returns a summary dict (best validation Dice and epoch, epochs done, seconds, paths, where the
    time went). Raises :class:`kunet.outputs.Interrupted` (a KeyboardInterrupt) after Ctrl-C, with
    the run folder consistent and resumable, and :class:`kunet.callbacks.NonFiniteError` when the
    loss or the weights became NaN/inf (the folder keeps the last good epoch).
    """
    start = time.monotonic()
    try:  # first: JAX's processes join, and the CPU is split, before the framework starts
        parallel = distribute.scope_for(
            devices, coordinator=coordinator, num_processes=num_processes, process_id=process_id
        )
    except (ValueError, RuntimeError) as e:
        raise DataError(str(e)) from None
    scratch = None
    if parallel.process_id > 0:  # only process 0 writes the run folder
        if resume:
            raise DataError(
                "--resume with several processes is not supported yet: resume in one process, "
                "or start the run again"
            )
        scratch = Path(tempfile.mkdtemp(prefix=f"kunet-process{parallel.process_id}-"))
        out, overwrite = scratch / "run", False
    try:
        return _train(
            images, masks, out, parallel, start, plan=plan, settings=settings,
            num_classes=num_classes, time_budget=time_budget, epochs=epochs,
            patch_size=patch_size, batch_size=batch_size, val_split=val_split, filters=filters,
            patches_per_epoch=patches_per_epoch, seed=seed, resume=resume, overwrite=overwrite,
            nan_policy=nan_policy, strict=strict, verbose=verbose, volumes=volumes, model=model,
            precision=precision, stream=stream, workers=workers,
        )  # fmt: skip
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _train(images, masks, out, parallel, start, *, plan, settings, num_classes, time_budget,
           epochs, patch_size, batch_size, val_split, filters, patches_per_epoch, seed, resume,
           overwrite, nan_policy, strict, verbose, volumes, model, precision, stream,
           workers):  # fmt: skip
    overrides = dict(settings or {})
    named = {"epochs": epochs, "patch_size": patch_size, "batch_size": batch_size,
             "val_split": val_split, "patches_per_epoch": patches_per_epoch,
             "time_budget": time_budget}  # fmt: skip
    overrides.update({k: v for k, v in named.items() if v is not None})
    if filters is not None:
        overrides["filters"] = [int(f) for f in filters]
    if precision is not None:
        overrides["precision"] = precision
    if model is not None:
        from kunet import presets

        if model not in presets.names():
            raise DataError(
                f"--model {model!r}: unknown preset; the presets are: {', '.join(presets.names())}"
            )
        overrides["model"] = model
    check_settings(overrides, "settings")
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
    if resume:
        kept = run_plan(run, state)
        changed = sorted(
            k
            for k, v in overrides.items()
            if k not in RESUME_SETTINGS and kept["settings"].get(k) != v
        )
        if changed or plan is not None:
            raise DataError(
                f"{out}: a resumed run keeps its plan; only {' and '.join(RESUME_SETTINGS)} may "
                f"change (got {', '.join(f'{k}={overrides[k]!r}' for k in changed) or 'a plan'})"
            )
        if num_classes is not None and model_num_classes(num_classes) != model_num_classes(
            state["num_classes"]
        ):
            raise DataError(
                f"{run.state_path}: the run has {state['num_classes']} classes, not {num_classes}"
            )
        plan = kept
    elif plan is not None and not isinstance(plan, dict):
        plan = read_plan(plan)
    guesses = Guesses(strict)
    if volumes is None:
        volumes = kvol.holds_volumes(images)
    if state is not None and state.get("spatial_dims", 2) != (3 if volumes else 2):
        kind = "3D volumes" if state.get("spatial_dims", 2) == 3 else "2D images"
        raise DataError(f"{out}: the run was trained on {kind}; {images} does not hold them")
    loading = time.monotonic()
    data = load_folder(
        images,
        masks,
        num_classes=state["num_classes"] if state else num_classes,
        channels=state["channels"] if state else None,
        nan_policy=nan_policy,
        guesses=guesses,
        normalization=None,  # as the plan says, below
        volumes=volumes,
        stream=stream,
        fingerprint=plan is None,  # planned from the same pass that checks a streamed folder
        workers=workers,
    )
    if plan is None:
        plan = make_plan(
            fingerprint(data),
            time_budget=overrides.get("time_budget"),
            backend=keras.backend.backend(),
            gpu=dispatch.has_accelerator(),
        )
    plan = {**plan, "settings": {**plan["settings"], **overrides}}
    if overrides:
        plan["reasons"] = {
            **plan.get("reasons", {}), **{k: "set by the user" for k in overrides}
        }  # fmt: skip
    if state is None:
        replace = "model" in overrides and "filters" not in overrides
        plan = with_preset(plan, data.spatial_dims, replace_filters=replace)
    check_settings(plan["settings"], "plan")
    try:
        parallel.check_batch_size(int(plan["settings"]["batch_size"]))
    except ValueError as e:
        raise DataError(f"--batch-size: {e}") from None
    if parallel.processes > 1 and plan["settings"].get("time_budget"):
        raise DataError(
            "--time-budget with several processes: each would stop (and set its learning rate) "
            "by its own clock; give --epochs instead"
        )
    data.normalize(*normalization_of(plan), nan_policy)
    loading = time.monotonic() - loading
    created = check_writable(out, "run folder")
    try:
        with FolderLock(out, "run folder"):
            for line in run.recover():
                print_note(f"{out}: {line}")
            if resume:
                state = run.read_state()
                problems = run.problems()
                if problems:
                    raise DataError(f"{out}: cannot resume: {'; '.join(problems)}")
            elif run.holds_run():
                if not overwrite:
                    _refuse_run(out, run)
                print_note(
                    f"--overwrite: removed {run.remove_run()} file(s) of the earlier run in {out}"
                )
            for line in guesses.lines():  # after every check: an error is the only line printed
                print_note(line)
            return _train_locked(
                run, data, state, plan, start, seed=seed, nan_policy=nan_policy, verbose=verbose,
                loading=loading, workers=workers, parallel=parallel,
            )  # fmt: skip
    finally:
        if created and not any(out.iterdir()):
            out.rmdir()  # nothing was committed: leave no empty folder behind


def _make_model(s, data):
    """The run's UNet: the plain one, or the plan's ``model`` preset, for the data's dimensions."""
    from kunet.model import UNet

    dims = data.spatial_dims
    args = {
        "num_classes": data.model_num_classes,
        "filters": tuple(s["filters"]),
        "input_shape": (None,) * dims + (data.channels,),
        "bn_momentum": s["bn_momentum"],
        "dtype_policy": PRECISIONS[s.get("precision", "fp32")],
    }
    if dims == 3:
        args["spatial_dims"] = 3
    if not s.get("model"):
        return UNet(**args)
    from kunet import presets

    if "filters" not in presets.config(s["model"]):  # a pretrained encoder sets its own
        del args["filters"]
    try:
        return UNet.from_preset(s["model"], **args)
    except Exception as e:  # noqa: BLE001 - a preset that cannot be built here (weights offline, ...)
        message = " ".join(str(e).split())[:300]
        raise DataError(f"--model {s['model']}: {type(e).__name__}: {message}") from None


def run_plan(run, state):
    """The plan a run was trained with (``plan.json``; a kunet 0.1.0 run has none: its state's
    settings with this version's defaults for the rest)."""
    path = run.path / "plan.json"
    pending = (state.get("pending") or {}).get("plan.json")
    if pending and (run.path / pending).is_file():  # committed, its rename not done yet
        path = run.path / pending
    if path.is_file():
        return read_plan(path)
    settings = make_plan(_legacy_fingerprint(state))["settings"]
    settings.update(
        normalization="percentile", intensity_range=None, batch_dice=False,
        filters=list(state["filters"]), patch_size=state["patch_size"],
        batch_size=state["batch_size"], epochs=DEFAULT_EPOCHS, schedule="constant",
        learning_rate=1e-3, warmup=0.0, augmentation="heavy", foreground=1 / 3,
        tta=False, min_component_size={}, val_split=0.2,
    )  # fmt: skip
    return {"kunet_plan": 1, "settings": settings, "fingerprint": {}, "reasons": {}}


def _legacy_fingerprint(state):
    side = float(state["patch_size"])
    return {
        "images": len(state.get("train_images", [])) + len(state.get("val_images", [])),
        "height": {"median": side}, "width": {"median": side}, "pixels": int(side * side),
        "class_fractions": [0.5] * state["num_classes"],
        "intensity": {"p1": 0.0, "p99": 1.0, "per_image_p1": [0.0, 0.0], "as_stored": False},
    }  # fmt: skip


def _refuse_run(out, run):
    raise DataError(
        f"{out} already holds a run ({kio.show(run.holds_run())}); pass --resume to continue "
        "it, --overwrite to replace it, or choose another output folder"
    )


def _train_locked(run, data, state, plan, start, *, seed, nan_policy, verbose, loading, workers,
                  parallel):  # fmt: skip
    out = run.path
    s = plan["settings"]
    keras.utils.set_random_seed(seed)
    train_samples, val_samples = split(data.samples, s["val_split"], seed)
    files = None
    if state is not None:  # resume: keep the run's own validation images when they are all there
        by_name = {smp.name: smp for smp in data.samples}
        names = state.get("val_images") or []
        if names and all(name in by_name for name in names):
            val_samples = [by_name[name] for name in names]
            train_samples = [x for x in data.samples if x.name not in set(names)] or val_samples
        with parallel.scope():  # the variables are laid out on the devices as they are made
            model = load_model(out / "last.keras")
    held_out = val_samples != train_samples
    if state is None:
        with parallel.scope():
            model = _make_model(s, data)
            model.compile(
                optimizer=keras.optimizers.Adam(s["learning_rate"]),
                loss=CEDice(
                    ce_weight=s["ce_weight"],
                    dice_weight=s["dice_weight"],
                    batch_dice=s["batch_dice"],
                ),
            )
        state = {
            "epoch": 0,
            "best_score": None,
            "best_epoch": None,
            "monitor": "val_dice" if held_out else None,
            "num_classes": data.num_classes,
            "channels": data.channels,
            "filters": list(s["filters"]),
            "spatial_dims": data.spatial_dims,
            "patch_size": int(s["patch_size"]),
            "batch_size": int(s["batch_size"]),
            "seed": int(seed),
            "train_images": [x.name for x in train_samples],
            "val_images": [x.name for x in val_samples],
            "history": [],
        }
        files = {"plan.json": (json.dumps(plan, indent=1) + "\n").encode()}
    initial_epoch = state["epoch"]
    what = "volume(s)" if data.spatial_dims == 3 else "image(s)"
    _say(
        verbose,
        f"kunet: {len(data.samples)} {what} ({len(train_samples)} train, {len(val_samples)} "
        f"validation), {data.num_classes} classes, {data.channels} channel(s); patches "
        f"{s['patch_size']} x {s['batch_size']}, "
        + (f"model {s['model']}, " if s.get("model") else "")
        + f"filters {s['filters']}, augmentation {s['augmentation']}; run folder {out}",
    )
    if data.streamed:
        _say(
            verbose,
            f"kunet: streaming the images from disk ({data.decoded_bytes / 2**30:.2f} GiB decoded; "
            f"the budget for holding them is {memory_budget() / 2**30:.2f} GiB)",
        )
    if parallel.replicas > 1:
        _say(verbose, f"kunet: data parallel: {parallel.describe()}")
    if not held_out:
        _say(
            verbose,
            "kunet: no images held out for validation (too few, or --val-split 0): every image "
            "trains, and best.keras is the latest epoch",
        )
    epochs = s["epochs"]
    if initial_epoch >= epochs:
        _say(verbose, f"kunet: the run already has {initial_epoch} epochs (--epochs {epochs})")
    train_ds = PatchDataset(
        train_samples,
        data.num_classes,
        patch_size=s["patch_size"],
        batch_size=s["batch_size"],
        patches_per_epoch=s["patches_per_epoch"],
        augment=Augment.level(s["augmentation"]),
        foreground=s["foreground"],
        seed=seed,
        prefetch=workers,
    )
    train_ds.epoch = initial_epoch
    # JAX: batches cut to a multiple of the devices, and to this process's part of each
    train_ds = parallel.batches(train_ds)
    # Validation tiles each held-out image in turn; a streamed one is decoded once for its tiles.
    val_ds = TileDataset(val_samples, data.num_classes, s["patch_size"], s["batch_size"])
    val_ds = parallel.batches(val_ds) if held_out else None
    if files is not None:
        # Epoch 0, with the plan: a run killed in its first epoch resumes from here. The optimizer
        # is built first so its (zero) state is saved too and loads without Keras' "skipping".
        with parallel.scope():
            model.optimizer.build(model.trainable_variables)
        run.commit(model, state, files=files)

    budget = s["time_budget"]
    timer = TimeBudget(budget, start=start) if budget else None
    clock = Stopwatch()
    schedule = LearningRateSchedule(
        s["learning_rate"], warmup=s["warmup"], final=s["final_lr"], shape=s["schedule"],
        budget=budget, start=start, epochs=epochs,
        resumed_from=state.get("schedule_progress", 0.0) if budget else 0.0,
    )  # fmt: skip
    stop = None
    with SigintFlag() as flag:
        # The NaN guard first: an epoch whose weights went NaN is never committed.
        record = RecordEpochs(run, state, schedule, monitor="val_dice" if held_out else None)
        callbacks = [TerminateOnNonFinite(), schedule, clock, record, _StopOnSigint(flag, state)]
        if timer is not None:
            callbacks.append(timer)
        if _failpoints.active():
            callbacks.append(_Failpoints())
        try:
            if initial_epoch < epochs:
                with parallel.scope():  # JAX: the batches are laid out on the devices in fit
                    model.fit(
                        train_ds,
                        validation_data=val_ds,
                        epochs=epochs,
                        initial_epoch=initial_epoch,
                        callbacks=callbacks,
                        verbose=verbose,
                        # PatchDataset orders each epoch from (seed, epoch); Keras' own shuffle of
                        # the batch order draws from Python's global RNG, which a resumed run
                        # cannot replay
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
        except Exception:
            # A streamed file that became unreadable since the folder was checked: the dataset's
            # own DataError (naming the file), which tf.data would have wrapped in its own type.
            failed = next((d.error for d in (train_ds, val_ds) if d and d.error), None)
            if failed is None:
                raise
            raise failed from None
        finally:
            # An epoch cut short leaves a data iterator alive; collect it now, not at interpreter
            # exit (where TensorFlow logs an error finalizing it).
            gc.collect()
    if isinstance(stop, Interrupted) and verbose:
        print(flush=True)  # end the progress bar's line
    trained = time.monotonic() - start
    plot_history(state["history"], out / "history.png")
    if (out / "best.keras").is_file():
        best = load_model(out / "best.keras")
        if stop is None:
            plan = tune_inference(best, val_samples if held_out else [], plan, data.num_classes)
            atomic_write_bytes(out / "plan.json", (json.dumps(plan, indent=1) + "\n").encode())
        write_overlays(best, val_samples[:OVERLAYS], data.num_classes, out / "overlays", plan)
    summary = {
        "best_val_dice": state.get("best_score"),
        "best_epoch": state.get("best_epoch"),
        "epochs": state["epoch"],
        "seconds": round(time.monotonic() - start, 1),
        "stopped_by_time_budget": bool(timer and timer.stopped),
        "best_model": str(out / "best.keras"),
        "steps": clock.steps,
        "time": {
            "data loading": round(loading, 1),
            "training": round(clock.training, 1),
            "validation": round(clock.validation, 1),
            "checkpoints": round(record.seconds, 1),
        },
    }
    summary["time"]["other"] = round(max(0.0, trained - sum(summary["time"].values())), 1)
    _say(
        verbose,
        f"kunet: {summary['epochs']} epoch(s) in {summary['seconds']} s"
        + (" (time budget reached)" if summary["stopped_by_time_budget"] else "")
        + (
            f"; kept: validation Dice {_fmt(summary['best_val_dice'])} (the latest epoch within "
            f"{VALIDATION_NOISE} of the best), epoch "
            if held_out
            else "; no validation images: the latest epoch, "
        )
        + f"{summary['best_epoch']} -> {summary['best_model']}",
    )
    _say(
        verbose,
        f"kunet: where the {trained:.0f} s of training went: "
        + ", ".join(f"{k} {v:g} s" for k, v in summary["time"].items())
        + f" ({clock.steps} steps)",
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


def write_overlays(model, samples, num_classes, folder, plan=None):
    """For each sample, ``<name>.png``: truth overlay | prediction overlay, side by side (for a
    volume, of the slice holding the most foreground)."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    tile, tta, sizes = inference_settings(plan)
    for s in samples:
        image, mask = _arrays(s)
        pred = predict_labels(model, image, tile, tta, min_sizes=sizes)
        if image.ndim == 4:  # a volume: the slice with the most foreground
            k = int(np.argmax((mask > 0).sum(axis=(1, 2))))
            image, mask, pred = image[k], mask[k], pred[k]
        truth = kio.overlay(image, mask, num_classes)
        guess = kio.overlay(image, pred, num_classes)
        gap = np.full((truth.shape[0], 4, 3), 255, dtype="uint8")
        with atomic_path(folder / f"{s.name}.png") as tmp:
            kio.write_rgb(tmp, np.concatenate([truth, gap, guess], axis=1))
