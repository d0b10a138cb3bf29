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
* NaN/inf pixels are an error naming the file and the count, unless a ``nan_policy`` says otherwise
  ('zero': set to 0, 'ignore': passed on). A NaN in a mask is always an error.
* What had to be guessed (alpha dropped, a channel conversion, a 0/255 or JPEG mask read as binary)
  is noted in a :class:`Guesses` when one is given; ``Guesses(strict=True)`` refuses instead.
* :func:`image_header` and :func:`mask_header` give a file's size (and channels) from its header,
  decoding no pixel: what a streamed folder (:mod:`kunet.data`) checks before it reads the pixels.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DataError(ValueError):
    """Bad input data (a missing, unreadable or inconsistent file); the message names the file."""


def _one_line(text):
    return " ".join(str(text).split())


def show(names, limit=3):
    """``a, b, c and 4 more``: a list of names for a one-line message."""
    names = [str(n) for n in names]
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


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


def _tifffile():
    """The tifffile module, or None where it is not installed (PIL then reads what it can)."""
    try:
        import tifffile
    except ImportError:
        return None
    return tifffile


def _read_array(path):
    """The file's pixels as a numpy array, as stored (dtype and palette indices kept), and its mode."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() in (".tif", ".tiff"):
        tifffile = _tifffile()
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
                return np.asarray(im), mode  # alpha kept: the caller drops it and says so
            return np.asarray(im.convert("RGB")), f"{mode}->RGB"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({_one_line(e)})") from None


# PIL modes whose pixels read_image keeps as one channel (after dropping alpha); every other mode
# gives RGB (a palette or CMYK image is converted, an alpha channel dropped)
_GRAY_MODES = ("1", "L", "LA", "I", "F")


def _layout(path, shape, mode):
    """(height, width, channels) of an array of ``shape`` as :func:`read_image` shapes it."""
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or shape[-1] not in (1, 2, 3, 4):
        stack = " (a 3D stack? read folders of them as volumes: --3d, volumes=True)"
        raise DataError(
            f"{path}: expected a 2D grayscale or RGB image; got an array of shape {tuple(shape)}"
            + (stack if mode == "tiff" and len(shape) >= 3 else "")
        )
    return int(shape[0]), int(shape[1]), {1: 1, 2: 1, 3: 3, 4: 3}[int(shape[-1])]


def _stored_shape(path):
    """The shape of the pixels :func:`_read_array` would return for ``path`` (a TIFF's planar
    RGB moved last; a PIL image's channels from its mode), and the mode, from the header only."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() in (".tif", ".tiff"):
        tifffile = _tifffile()
        if tifffile is not None:
            try:
                with tifffile.TiffFile(str(path)) as tif:
                    shape = tuple(int(n) for n in tif.series[0].shape)
            except Exception as e:  # noqa: BLE001 - any decoder failure is an unreadable file
                raise DataError(f"{path}: cannot read TIFF ({_one_line(e)})") from None
            if len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4):
                shape = (*shape[1:], shape[0])  # planar RGB -> channels last
            return shape, "tiff"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
            mode = im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({_one_line(e)})") from None
    gray = mode in _GRAY_MODES or mode.startswith("I;16")
    return (height, width, 1 if gray else 3), mode


def image_header(path):
    """``(height, width, channels)`` of the image file at ``path`` as :func:`read_image` will give
    them, from the file's header: no pixel is decoded. DataError naming the file when the header
    cannot be read or holds no 2D image (pixels damaged past the header fail when they are read)."""
    shape, mode = _stored_shape(path)
    height, width, channels = _layout(path, shape, mode)
    if height < 1 or width < 1:
        raise DataError(f"{path}: empty image")
    return height, width, channels


def mask_header(path):
    """``(height, width)`` of the mask file at ``path``, from its header (see :func:`image_header`;
    its values are checked when it is read, by :func:`read_mask`)."""
    shape, _ = _stored_shape(path)
    if len(shape) not in (2, 3):
        raise DataError(f"{path}: expected a 2D mask; got an array of shape {shape}")
    return int(shape[0]), int(shape[1])


