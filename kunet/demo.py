"""Train a small UNet on synthetic nuclei images on the current Keras backend and report its Dice.

``kunet demo`` generates a synthetic fluorescence-microscopy segmentation set
(:func:`kunet.synthetic.make_nuclei`: textured nuclei, debris, out-of-focus ghosts, uneven
illumination, blur and noise, exact masks), trains a small :class:`kunet.UNet` with ``fit`` (Keras
progress bar, validation every epoch), then prints the validation Dice next to a global-threshold
(Otsu) baseline, and writes ``OUT/model.keras`` and ``OUT/demo.png`` (image | truth | prediction for
a few validation images). The backend is Keras' own choice: ``KERAS_BACKEND=jax kunet demo``.

The defaults reach a validation Dice above 0.90 within about 3 minutes on a 2-core CPU on every
backend (measured times per backend: benchmarks/README.md). ``--time-budget`` (default 170 s from
start-up) stops training after an epoch when one more epoch would overrun it, so a slow or busy
machine still finishes in about 3 minutes.

``kunet demo --3d`` does the same in 3D: a small 3D UNet trained on
:func:`kunet.synthetic.make_blobs3d` volumes (ellipsoids in noise under a smooth intensity
variation), its validation Dice next to the Otsu baseline's; ``demo.png`` shows, per validation
volume, the slice with the most foreground. Its defaults differ (``--help`` gives both), its time
budget among them: 3D convolutions are slower on a CPU under some backends (benchmarks/README.md).
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np

from kunet import synthetic
from kunet.model import UNet
from kunet.outputs import (
    FolderLock,
    atomic_path,
    atomic_save_model,
    check_existing,
    check_writable,
    clean_stale,
)

# The defaults of ``kunet demo``'s options, which :mod:`kunet.cli` defines.
DEFAULTS = {
    "out": "kunet_demo",
    "samples": 512,
    "val_samples": 64,
    "size": 64,
    "epochs": 5,
    "batch_size": 8,
    "filters": (8, 16, 32),
    "learning_rate": 3e-3,
    "seed": 0,
    "time_budget": 170.0,
    "examples": 4,
}
# ``kunet demo --3d``: what differs from DEFAULTS.
DEFAULTS_3D = {
    "samples": 48,
    "val_samples": 16,
    "size": 32,
    "epochs": 6,
    "batch_size": 2,
    "filters": (8, 16, 32),
    "learning_rate": 5e-3,
    "time_budget": 300.0,
}
OUTPUTS = ("model.keras", "demo.png")


def defaults(three_d=False):
    """The demo's default options (2D, or ``kunet demo --3d``'s)."""
    return {**DEFAULTS, **(DEFAULTS_3D if three_d else {})}


class TimeBudget(keras.callbacks.Callback):
    """Stops ``fit`` after an epoch when one more epoch (as long as the last) would end past ``deadline``.

    ``deadline`` is a ``time.perf_counter()`` reading. ``stopped_at`` is the number of epochs run
    when it stopped training, else None.
    """

    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline
        self.stopped_at = None
        self._began = None

    def on_epoch_begin(self, epoch, logs=None):
        self._began = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        if now + (now - self._began) > self.deadline:
            self.model.stop_training = True
            self.stopped_at = epoch + 1


def _panel(array, zoom):
    from PIL import Image

    pixels = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")
    return image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)


def save_figure(path, images, truth, prediction, zoom=4):
    """Write a PNG with one row per image: image | truth | prediction, each ``zoom`` x enlarged.

    ``images`` (N, H, W, C) in [0, 1] (channel 0 is drawn); ``truth`` and ``prediction`` (N, H, W)
    in {0, 1}. The width is ``3 * W * zoom``, the height ``N * H * zoom``. When ``zoom > 1`` a
    one-pixel grey line is drawn over the first pixel column / row of every panel after the first,
    to tell the panels apart. Written atomically (temporary file, then ``os.replace``).
    """
    from PIL import Image, ImageDraw

    n, h, w = truth.shape
    sheet = Image.new("L", (3 * w * zoom, n * h * zoom))
    for i in range(n):
        for j, plane in enumerate((images[i, ..., 0], truth[i], prediction[i])):
            sheet.paste(_panel(np.asarray(plane, np.float32), zoom), (j * w * zoom, i * h * zoom))
    if zoom > 1:
        draw = ImageDraw.Draw(sheet)
        for j in (1, 2):
            draw.line([(j * w * zoom, 0), (j * w * zoom, sheet.height - 1)], fill=128)
        for i in range(1, n):
            draw.line([(0, i * h * zoom), (sheet.width - 1, i * h * zoom)], fill=128)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def _start_time():
    """The ``time.perf_counter()`` reading that ``--time-budget`` and the reported time count from.

    For a fresh ``kunet demo`` process (Linux, younger than a minute at this point) that is the
    process's start, so interpreter start-up and the Keras and backend imports count too; otherwise
    (``run`` called from a long-lived process such as a test session or a notebook) it is now.
    """
    now = time.perf_counter()
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if 0.0 <= age < 60.0 else now


def run(args) -> int:
    """Generate data, train, report the validation Dice, save the model and the figure.

    ``args``: the options ``kunet demo`` parsed (:mod:`kunet.cli`).

    ``--out`` is checked first: files already there with the demo's names are replaced only with
    ``--overwrite``, and temporary files of an earlier, killed demo are removed.
    """
    start = _start_time()
    for name, value in defaults(getattr(args, "three_d", False)).items():
        if getattr(args, name, None) is None:  # not given: the 2D or the 3D default
            setattr(args, name, value)
    check_writable(args.out, "--out folder")
    with FolderLock(args.out, "--out folder"):
        clean_stale(args.out)
        check_existing(args.out, OUTPUTS, getattr(args, "overwrite", False), "--out folder")
        return _run(args, start)


def _run(args, start):
    backend = keras.backend.backend()
    keras.utils.set_random_seed(args.seed)
    three_d = getattr(args, "three_d", False)

    n = args.samples + args.val_samples
    if three_d:
        what = f"{args.size}^3 volumes"
        images, masks = synthetic.make_blobs3d(n, size=args.size, seed=args.seed)
    else:
        what = f"{args.size}x{args.size} images"
        images, masks = synthetic.make_nuclei(n, size=args.size, seed=args.seed)
    print(
        f"kunet demo: backend {backend}, {args.samples} + {args.val_samples} synthetic {what}, "
        f"filters {tuple(args.filters)}",
        flush=True,
    )
    x_train, y_train = images[: args.samples], masks[: args.samples]
    x_val, y_val = images[args.samples :], masks[args.samples :]

    # A short run: with Keras' default BatchNormalization momentum (0.99) the moving statistics
    # (what validation and predict use) lag behind the weights for the first few hundred steps.
    dims = 3 if three_d else 2
    model = UNet(
        num_classes=1,
        filters=tuple(args.filters),
        input_shape=(None,) * dims + (1,),
        bn_momentum=0.9,
        **({"spatial_dims": 3} if three_d else {}),
    )
    steps = args.epochs * -(-args.samples // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule))

    budget = TimeBudget(start + args.time_budget if args.time_budget > 0 else float("inf"))
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_val, y_val),
        callbacks=[budget],
        verbose=1,
    )
    if budget.stopped_at is not None and budget.stopped_at < args.epochs:
        print(
            f"time budget of {args.time_budget:g} s: stopped after epoch "
            f"{budget.stopped_at}/{args.epochs}"
        )

    logits = model.predict(x_val, batch_size=args.batch_size, verbose=0)
    prediction = (np.asarray(logits)[..., 0] > 0).astype(np.uint8)
    dice = synthetic.dice_score(y_val, prediction)
    baseline = synthetic.otsu_dice(x_val, y_val)

    model_path = os.path.join(args.out, "model.keras")
    atomic_save_model(model, model_path)
    figure_path = os.path.join(args.out, "demo.png")
    k = min(args.examples, len(x_val))
    shown = (x_val[:k], y_val[:k], prediction[:k])
    if three_d:  # per volume, the slice with the most foreground
        slices = [int(np.argmax(y.sum(axis=(1, 2)))) for y in y_val[:k]]
        shown = tuple(np.stack([a[i, s] for i, s in enumerate(slices)]) for a in shown)
    save_figure(figure_path, *shown)

    elapsed = time.perf_counter() - start
    print(f"saved {model_path} and {figure_path}")
    print(f"Otsu threshold baseline Dice: {baseline:.3f}")
    print(f"validation Dice: {dice:.3f} (backend {backend}, {elapsed:.0f} s)", flush=True)
    if args.require_dice is not None and dice < args.require_dice:
        print(f"validation Dice {dice:.3f} is below the required {args.require_dice:g}")
        return 1
    return 0
