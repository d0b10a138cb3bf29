"""Overlap-tile inference: predict an image or a volume of any size one batch of tiles at a time.

Works for 2D models (input (N, H, W, C): images (H, W, C)) and 3D models (input (N, D, H, W, C):
volumes (D, H, W, C)); the model's input rank (or its ``spatial_dims``) decides which. Tiles of
``tile_size`` overlap by a fraction ``overlap``; each tile's prediction is weighted by a window
(``"gaussian"``: centre pixels, which saw their whole context, count most; ``"constant"``: plain
average) and the weighted sum is divided by the summed weights.

Memory: the tiles are predicted row of tiles by row of tiles (slab by slab in 3D), one batch at a
time. The weighted sums are kept for one row of tiles only (a band one tile high and the image's
width, and its summed weights); the rows the next row of tiles does not reach are final: they are
divided by their weights and written to the output, and the band moves down. So besides the output
itself, memory is one batch of tiles plus one band. The image may be a numpy memmap
(``np.load(path, mmap_mode="r")``) and the output one too (``out=``: an array or memmap, or the
path of an ``.npy`` file to create): tiles are read as they are needed, finished rows written as
they are done, and the pages of a memmap already read or written are handed back to the kernel,
so an image and a probability map far larger than memory are predicted in bounded memory.

Example:
    >>> image = kunet.io.normalize(kunet.io.read_image("big.tif"))
    >>> probs = kunet.inference.predict_tiled(model, image, tile_size=256)   # (H, W, classes)
    >>> labels = kunet.inference.to_labels(probs)                            # (H, W) int
    >>> slide = np.load("slide.npy", mmap_mode="r")                          # (H, W, C) on disk
    >>> probs = kunet.inference.predict_tiled(model, slide, out="slide_probs.npy")
"""

from __future__ import annotations

import itertools
import math
import mmap
from pathlib import Path

import numpy as np

from kunet.io import apply_nan_policy, count_nonfinite, nonfinite_message
from kunet.tiling import tile_starts

__all__ = [
    "predict_tiled",
    "predict_image",
    "tile_starts",
    "window",
    "to_labels",
    "remove_small_components",
]

_AXES = {2: "H, W", 3: "D, H, W"}  # spatial axis names by number of spatial dims


def window(tile_size, blend="gaussian"):
    """The blending weights of one tile, shaped ``tile_size`` ((h, w) or (d, h, w)): a Gaussian
    (sigma = side / 8 along each axis, peak 1, never below 1e-3) or ones."""
    try:
        sides = tuple(int(s) for s in tile_size)
    except TypeError:
        raise ValueError(f"tile_size must be (h, w) or (d, h, w); got {tile_size!r}") from None
    if len(sides) not in _AXES or min(sides) < 1:
        raise ValueError(
            f"tile_size must be (h, w) or (d, h, w) of positive ints; got {tile_size!r}"
        )
    if blend == "constant":
        return np.ones(sides, dtype="float32")
    if blend != "gaussian":
        raise ValueError(f"blend must be 'gaussian' or 'constant'; got {blend!r}")

    def g(n):
        x = np.arange(n, dtype="float64") - (n - 1) / 2
        return np.exp(-0.5 * (x / (n / 8.0)) ** 2)

    weights = g(sides[0])
    for n in sides[1:]:  # separable: the outer product of one Gaussian per axis
        weights = np.multiply.outer(weights, g(n))
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype("float32")  # no zero weight, even in corners


def _spatial_dims(model):
    """2 or 3: ``model.spatial_dims`` if it has one, else its input rank - 2; 2 when unknown."""
    dims = getattr(model, "spatial_dims", None)
    shape = None
    if dims is None:
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):  # a stand-in object, or a model never built
            inputs = None
        if inputs:
            shape = tuple(inputs[0].shape)
        else:
            shape = getattr(model, "input_shape", None)
            shape = shape if isinstance(shape, tuple) and shape else None
        dims = 2 if shape is None else len(shape) - 2
    if dims not in _AXES:
        where = f"input shape {shape}" if shape is not None else f"spatial_dims={dims!r}"
        raise ValueError(
            f"model must take images (N, H, W, C) or volumes (N, D, H, W, C); got {where}"
        )
    return dims


