"""Overlap-tile inference: predict an image or a volume of any size one batch of tiles at a time.

Works for 2D models (input (N, H, W, C): images (H, W, C)) and 3D models (input (N, D, H, W, C):
volumes (D, H, W, C)); the model's input rank (or its ``spatial_dims``) decides which. Tiles of
``tile_size`` overlap by a fraction ``overlap``; each tile's prediction is weighted by a window
(``"gaussian"``: centre pixels, which saw their whole context, count most; ``"constant"``: plain
average) and the weighted sum is divided by the summed weights. Memory: one batch of tiles plus two
image-sized float32 accumulators; tiles are cut lazily, never all held at once.

Example:
    >>> image = kunet.io.normalize(kunet.io.read_image("big.tif"))
    >>> probs = kunet.inference.predict_tiled(model, image, tile_size=256)   # (H, W, classes)
    >>> labels = kunet.inference.to_labels(probs)                            # (H, W) int
"""

from __future__ import annotations

import itertools

import numpy as np

from kunet.io import apply_nan_policy
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


def _as_image(model, image, nan_policy, dims):
    """``image`` as float32 (*spatial, C), checked against the model's input rank and channels and
    for NaN/inf."""
    image = np.asarray(image, dtype="float32")
    if image.ndim == dims:
        image = image[..., None]
    if image.ndim != dims + 1:
        kind = "image" if dims == 2 else "volume"
        raise ValueError(
            f"image must be a {kind} ({_AXES[dims]}) or ({_AXES[dims]}, C) for a model taking "
            f"(N, {_AXES[dims]}, C); got shape {image.shape}"
        )
    input_shape = getattr(model, "input_shape", None)
    want = input_shape[-1] if isinstance(input_shape, tuple) and input_shape else None
    if want is not None and image.shape[-1] != want:
        raise ValueError(
            f"image has {image.shape[-1]} channel(s) (shape {image.shape}) but the model expects "
            f"{want} (input shape {input_shape[1:]}); convert it first, e.g. "
            f"kunet.io.to_channels(image, {want})"
        )
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
):
    """Predict ``image`` (H, W, C) or volume (D, H, W, C) tile by tile; returns float32 (H, W, K)
    or (D, H, W, K).

    Args:
        model: a Keras model mapping (N, h, w, C) to (N, h, w, K), or (N, d, h, w, C) to
            (N, d, h, w, K) (e.g. a ``kunet.UNet``); its input rank (or ``spatial_dims``) says which.
        image: (H, W, C) or (H, W) for a 2D model, (D, H, W, C) or (D, H, W) for a 3D one, already
            normalized as in training (``kunet.io.normalize``).
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
            predicted), ``"zero"`` (set to 0) or ``"ignore"``.

    The image must have the model's input rank and channels (ValueError otherwise).
    """
    dims = _spatial_dims(model)
    image = _as_image(model, image, nan_policy, dims)
    tile = _tile_shape(tile_size, dims)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1); got {overlap!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
    activation = _activation(model, activation)
    sides = image.shape[:-1]
    # Images smaller than a tile are mirrored up to the tile size, and cropped back at the end.
    padded = tuple(max(n, t) for n, t in zip(sides, tile, strict=True))
    image = _mirror_up(image, padded)
    weights = window(tile, blend)[..., None]
    starts = [
        tile_starts(n, t, max(1, int(round(t * (1 - overlap)))))
        for n, t in zip(padded, tile, strict=True)
    ]
    corners = [
        tuple(slice(s, s + t) for s, t in zip(corner, tile, strict=True))
        for corner in itertools.product(*starts)
    ]

    out = None
    norm = np.zeros((*padded, 1), dtype="float32")
    for i in range(0, len(corners), batch_size):
        chunk = corners[i : i + batch_size]
        batch = np.zeros((batch_size, *tile, image.shape[-1]), dtype="float32")
        for j, where in enumerate(chunk):
            batch[j] = image[where]
        pred = _run(model, batch, activation, tta)
        if out is None:
            out = np.zeros((*padded, pred.shape[-1]), dtype="float32")
        for j, where in enumerate(chunk):
            out[where] += pred[j] * weights
            norm[where] += weights
    out /= norm
    return out[tuple(slice(0, n) for n in sides)]


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
