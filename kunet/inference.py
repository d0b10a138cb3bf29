"""Overlap-tile inference: predict an image of any size one batch of tiles at a time.

Tiles of ``tile_size`` overlap by a fraction ``overlap``; each tile's prediction is weighted by a
window (``"gaussian"``: centre pixels, which saw their whole context, count most; ``"constant"``: plain
average) and the weighted sum is divided by the summed weights. Memory: one batch of tiles plus two
image-sized float32 accumulators; tiles are cut lazily, never all held at once.

Example:
    >>> image = kunet.io.normalize(kunet.io.read_image("big.tif"))
    >>> probs = kunet.inference.predict_tiled(model, image, tile_size=256)   # (H, W, classes)
    >>> labels = kunet.inference.to_labels(probs)                            # (H, W) int
"""

from __future__ import annotations

import numpy as np

from kunet.augment import sample_nearest
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


def window(tile_size, blend="gaussian"):
    """The (h, w) blending weights of one tile: a Gaussian (sigma = size / 8) or ones."""
    h, w = tile_size
    if blend == "constant":
        return np.ones((h, w), dtype="float32")
    if blend != "gaussian":
        raise ValueError(f"blend must be 'gaussian' or 'constant'; got {blend!r}")

    def g(n):
        x = np.arange(n, dtype="float64") - (n - 1) / 2
        return np.exp(-0.5 * (x / (n / 8.0)) ** 2)

    weights = np.outer(g(h), g(w))
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype("float32")  # no zero weight, even in corners


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
    """Model outputs for a batch (N, h, w, C) -> activated numpy (N, h, w, K), flip-averaged if tta."""

    def once(x):
        return _activate(np.asarray(model.predict_on_batch(x)), activation)

    if not tta:
        return once(batch)
    total = once(batch)
    for axes in ((2,), (1,), (1, 2)):
        total += np.flip(once(np.ascontiguousarray(np.flip(batch, axes))), axes)
    return total / 4.0


def _as_image(model, image, nan_policy):
    """``image`` as float32 (H, W, C), checked against the model's input channels and for NaN/inf."""
    image = np.asarray(image, dtype="float32")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W) or (H, W, C); got shape {image.shape}")
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
    """The multiple of which a kunet UNet's input sides must be (``2**depth``); 1 for other models."""
    filters = getattr(model, "filters", None)
    return 2 ** len(filters) if isinstance(filters, (list, tuple)) and filters else 1


def _mirror_up(image, height, width):
    """``image`` (H, W, C) mirrored at its bottom and right edges up to (height, width)."""
    h, w = image.shape[:2]
    if (height, width) == (h, w):
        return image
    ys, xs = np.meshgrid(
        np.arange(height, dtype="float64"), np.arange(width, dtype="float64"), indexing="ij"
    )
    return sample_nearest(image, ys, xs)


def predict_image(model, image, activation="auto", tta=False, nan_policy="error"):
    """Predict a whole image (H, W, C) in one call -> (H, W, K) (probabilities by default).

    A side that is not a multiple of a kunet UNet's ``2**depth`` is mirrored up to one and the
    output cropped back: the network sees image content at its borders, as in training, not the
    zeros its own in-graph padding would add (which read as dark edges, and cost a model trained on
    patches much of its Dice on sparse objects: benchmarks/README.md).

    The image must have the model's input channels; NaN/inf pixels follow ``nan_policy`` ('error':
    ValueError with their count, 'zero': set to 0, 'ignore': passed on).
    """
    image = _as_image(model, image, nan_policy)
    h, w = image.shape[:2]
    m = _size_multiple(model)
    padded = _mirror_up(image, -(-h // m) * m, -(-w // m) * m)
    return _run(model, padded[None], _activation(model, activation), tta)[0, :h, :w]


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
    """Predict ``image`` (H, W, C) tile by tile; returns float32 (H, W, K).

    Args:
        model: a Keras model mapping (N, h, w, C) to (N, h, w, K) (e.g. a ``kunet.UNet``).
        image: (H, W, C) or (H, W), already normalized as in training (``kunet.io.normalize``).
        tile_size: tile side (int) or (h, w). A multiple of ``2**depth`` of the UNet keeps pooling
            grids aligned. An image smaller than a tile is mirrored up to the tile size.
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        blend: ``"gaussian"`` or ``"constant"`` weighting of overlapping tiles.
        batch_size: tiles per model call: bounds the memory used (the last batch is padded to this
            size, so the model sees one shape only).
        tta: average the predictions of the tile and its horizontal, vertical and double flips.
        activation: ``"auto"`` (sigmoid/softmax for a kunet.UNet emitting logits, else none),
            ``"sigmoid"``, ``"softmax"`` or None: applied to each tile before blending.
        nan_policy: NaN/inf pixels: ``"error"`` (ValueError with their count, before any tile is
            predicted), ``"zero"`` (set to 0) or ``"ignore"``.

    The image must have the model's input channels (ValueError otherwise).
    """
    image = _as_image(model, image, nan_policy)
    th, tw = (tile_size, tile_size) if np.isscalar(tile_size) else tuple(tile_size)
    if min(th, tw) < 1:
        raise ValueError(f"tile_size must be positive; got {tile_size!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1); got {overlap!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size!r}")
    activation = _activation(model, activation)
    H, W = image.shape[:2]
    # Images smaller than a tile are mirrored up to the tile size, and cropped back at the end.
    PH, PW = max(H, th), max(W, tw)
    image = _mirror_up(image, PH, PW)
    weights = window((th, tw), blend)[..., None]
    ys = tile_starts(PH, th, max(1, int(round(th * (1 - overlap)))))
    xs = tile_starts(PW, tw, max(1, int(round(tw * (1 - overlap)))))
    corners = [(y, x) for y in ys for x in xs]

    out = None
    norm = np.zeros((PH, PW, 1), dtype="float32")
    for i in range(0, len(corners), batch_size):
        chunk = corners[i : i + batch_size]
        batch = np.zeros((batch_size, th, tw, image.shape[-1]), dtype="float32")
        for j, (y, x) in enumerate(chunk):
            batch[j] = image[y : y + th, x : x + tw]
        pred = _run(model, batch, activation, tta)
        if out is None:
            out = np.zeros((PH, PW, pred.shape[-1]), dtype="float32")
        for j, (y, x) in enumerate(chunk):
            out[y : y + th, x : x + tw] += pred[j] * weights
            norm[y : y + th, x : x + tw] += weights
    out /= norm
    return out[:H, :W]


def to_labels(probs, threshold=0.5):
    """Class indices (H, W) int32 from (H, W, K) probabilities: threshold for K == 1, else argmax."""
    probs = np.asarray(probs)
    if probs.shape[-1] == 1:
        return (probs[..., 0] > threshold).astype("int32")
    return np.argmax(probs, axis=-1).astype("int32")


def remove_small_components(labels, min_sizes):
    """``labels`` (H, W) with the connected components (8-connected) of class ``c`` smaller than
    ``min_sizes[c]`` pixels set to background (0); ``min_sizes`` maps classes (int or str) to pixels.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    out = labels.copy()
    for c, size in (min_sizes or {}).items():
        if int(size) <= 1:
            continue
        components, count = ndimage.label(labels == int(c), structure=np.ones((3, 3), bool))
        if count:
            small = np.bincount(components.ravel()) < int(size)
            small[0] = False
            out[small[components]] = 0
    return out