def _activation(model, activation):
    if activation != "auto":
        return activation
    if getattr(model, "output_activation", "missing") is None:  # a kunet.UNet emitting logits
        return "sigmoid" if int(model.output_shape[-1]) == 1 else "softmax"
    return None


def _activate(y, activation):
    y = y.astype("float32")
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.clip(y, -60, 60)))
    if activation == "softmax":
        e = np.exp(y - y.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if activation in (None, "linear"):
        return y
    raise ValueError(f"activation must be 'auto', 'sigmoid', 'softmax' or None; got {activation!r}")


def _run(model, batch, activation, tta):
    """Model outputs for a batch (N, *spatial, C) -> activated numpy (N, *spatial, K); with tta the
    mean over every combination of flips of the spatial axes (4 in 2D, 8 in 3D)."""

    def once(x):
        return _activate(np.asarray(model.predict_on_batch(x)), activation)

    total = once(batch)
    if not tta:
        return total
    spatial = range(1, batch.ndim - 1)
    flips = [a for r in range(1, len(spatial) + 1) for a in itertools.combinations(spatial, r)]
    for axes in flips:
        total += np.flip(once(np.ascontiguousarray(np.flip(batch, axes))), axes)
    return total / (len(flips) + 1.0)


def _image_shape(model, shape, dims):
    """The (*spatial, C) shape of an image of ``shape`` (a channel axis added to (*spatial)),
    checked against the model's input rank and channels (ValueError naming the shapes)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == dims:
        shape = (*shape, 1)
    if len(shape) != dims + 1:
        kind = "image" if dims == 2 else "volume"
        raise ValueError(
            f"image must be a {kind} ({_AXES[dims]}) or ({_AXES[dims]}, C) for a model taking "
            f"(N, {_AXES[dims]}, C); got shape {shape}"
        )
    input_shape = getattr(model, "input_shape", None)
    want = input_shape[-1] if isinstance(input_shape, tuple) and input_shape else None
    if want is not None and shape[-1] != want:
        raise ValueError(
            f"image has {shape[-1]} channel(s) (shape {shape}) but the model expects "
            f"{want} (input shape {input_shape[1:]}); convert it first, e.g. "
            f"kunet.io.to_channels(image, {want})"
        )
    return shape


def _as_image(model, image, nan_policy, dims):
    """``image`` as float32 (*spatial, C), checked against the model's input rank and channels and
    for NaN/inf."""
    image = np.asarray(image, dtype="float32")
    image = image.reshape(_image_shape(model, image.shape, dims))
    return apply_nan_policy(image, nan_policy, "image", error=ValueError)


def _size_multiple(model):
    """The multiple of which a model's input sides must be: its ``size_multiple`` (kunet.UNet), else
    ``2**len(filters)`` for a model with a ``filters`` list, else 1."""
    multiple = getattr(model, "size_multiple", None)
    if isinstance(multiple, int) and not isinstance(multiple, bool) and multiple >= 1:
        return multiple
    filters = getattr(model, "filters", None)
    return 2 ** len(filters) if isinstance(filters, (list, tuple)) and filters else 1


def _mirror_index(n, size):
    """Indices 0..size-1 mirrored into [0, n-1] (reflection without repeating the edge pixel)."""
    if n == 1:
        return np.zeros(size, dtype=np.int64)
    i = np.arange(size, dtype=np.int64) % (2 * (n - 1))
    return np.where(i > n - 1, 2 * (n - 1) - i, i)


def _mirror_up(image, shape):
    """``image`` (*spatial, C) mirrored at the far end of each spatial axis up to ``shape``."""
    if tuple(shape) == image.shape[:-1]:
        return image
    index = np.ix_(*(_mirror_index(n, s) for n, s in zip(image.shape[:-1], shape, strict=True)))
    return image[index]


def predict_image(model, image, activation="auto", tta=False, nan_policy="error"):
    """Predict a whole image (H, W, C) or volume (D, H, W, C) in one call -> (H, W, K) or
    (D, H, W, K) (probabilities by default).

    A side that is not a multiple of the model's ``size_multiple`` (a kunet UNet's ``2**depth``) is
    mirrored up to one and the output cropped back: the network sees image content at its borders,
    as in training, not the zeros its own in-graph padding would add (which read as dark edges, and
    cost a model trained on patches much of its Dice on sparse objects: benchmarks/README.md).

    The image must have the model's input rank (ValueError naming the expected shape) and channels;
    NaN/inf pixels follow ``nan_policy`` ('error': ValueError with their count, 'zero': set to 0,
    'ignore': passed on). ``tta`` averages over every flip combination of the spatial axes.
    """
    dims = _spatial_dims(model)
    image = _as_image(model, image, nan_policy, dims)
    sides = image.shape[:-1]
    m = _size_multiple(model)
    padded = _mirror_up(image, [-(-n // m) * m for n in sides])
    out = _run(model, padded[None], _activation(model, activation), tta)[0]
    return out[tuple(slice(0, n) for n in sides)]


def _tile_shape(tile_size, dims):
    if np.isscalar(tile_size):
        tile = (tile_size,) * dims
    else:
        tile = tuple(tile_size)
        if len(tile) != dims:
            raise ValueError(
                f"tile_size must be an int or ({_AXES[dims].lower()}) for a model with {dims} "
                f"spatial dimensions; got {tile_size!r}"
            )
    if min(tile) < 1:
        raise ValueError(f"tile_size must be positive; got {tile_size!r}")
    return tuple(int(t) for t in tile)


def predict_tiled(
    model,
    image,
    tile_size=256,
    overlap=0.5,
    blend="gaussian",
    batch_size=4,
    tta=False,
    activation="auto",
    nan_policy="error",
    out=None,
):
    """Predict ``image`` (H, W, C) or volume (D, H, W, C) tile by tile; returns float32 (H, W, K)
    or (D, H, W, K): ``out`` when given.

    Args:
        model: a Keras model mapping (N, h, w, C) to (N, h, w, K), or (N, d, h, w, C) to
            (N, d, h, w, K) (e.g. a ``kunet.UNet``); its input rank (or ``spatial_dims``) says which.
        image: (H, W, C) or (H, W) for a 2D model, (D, H, W, C) or (D, H, W) for a 3D one, already
            normalized as in training (``kunet.io.normalize``). A numpy memmap is read tile by tile
            (any numeric dtype, converted per tile), never whole.
        tile_size: tile side (int) or one side per spatial axis, (h, w) or (d, h, w). A multiple of
            ``2**depth`` of the UNet keeps pooling grids aligned. An image smaller than a tile is
            mirrored up to the tile size.
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        blend: ``"gaussian"`` or ``"constant"`` weighting of overlapping tiles.
        batch_size: tiles per model call: bounds the memory used (the last batch is padded to this
            size, so the model sees one shape only).
        tta: average the predictions of the tile and every flip combination of its spatial axes
            (4 in 2D, 8 in 3D).
        activation: ``"auto"`` (sigmoid/softmax for a kunet.UNet emitting logits, else none),
            ``"sigmoid"``, ``"softmax"`` or None: applied to each tile before blending.
        nan_policy: NaN/inf pixels: ``"error"`` (ValueError with their count, before any tile is
            predicted; a memmap is counted in chunks), ``"zero"`` (set to 0) or ``"ignore"``.
        out: where the probabilities go: None (a new array), a writable float array or memmap of
            shape (H, W, K) / (D, H, W, K), or the path of an ``.npy`` file to create (replaced if
            it exists) as a float32 memmap. Rows are written as soon as they are final.

    The image must have the model's input rank and channels (ValueError otherwise). Memory besides
    ``out``: one batch of tiles and one band of the weighted sums, a row of tiles high (see the
    module docstring); the result equals blending every tile into full-size accumulators.
    """
    dims = _spatial_dims(model)
    image = _as_source(model, image, nan_policy, dims)
    tile = _tile_shape(tile_size, dims)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1); got {overlap!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
    activation = _activation(model, activation)
    sides = tuple(image.shape[:-1])
    # Images smaller than a tile are mirrored up to the tile size, and cropped back at the end.
    padded = tuple(max(n, t) for n, t in zip(sides, tile, strict=True))
    if padded != sides:
        image = _mirror_up(image.read() if isinstance(image, _Lazy) else image, padded)
    weights = window(tile, blend)[..., None]
    starts = [
        tile_starts(n, t, max(1, int(round(t * (1 - overlap)))))
        for n, t in zip(padded, tile, strict=True)
    ]
    corners = itertools.product(*starts)  # row-major: every tile of a row before the next row
    zero = nan_policy == "zero"
    result = band = norm = None
    top = 0  # the first row of the band (the current row of tiles starts there)
    done = 0  # rows of the result written
    while batch_corners := list(itertools.islice(corners, batch_size)):
        batch = np.zeros((batch_size, *tile, image.shape[-1]), dtype="float32")
        for j, corner in enumerate(batch_corners):
            batch[j] = image[tuple(slice(c, c + t) for c, t in zip(corner, tile, strict=True))]
        if zero:
            batch[~np.isfinite(batch)] = 0.0
        pred = _run(model, batch, activation, tta)
        if band is None:
            result = _output(out, sides, pred.shape[-1])
            band = np.zeros((tile[0], *padded[1:], pred.shape[-1]), dtype="float32")
            norm = np.zeros((tile[0], *padded[1:], 1), dtype="float32")
        for j, corner in enumerate(batch_corners):
            if corner[0] != top:  # a new row of tiles: the rows above it are final
                done = _flush(result, band, norm, top, corner[0], sides, done)
                if isinstance(image, _Lazy):  # and the image's rows above it are read
                    image.drop(top, corner[0])
                top = corner[0]
            where = (slice(0, tile[0]), *map(slice, corner[1:], np.add(corner[1:], tile[1:])))
            band[where] += pred[j] * weights
            norm[where] += weights
    _flush(result, band, norm, top, padded[0], sides, done)
    if isinstance(result, np.memmap):
        result.flush()
    return result


class _Lazy:
    """An image read a region at a time: a numpy memmap, or any array-like with ``shape``,
    ``dtype`` and slicing (a zarr or h5py array), seen as float32 (*spatial, C)."""

    def __init__(self, source, shape):
        self.source, self.shape = source, shape
        self.expand = len(source.shape) < len(shape)  # a (*spatial) image: its one channel added

    def __getitem__(self, where):
        region = np.asarray(self.source[where[: len(self.source.shape)]], dtype="float32")
        return region[..., None] if self.expand else region

    def rows(self, start, stop):
        return self[(slice(start, stop),)]

    def read(self):
        return self.rows(0, self.shape[0])

    def drop(self, start, stop):
        _drop_pages(self.source, start, stop)


def _as_source(model, image, nan_policy, dims):
    """``image`` checked against the model as :func:`_as_image` checks it, without copying or
    reading it whole when it is a memmap or another lazy array (:class:`_Lazy`): its NaN/inf are
    then counted in chunks of rows ('error'). 'zero' is applied to each batch of tiles."""
    policy = "ignore" if nan_policy == "zero" else nan_policy
    lazy = not isinstance(image, np.ndarray) or isinstance(image, np.memmap)
    if not lazy or not all(hasattr(image, a) for a in ("shape", "dtype", "__getitem__")):
        return _as_image(model, image, policy, dims)
    source = _Lazy(image, _image_shape(model, image.shape, dims))
    if policy == "error" and np.dtype(image.dtype).kind in "fc":
        rows = max(1, (8 << 20) // max(1, 4 * math.prod(source.shape[1:])))
        bad = 0
        for i in range(0, source.shape[0], rows):
            bad += count_nonfinite(source.rows(i, i + rows))
            source.drop(i, i + rows)
        if bad:
            raise ValueError(nonfinite_message("image", bad, math.prod(source.shape)))
    return source


def _output(out, sides, classes):
    """The array the probabilities are written to (see :func:`predict_tiled`'s ``out``)."""
    shape = (*sides, classes)
    if out is None:
        return np.empty(shape, dtype="float32")
    if isinstance(out, (str, Path)):
        return np.lib.format.open_memmap(Path(out), mode="w+", dtype="float32", shape=shape)
    if not all(hasattr(out, a) for a in ("shape", "dtype", "__setitem__")):
        raise ValueError(f"out must be None, an array or the path of an .npy file; got {out!r}")
    writable = getattr(getattr(out, "flags", None), "writeable", True)
    if tuple(out.shape) != shape or np.dtype(out.dtype).kind != "f" or not writable:
        raise ValueError(
            f"out must be a writable float array of shape {shape} (the image's spatial shape and "
            f"the model's {classes} output channel(s)); got {out.dtype} {tuple(out.shape)}"
            + ("" if writable else ", read-only")
        )
    return out


def _flush(result, band, norm, top, stop, sides, done):
    """Rows ``[top, stop)`` of the band are final: write them (divided by their summed weights,
    cropped to ``sides``) to ``result``, move the band down by ``stop - top`` rows; returns the
    rows of ``result`` written so far."""
    shift = stop - top
    rows = min(stop, sides[0]) - top
    if rows > 0:
        crop = (slice(0, rows), *(slice(0, n) for n in sides[1:]))
        result[top : top + rows] = band[crop] / norm[crop]
        _drop_pages(result, done, top + rows)
        done = top + rows
    band[: len(band) - shift] = band[shift:]
    band[len(band) - shift :] = 0.0
    norm[: len(norm) - shift] = norm[shift:]
    norm[len(norm) - shift :] = 0.0
    return done


def _drop_pages(array, start, stop):
    """Hand back to the kernel the resident pages of rows ``[start, stop)`` of a memmap mapped
    shared (read, or written through to its file), and of the rows before them, which are done
    with too: the next access reads them again from the file, so nothing changes but the memory
    held. Anything else (an array in memory, a copy-on-write memmap) is left alone."""
    mapping = getattr(array, "_mmap", None)
    if mapping is None or getattr(array, "mode", "c") == "c" or not hasattr(mapping, "madvise"):
        return
    stop = min(stop, array.shape[0])
    if stop <= start or array.strides[0] <= 0:
        return
    try:
        base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):  # a closed mapping
        return
    first = array.ctypes.data + start * array.strides[0] - base
    last = array.ctypes.data + stop * array.strides[0] - base
    page = mmap.PAGESIZE
    first, last = max(0, first) // page * page, min(last, len(mapping)) // page * page
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def to_labels(probs, threshold=0.5):
    """Class indices (H, W) or (D, H, W) int32 from probabilities (H, W, K) or (D, H, W, K) (any
    (..., K)): threshold for K == 1, else argmax over the last axis."""
    probs = np.asarray(probs)
    if probs.ndim < 3:
        raise ValueError(
            f"probs must be (H, W, K) or (D, H, W, K), classes last; got shape {probs.shape}"
        )
    if probs.shape[-1] == 1:
        return (probs[..., 0] > threshold).astype("int32")
    return np.argmax(probs, axis=-1).astype("int32")


def remove_small_components(labels, min_sizes):
    """``labels`` (H, W) or (D, H, W) with the connected components of class ``c`` smaller than
    ``min_sizes[c]`` pixels (voxels) set to background (0); ``min_sizes`` maps classes (int or str)
    to sizes. Components are 8-connected in 2D and 26-connected in 3D (faces, edges and corners).
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be (H, W) or (D, H, W); got shape {labels.shape}")
    structure = np.ones((3,) * labels.ndim, bool)
    out = labels.copy()
    for c, size in (min_sizes or {}).items():
        if int(size) <= 1:
            continue
        components, count = ndimage.label(labels == int(c), structure=structure)
        if count:
            small = np.bincount(components.ravel()) < int(size)
            small[0] = False
            out[small[components]] = 0
    return out
