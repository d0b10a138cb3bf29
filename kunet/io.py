"""Image and mask files: reading (PNG, JPEG, TIFF; 8/16-bit; grayscale or RGB), normalization, writing.

Everything here is numpy + Pillow; ``tifffile`` is used for TIFF when it is installed (imported lazily),
else Pillow reads the TIFF. Every problem with a file raises :class:`DataError` with a one-line message
that names the file, which the ``kunet`` command prints without a traceback.

Conventions:

* An image is read as float32 ``(H, W, C)`` with C = 1 (grayscale) or 3 (RGB); alpha is dropped and a
  palette image is expanded to RGB. :func:`normalize` maps it to roughly [0, 1] per image.
* A mask is read as int32 ``(H, W)`` class indices: a palette PNG gives its indices, a grayscale or
  16-bit image its values, except that a mask holding only 0 and 255 (or 0 and 65535) is binary
  (-> 0/1). A JPEG mask (lossy) is read as binary: values above 127 are foreground.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DataError(ValueError):
    """Bad input data (a missing, unreadable or inconsistent file); the message names the file."""


def _one_line(text):
    return " ".join(str(text).split())


def is_image_file(path) -> bool:
    path = Path(path)
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder, what="images"):
    """The image files of ``folder`` sorted by name; DataError if it is missing or has none."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what} folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what} path {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(
            f"{what} folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def _read_array(path):
    """The file's pixels as a numpy array, as stored (dtype and palette indices kept), and its mode."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            tifffile = None
        if tifffile is not None:
            try:
                array = np.asarray(tifffile.imread(str(path)))
            except Exception as e:  # noqa: BLE001 - any decoder failure is an unreadable file
                raise DataError(f"{path}: cannot read TIFF ({_one_line(e)})") from None
            if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
                array = np.moveaxis(array, 0, -1)  # planar RGB -> channels last
            return array, "tiff"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                return np.asarray(im), "P"
            if mode in ("1", "L", "LA", "RGB", "RGBA", "I", "F") or mode.startswith("I;16"):
                if mode == "LA":
                    im = im.convert("L")
                if mode == "RGBA":
                    im = im.convert("RGB")
                return np.asarray(im), mode
            return np.asarray(im.convert("RGB")), "RGB"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({_one_line(e)})") from None


def read_image(path):
    """The image at ``path`` as float32 (H, W, C), C = 1 or 3, in its stored value range."""
    path = Path(path)
    array, mode = _read_array(path)
    if mode == "P":
        from PIL import Image

        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise DataError(
            f"{path}: expected a 2D grayscale or RGB image; got an array of shape {array.shape}"
        )
    if array.shape[-1] == 2:  # gray + alpha
        array = array[..., :1]
    if array.shape[-1] == 4:  # RGBA
        array = array[..., :3]
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise DataError(f"{path}: empty image")
    return array.astype("float32")


def read_mask(path):
    """The mask at ``path`` as int32 (H, W) class indices (0/255 masks become 0/1)."""
    path = Path(path)
    array, mode = _read_array(path)
    if array.ndim == 3:
        if array.shape[-1] in (2, 4):
            array = array[..., : array.shape[-1] - 1]
        if array.shape[-1] == 1 or np.all(array == array[..., :1]):
            array = array[..., 0]
        else:
            raise DataError(
                f"{path}: RGB mask with different channels; save masks as class-index "
                "(grayscale or palette) PNGs"
            )
    if array.ndim != 2:
        raise DataError(f"{path}: expected a 2D mask; got an array of shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not (
        np.all(np.isfinite(array)) and np.all(np.mod(array, 1) == 0)
    ):
        raise DataError(f"{path}: mask must hold integer class indices")
    if array.dtype == bool:
        array = array.astype("uint8")
    if array.size and array.min() < 0:
        raise DataError(f"{path}: mask has negative values (min {array.min()})")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        # JPEG is lossy: label values blur. Read it as a binary mask (> half range = foreground).
        return (array > 127).astype("int32")
    if mode != "P":
        values = np.unique(array)
        top = values.max(initial=0)
        if values.size <= 2 and top in (255, 65535) and values.min() in (0, top):
            array = (array == top).astype("uint8")
    return array.astype("int32")


def normalize(image):
    """Per-image normalization to roughly [0, 1]: (x - p1) / (p99 - p1) over all pixels and channels.

    Percentiles rather than min/max make it robust to a few hot pixels; it is the same for 8-bit,
    16-bit and float images, so a model trained on one bit depth predicts on another. A constant image
    becomes all zeros.
    """
    image = np.asarray(image, dtype="float32")
    lo, hi = np.percentile(image, (1.0, 99.0))
    if hi - lo < 1e-6:
        hi2 = float(image.max())
        lo = float(image.min())
        hi = hi2 if hi2 > lo else lo + 1.0
    return ((image - lo) / (hi - lo)).astype("float32")


def to_channels(image, channels, path="image"):
    """``image`` (H, W, C) with ``channels`` channels: gray -> RGB repeats, RGB -> gray luminance."""
    c = image.shape[-1]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if c == 3 and channels == 1:
        weights = np.asarray([0.299, 0.587, 0.114], dtype="float32")
        return (image @ weights)[..., None].astype("float32")
    raise DataError(f"{path}: has {c} channels; the model expects {channels}")


# ---------------------------------------------------------------------------------- writing
PALETTE = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
]


def class_colors(num_classes):
    """RGB uint8 (num_classes, 3): background black, then distinct colours (cycled)."""
    colors = [PALETTE[0]] + [PALETTE[1 + (i % (len(PALETTE) - 1))] for i in range(num_classes - 1)]
    return np.asarray(colors, dtype="uint8")


def write_mask(path, mask, num_classes):
    """Write a class-index mask as a palette PNG: pixel values are class indices, shown in colour."""
    from PIL import Image

    mask = np.asarray(mask)
    if num_classes > 256:
        Image.fromarray(mask.astype("uint16")).save(path)
        return
    im = Image.fromarray(mask.astype("uint8"), mode="P")
    palette = class_colors(max(num_classes, 2))
    if num_classes <= 2:
        palette = np.asarray([(0, 0, 0), (255, 255, 255)], dtype="uint8")
    im.putpalette(palette.reshape(-1).tolist())
    im.save(path)


def display_rgb(image):
    """An image (H, W, C) as uint8 RGB for display, stretched to its 1-99 percentiles."""
    x = normalize(image)
    x = np.clip(x, 0.0, 1.0)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return (x * 255.0 + 0.5).astype("uint8")


def overlay(image, mask, num_classes, alpha=0.45):
    """RGB uint8 picture: ``image`` with each foreground class tinted and outlined in its colour."""
    rgb = display_rgb(image).astype("float32")
    mask = np.asarray(mask)
    colors = class_colors(max(num_classes, 2)).astype("float32")
    fg = mask > 0
    tint = colors[np.clip(mask, 0, len(colors) - 1)]
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * tint[fg]
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge &= fg
    rgb[edge] = tint[edge]
    return rgb.astype("uint8")


def write_rgb(path, rgb):
    from PIL import Image

    Image.fromarray(np.asarray(rgb, dtype="uint8"), mode="RGB").save(path)


# ---------------------------------------------------------------------------------- outputs
def check_writable(folder, what="output folder"):
    """Create ``folder`` if needed and check a file can be written in it; DataError otherwise.

    Returns True when the folder was created here (so a caller can remove it on failure).
    """
    folder = Path(folder)
    created = False
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{what} {folder} exists and is not a folder")
    if not folder.exists():
        try:
            folder.mkdir(parents=True)
            created = True
        except OSError as e:
            raise DataError(
                f"{what} {folder}: cannot create it ({_one_line(e.strerror)})"
            ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".kunet-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise DataError(f"{what} {folder} is not writable ({_one_line(e.strerror)})") from None
    return created


@contextlib.contextmanager
def staged_outputs(folder, what="output folder"):
    """Write outputs into a hidden staging folder inside ``folder``; move them in on success only.

    On any exception the staging folder (and ``folder`` itself, when created here) is removed, so a
    failed command leaves nothing partial behind.
    """
    folder = Path(folder)
    created = check_writable(folder, what)
    staging = Path(tempfile.mkdtemp(prefix=".kunet-staging-", dir=folder))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for item in sorted(staging.rglob("*")):
        if item.is_file():
            target = folder / item.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(item, target)
    shutil.rmtree(staging, ignore_errors=True)


def _umask_mode():
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (``os.replace``).

    Whatever is written to the temporary path appears at ``path`` whole or not at all; on an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_save_model(model, path):
    """``model.save(path)`` through a temporary ``.keras`` file and ``os.replace`` (no torn file)."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
