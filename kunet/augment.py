"""Augmentation applied identically to an image and its mask, deterministic given a seed.

Geometric transforms (random scale, crop, flips, 90-degree rotations, elastic deformation as in the
UNet paper) are composed into ONE map of sampling coordinates, so the image is resampled once
(bilinear) and the mask once (nearest: labels stay integers, no new values). Coordinates that fall
outside the image are mirrored back in, the UNet paper's border handling. Intensity transforms
(brightness, contrast, gamma) then touch the image only.

numpy only; every random draw comes from the ``numpy.random.Generator`` passed in (or a seed).

Example:
    >>> aug = Augment()
    >>> img, msk = aug.patch(image, mask, size=128, rng=np.random.default_rng(0))   # (128,128,C), (128,128)
    >>> img2, msk2 = aug(image, mask, seed=0)                                      # same shape as input
"""

from __future__ import annotations

import numpy as np

from kunet.tiling import tile_starts


def _rng(rng=None, seed=None):
    if rng is not None:
        return rng
    return np.random.default_rng(seed)


def _mirror(coords, n):
    """Mirror coordinates into [0, n-1] (reflection without repeating the edge pixel)."""
    if n == 1:
        return np.zeros_like(coords)
    period = 2.0 * (n - 1)
    c = np.mod(coords, period)
    return np.where(c > n - 1, period - c, c)