NAN_POLICIES = ("error", "zero", "ignore")


def check_nan_policy(nan_policy, name="nan_policy"):
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"{name} must be one of {', '.join(NAN_POLICIES)}; got {nan_policy!r}")
    return nan_policy


def count_nonfinite(array) -> int:
    """How many values of ``array`` are NaN or +-inf (0 for integer arrays), without a full-size
    temporary in the common all-finite case."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        return 0
    if np.isfinite(np.sum(array, dtype="float64")):  # float64 cannot overflow on float32 data
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def nonfinite_message(name, count, size):
    return (
        f"{name} holds {count} NaN/inf value(s) (of {size}); fix the data, or choose a NaN policy: "
        "'zero' replaces them with 0, 'ignore' passes them on (nan_policy= / --nan-policy)"
    )


def apply_nan_policy(array, nan_policy="error", name="image", error=DataError):
    """``array`` checked against ``nan_policy``: 'error' raises ``error`` naming ``name`` and the
    count of bad values; 'zero' returns a copy with them replaced by 0; 'ignore' returns it as is."""
    check_nan_policy(nan_policy)
    if nan_policy == "ignore":
        return array
    count = count_nonfinite(array)
    if count == 0:
        return array
    if nan_policy == "error":
        raise error(nonfinite_message(name, count, np.asarray(array).size))
    return np.where(np.isfinite(array), array, 0).astype(np.asarray(array).dtype)


# ---------------------------------------------------------------------------------- guesses
class GuessWarning(UserWarning):
    """kunet had to guess something about the data (number of classes, a channel conversion, a
    mask value mapping); the message says what."""


class Guesses:
    """What was guessed while reading data, one line per kind: "alpha channel dropped: 3 file(s)
    (a.png, b.png, c.png)". With ``strict=True`` the first guess raises :class:`DataError` instead.

    :func:`kunet.data.load_folder` and the ``kunet`` commands report them (the commands print them
    even under ``--quiet``); ``emit()`` issues each line as a :class:`GuessWarning`.
    """

    def __init__(self, strict=False):
        self.strict = bool(strict)
        self._kinds = {}  # text -> [paths], in the order first seen

    def note(self, path, text):
        if self.strict:
            where = f"{path}: " if path else ""
            raise DataError(f"{where}{text}; refused under --strict (strict=True)")
        self._kinds.setdefault(text, []).append(str(path))

    def lines(self):
        out = []
        for text, paths in self._kinds.items():
            names = [Path(p).name for p in paths]
            out.append(f"{text}: {len(paths)} file(s) ({show(names)})" if paths[0] else text)
        return out

    def emit(self):
        for line in self.lines():
            warnings.warn(line, GuessWarning, stacklevel=3)


def print_note(line):
    """Say what kunet guessed or repaired: ``kunet: note: <line>`` on standard error (the commands
    say it even under --quiet)."""
    print(f"kunet: note: {line}", file=sys.stderr, flush=True)


def _note(guesses, path, text):
    if guesses is not None:
        guesses.note(path, text)


def read_image(path, nan_policy="error", guesses=None):
    """The image at ``path`` as float32 (H, W, C), C = 1 or 3, in its stored value range.

    An alpha channel is dropped, and a palette (or CMYK, ...) image converted to RGB, each noted in
    ``guesses`` (:class:`Guesses`). NaN/inf pixels (float TIFFs) follow ``nan_policy``: 'error'
    (default) raises DataError naming the file and the count, 'zero' sets them to 0, 'ignore' keeps
    them.
    """
    path = Path(path)
    array, mode = _read_array(path)
    if mode == "P":
        from PIL import Image

        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    elif "->" in mode:
        _note(guesses, path, f"{mode.split('->')[0]} image converted to RGB")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        _layout(path, array.shape, mode)  # raises, naming the file and the shape
    if array.shape[-1] in (2, 4):  # gray + alpha, RGBA
        kind = "gray+alpha -> gray" if array.shape[-1] == 2 else "RGBA -> RGB"
        _note(guesses, path, f"alpha channel dropped ({kind})")
        array = array[..., :-1]
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise DataError(f"{path}: empty image")
    return apply_nan_policy(array.astype("float32"), nan_policy, str(path))


def class_index_values(array, path):
    """``array`` (a mask read from ``path``) checked to hold class indices: no NaN/inf, integers,
    none negative (DataError naming the file); booleans as uint8."""
    bad = count_nonfinite(array)
    if bad:
        raise DataError(f"{path}: mask holds {bad} NaN/inf value(s); masks hold class indices")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
        raise DataError(f"{path}: mask must hold integer class indices")
    if array.dtype == bool:
        array = array.astype("uint8")
    if array.size and array.min() < 0:
        raise DataError(f"{path}: mask has negative values (min {array.min()})")
    return array


def read_mask(path, guesses=None):
    """The mask at ``path`` as int32 (H, W) class indices (0/255 masks become 0/1, noted in
    ``guesses``)."""
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
    array = class_index_values(array, path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        # JPEG is lossy: label values blur. Read it as a binary mask (> half range = foreground).
        _note(guesses, path, "JPEG mask read as binary (values above 127 -> 1)")
        return (array > 127).astype("int32")
    if mode != "P":
        values = np.unique(array)
        top = values.max(initial=0)
        if values.size <= 2 and top in (255, 65535) and values.min() in (0, top):
            _note(guesses, path, f"mask values 0/{top} read as 0/1 (binary)")
            array = (array == top).astype("uint8")
    return array.astype("int32")


NORMALIZATIONS = ("percentile", "zscore", "dataset")


def normalize(image, nan_policy="error", method="percentile", value_range=None):
    """Normalization of one image, over all its pixels and channels.

    ``method="percentile"`` (default): (x - p1) / (p99 - p1) of this image, roughly [0, 1].
    Percentiles rather than min/max make it robust to a few hot pixels; it is the same for 8-bit,
    16-bit and float images, so a model trained on one bit depth predicts on another. A constant
    image becomes all zeros. ``method="zscore"``: clipped to the 0.5-99.5th percentiles, then
    (x - mean) / std of this image. ``method="dataset"``: (x - lo) / (hi - lo) with the same
    ``value_range=(lo, hi)`` for every image (a dataset's 1st and 99th percentiles), which keeps
    the intensities of tiles from one scene comparable. NaN/inf pixels follow ``nan_policy``:
    'error' (default) raises ValueError, 'zero' sets them to 0 in the result, 'ignore' leaves them
    NaN/inf; either way the statistics are taken over the finite pixels only.
    """
    check_nan_policy(nan_policy)
    if method not in NORMALIZATIONS:
        raise ValueError(f"method must be one of {', '.join(NORMALIZATIONS)}; got {method!r}")
    if method == "dataset" and (value_range is None or len(value_range) != 2):
        raise ValueError("method='dataset' needs value_range=(lo, hi)")
    image = np.asarray(image, dtype="float32")
    bad = count_nonfinite(image)
    if bad and nan_policy == "error":
        raise ValueError(nonfinite_message("image", bad, image.size))
    finite = image[np.isfinite(image)] if bad else image
    if method == "dataset":
        lo, hi = float(value_range[0]), float(value_range[1])
        hi = hi if hi > lo else lo + 1.0
    elif finite.size == 0:
        lo, hi = 0.0, 1.0
    elif method == "zscore":
        clip = np.percentile(finite, (0.5, 99.5))
        clipped = np.clip(finite, *clip)
        lo, hi = float(clipped.mean()), float(clipped.mean() + max(clipped.std(), 1e-6))
        image = np.clip(image, *clip)
    else:
        lo, hi = np.percentile(finite, (1.0, 99.0))
        if hi - lo < 1e-6:
            hi2 = float(finite.max())
            lo = float(finite.min())
            hi = hi2 if hi2 > lo else lo + 1.0
    out = np.empty(image.shape, dtype="float32")
    rows = max(1, (1 << 20) // max(1, math.prod(image.shape[1:])))  # ~1M values at a time
    with np.errstate(invalid="ignore"):
        for i in range(0, max(1, image.shape[0]), rows):  # (float64 when lo, hi are: in chunks)
            out[i : i + rows] = (image[i : i + rows] - lo) / (hi - lo)
    if bad and nan_policy == "zero":
        out[~np.isfinite(out)] = 0.0
    return out


def to_channels(image, channels, path="image", guesses=None):
    """``image`` (H, W, C) with ``channels`` channels: gray -> RGB repeats, RGB -> gray luminance
    (each noted in ``guesses``)."""
    c = image.shape[-1]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        _note(
            guesses, path, "gray image repeated to 3 channels (RGB model or RGB images beside it)"
        )
        return np.repeat(image, 3, axis=-1)
    if c == 3 and channels == 1:
        _note(guesses, path, "RGB image converted to gray (luminance) for a 1-channel model")
        weights = np.asarray([0.299, 0.587, 0.114], dtype="float32")
        return (image @ weights)[..., None].astype("float32")
    raise DataError(f"{path}: has {c} channels; the model expects {channels}")


def load_image(
    path, channels=None, nan_policy="error", guesses=None, normalization="percentile",
    value_range=None,
):  # fmt: skip
    """What training and prediction feed the model for the file ``path``: read, checked for NaN/inf
    (``nan_policy``), converted to ``channels`` (None: as stored) and normalized (:func:`normalize`
    with ``method=normalization`` and ``value_range``)."""
    check_nan_policy(nan_policy)
    image = read_image(path, "error" if nan_policy == "error" else "ignore", guesses)
    if channels is not None:
        image = to_channels(image, channels, path, guesses)
    return normalize(image, nan_policy, normalization, value_range)


def image_dtype(path):
    """The stored pixel type of an image file ("uint8", "uint16", "float32", ...), cheaply."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                return str(tif.pages[0].dtype)
        except Exception:  # noqa: BLE001 - unknown is an answer here
            return "unknown"
    from PIL import Image

    with Image.open(path) as im:
        return {"I;16": "uint16", "I;16B": "uint16", "I": "int32", "F": "float32"}.get(
            im.mode, "uint8"
        )


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
    np.clip(x, 0.0, 1.0, out=x)
    x *= 255.0
    x += 0.5
    x = x.astype("uint8")
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def overlay(image, mask, num_classes, alpha=0.45):
    """RGB uint8 picture: ``image`` with each foreground class tinted and outlined in its colour.

    Only the foreground pixels are blended (in float32), so a large image costs little more than
    its uint8 picture."""
    rgb = display_rgb(image)
    mask = np.asarray(mask)
    colors = class_colors(max(num_classes, 2)).astype("float32")
    fg = mask > 0
    tint = colors[np.clip(mask[fg], 0, len(colors) - 1)]
    rgb[fg] = ((1 - alpha) * rgb[fg].astype("float32") + alpha * tint).astype("uint8")
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge &= fg
    rgb[edge] = colors[np.clip(mask[edge], 0, len(colors) - 1)].astype("uint8")
    return rgb


def write_rgb(path, rgb):
    from PIL import Image

    Image.fromarray(np.asarray(rgb, dtype="uint8"), mode="RGB").save(path)


_MOVED_TO_OUTPUTS = ("atomic_path", "atomic_write_bytes", "atomic_save_model", "check_writable")


def __getattr__(name):
    """The writing helpers moved to :mod:`kunet.outputs`; their old names here still work."""
    if name in _MOVED_TO_OUTPUTS:
        from kunet import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