def sample_bilinear(image, ys, xs):
    """``image`` (H, W, C) sampled at float coordinates ``ys, xs`` (h, w) -> (h, w, C), mirrored."""
    h, w = image.shape[:2]
    ys = _mirror(ys, h)
    xs = _mirror(xs, w)
    y0 = np.clip(np.floor(ys).astype(np.int64), 0, h - 1)
    x0 = np.clip(np.floor(xs).astype(np.int64), 0, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[..., None].astype("float32")
    wx = (xs - x0)[..., None].astype("float32")
    top = image[y0, x0] * (1 - wx) + image[y0, x1] * wx
    bottom = image[y1, x0] * (1 - wx) + image[y1, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype("float32")


def sample_nearest(mask, ys, xs):
    """``mask`` (H, W) sampled at the nearest pixel of ``ys, xs`` (mirrored): labels are kept."""
    h, w = mask.shape[:2]
    yi = np.clip(np.rint(_mirror(ys, h)).astype(np.int64), 0, h - 1)
    xi = np.clip(np.rint(_mirror(xs, w)).astype(np.int64), 0, w - 1)
    return mask[yi, xi]


def _upsample_grid(coarse, h, w):
    """Bilinear upsampling of a small (gh, gw) grid spanning the patch to (h, w) (corner-aligned)."""
    gh, gw = coarse.shape
    ys = np.linspace(0, gh - 1, h)
    xs = np.linspace(0, gw - 1, w)
    return sample_bilinear(
        coarse[..., None].astype("float32"), *np.meshgrid(ys, xs, indexing="ij")
    )[..., 0]


def _centre(n, half, rng):
    """A random window centre along an axis of length n; the window's first pixel is integral."""
    room = n - 1 - 2 * half
    if room <= 0:
        return (n - 1) / 2
    start = min(float(np.round(rng.uniform(0.0, room))), room)
    return start + half


class Augment:
    """Random augmentation of (image, mask) pairs; every transform can be switched off.

    Args:
        flip: random horizontal and vertical flips.
        rotate90: random rotation by a multiple of 90 degrees (180 only for non-square outputs).
        scale: ``(low, high)`` zoom factor range, drawn log-uniformly (> 1 zooms in); None: no zoom.
        elastic: standard deviation in pixels of the elastic displacements (UNet paper: 10 on a 3x3
            grid, interpolated smoothly); 0 disables.
        elastic_grid: the coarse displacement grid size.
        elastic_prob: probability of applying the elastic deformation to a sample.
        brightness: additive shift drawn from ``[-brightness, brightness]`` (image in ~[0, 1]).
        contrast: ``(low, high)`` factor around the image mean; None disables.
        gamma: ``(low, high)`` gamma range, drawn log-uniformly, applied to the [0, 1] part; None
            disables.
    """

    def __init__(
        self,
        flip=True,
        rotate90=True,
        scale=(0.8, 1.25),
        elastic=10.0,
        elastic_grid=3,
        elastic_prob=0.5,
        brightness=0.1,
        contrast=(0.8, 1.25),
        gamma=(0.7, 1.5),
    ):
        self.flip = bool(flip)
        self.rotate90 = bool(rotate90)
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))
        self.elastic = float(elastic)
        self.elastic_grid = int(elastic_grid)
        self.elastic_prob = float(elastic_prob)
        self.brightness = float(brightness)
        self.contrast = None if contrast is None else (float(contrast[0]), float(contrast[1]))
        self.gamma = None if gamma is None else (float(gamma[0]), float(gamma[1]))

    @classmethod
    def none(cls):
        """An Augment that only crops (every transform off)."""
        return cls(False, False, None, 0.0, brightness=0.0, contrast=None, gamma=None)

    LEVELS = ("none", "light", "medium", "heavy")

    @classmethod
    def level(cls, name):
        """A named strength (what a plan's ``augmentation`` setting names): ``none`` (crops only),
        ``light`` (flips and 90-degree rotations), ``medium`` (+ mild zoom and intensity changes),
        ``heavy`` (+ wider zoom, elastic deformation, stronger intensity changes: the defaults)."""
        if name == "none":
            return cls.none()
        if name == "light":
            return cls(scale=None, elastic=0.0, brightness=0.0, contrast=None, gamma=None)
        if name == "medium":
            return cls(
                scale=(0.9, 1.1), elastic=0.0, brightness=0.05, contrast=(0.9, 1.1),
                gamma=(0.85, 1.2),
            )  # fmt: skip
        if name == "heavy":
            return cls()
        raise ValueError(f"augmentation must be one of {', '.join(cls.LEVELS)}; got {name!r}")

    # ------------------------------------------------------------------ geometry
    def coordinates(self, image_shape, size, rng, centre=None):
        """Sampling coordinates (ys, xs), each (h, w), of one random output patch of ``size``.

        ``centre``: (y, x) pixel the patch is centred on; None draws a window inside the image.
        """
        H, W = image_shape[:2]
        h, w = size
        s = 1.0
        if self.scale is not None:
            lo, hi = np.log(self.scale[0]), np.log(self.scale[1])
            s = float(np.exp(rng.uniform(lo, hi)))
        # Output pixel offsets from the patch centre, in output pixels.
        oy, ox = np.meshgrid(
            np.arange(h, dtype="float64") - (h - 1) / 2,
            np.arange(w, dtype="float64") - (w - 1) / 2,
            indexing="ij",
        )
        if self.elastic > 0 and rng.uniform() < self.elastic_prob:
            g = self.elastic_grid
            oy = oy + _upsample_grid(rng.normal(0.0, self.elastic, (g, g)), h, w)
            ox = ox + _upsample_grid(rng.normal(0.0, self.elastic, (g, g)), h, w)
        # Rotation by k*90 degrees and flips act on the offsets.
        if self.rotate90:
            k = int(rng.integers(4)) if h == w else 2 * int(rng.integers(2))
            for _ in range(k):
                oy, ox = ox, -oy
        if self.flip:
            if rng.uniform() < 0.5:
                ox = -ox
            if rng.uniform() < 0.5:
                oy = -oy
        # Offsets in image pixels (zoom), then a random centre so the source window lies in the image
        # when it fits (else centred, mirrored outside).
        oy, ox = oy / s, ox / s
        half_h, half_w = (h - 1) / (2 * s), (w - 1) / (2 * s)
        if centre is None:
            cy, cx = _centre(H, half_h, rng), _centre(W, half_w, rng)
        else:
            cy, cx = float(centre[0]), float(centre[1])
        return oy + cy, ox + cx

    # ------------------------------------------------------------------ intensity
    def intensity(self, image, rng):
        """Brightness, contrast and gamma changes of a normalized image (~[0, 1])."""
        image = image.astype("float32", copy=True)
        if self.gamma is not None:
            lo, hi = np.log(self.gamma[0]), np.log(self.gamma[1])
            g = float(np.exp(rng.uniform(lo, hi)))
            inside = np.clip(image, 0.0, 1.0)
            image += inside**g - inside
        if self.contrast is not None:
            lo, hi = np.log(self.contrast[0]), np.log(self.contrast[1])
            c = float(np.exp(rng.uniform(lo, hi)))
            mean = float(image.mean())
            image = (image - mean) * c + mean
        if self.brightness > 0:
            image += float(rng.uniform(-self.brightness, self.brightness))
        return image.astype("float32")

    # ------------------------------------------------------------------ public
    def patch(self, image, mask, size, rng=None, seed=None, centre=None):
        """A random augmented ``size`` patch of (image (H, W, C), mask (H, W)).

        ``size``: int or (h, w); ``centre``: optional (y, x) pixel to centre the patch on.
        Returns float32 (h, w, C) and the mask's dtype (h, w).
        """
        rng = _rng(rng, seed)
        size = (size, size) if np.isscalar(size) else tuple(size)
        ys, xs = self.coordinates(image.shape, size, rng, centre=centre)
        out_image = sample_bilinear(np.asarray(image, dtype="float32"), ys, xs)
        out_mask = None if mask is None else sample_nearest(np.asarray(mask), ys, xs)
        return self.intensity(out_image, rng), out_mask

    def __call__(self, image, mask, rng=None, seed=None):
        """Augment (image, mask) keeping their size (the zoom picks a random window)."""
        return self.patch(image, mask, image.shape[:2], rng=rng, seed=seed)


def grid_crops(shape, size):
    """Top-left corners of ``size`` tiles covering an image of ``shape``, row by row: a grid of
    :func:`kunet.tiling.tile_starts` with a stride of one tile (last tile flush)."""
    (height, width), (h, w) = shape[:2], size
    return [(y, x) for y in tile_starts(height, h, h) for x in tile_starts(width, w, w)]


def crop(image, mask, corner, size):
    """The ``size`` crop at ``corner``; mirrored past the image's edge when the image is smaller."""
    y, x = corner
    h, w = size
    ys, xs = np.meshgrid(
        np.arange(y, y + h, dtype="float64"), np.arange(x, x + w, dtype="float64"), indexing="ij"
    )
    H, W = image.shape[:2]
    if y + h <= H and x + w <= W:
        out_mask = None if mask is None else mask[y : y + h, x : x + w]
        return image[y : y + h, x : x + w], out_mask
    out_mask = None if mask is None else sample_nearest(mask, ys, xs)
    return sample_nearest(image, ys, xs), out_mask
