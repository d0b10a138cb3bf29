"""Augmentation applied identically to an image and its mask, deterministic given a seed.

Geometric transforms (random scale, crop, flips, 90-degree rotations, elastic deformation as in the
UNet paper) are composed into ONE map of sampling coordinates, so the image is resampled once
(bilinear) and the mask once (nearest: labels stay integers, no new values). Coordinates that fall
outside the image are mirrored back in, the UNet paper's border handling. Intensity transforms
(brightness, contrast, gamma) then touch the image only.

The same code serves 2D images (H, W, C) and 3D volumes (D, H, W, C): the patch size's length says
which. In 3D the flips act on all three axes, the 90-degree rotations in the (H, W) plane, and the
zoom and elastic displacements on all axes (the volume resampled trilinearly).

numpy only; every random draw comes from the ``numpy.random.Generator`` passed in (or a seed).

Example:
    >>> aug = Augment()
    >>> img, msk = aug.patch(image, mask, size=128, rng=np.random.default_rng(0))   # (128,128,C), (128,128)
    >>> img2, msk2 = aug(image, mask, seed=0)                                      # same shape as input
"""

from __future__ import annotations

import itertools

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


def sample_linear(image, *coords):
    """``image`` (S1, ..., Sn, C) sampled at float coordinates (one array per spatial axis, all of
    one shape) -> (..., C), mirrored; n-linear interpolation (trilinear for volumes)."""
    lower, weights = [], []
    for axis, c in enumerate(coords):
        n = image.shape[axis]
        c = _mirror(c, n)
        c0 = np.clip(np.floor(c).astype(np.int64), 0, n - 1)
        lower.append((c0, np.minimum(c0 + 1, n - 1)))
        weights.append((c - c0)[..., None].astype("float32"))
    out = 0.0
    for corner in itertools.product((0, 1), repeat=len(coords)):
        w = 1.0
        for axis, bit in enumerate(corner):
            w = w * (weights[axis] if bit else 1 - weights[axis])
        out = out + image[tuple(lower[axis][bit] for axis, bit in enumerate(corner))] * w
    return np.asarray(out, dtype="float32")


def sample_nearest(mask, *coords):
    """``mask`` sampled at the nearest element of the float coordinates ``coords`` (one array per
    leading axis: ``ys, xs`` for an image, ``zs, ys, xs`` for a volume), mirrored: labels are kept.
    """
    index = tuple(
        np.clip(np.rint(_mirror(c, mask.shape[axis])).astype(np.int64), 0, mask.shape[axis] - 1)
        for axis, c in enumerate(coords)
    )
    return mask[index]


def _upsample_grid(coarse, h, w):
    """Bilinear upsampling of a small (gh, gw) grid spanning the patch to (h, w) (corner-aligned)."""
    gh, gw = coarse.shape
    ys = np.linspace(0, gh - 1, h)
    xs = np.linspace(0, gw - 1, w)
    return sample_bilinear(
        coarse[..., None].astype("float32"), *np.meshgrid(ys, xs, indexing="ij")
    )[..., 0]


def _upsample_grid_nd(coarse, size):
    """Linear upsampling of a small grid (g, ..., g) spanning the patch to ``size`` (corner-aligned)."""
    axes = [np.linspace(0, g - 1, n) for g, n in zip(coarse.shape, size, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    return sample_linear(coarse[..., None].astype("float32"), *grid)[..., 0]


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
        """Sampling coordinates, one array of shape ``size`` per spatial axis (ys, xs for an image;
        zs, ys, xs for a volume), of one random output patch of ``size``.

        ``centre``: the pixel (voxel) the patch is centred on; None draws a window inside the image.
        """
        n = len(size)
        shape = image_shape[:n]
        s = 1.0
        if self.scale is not None:
            lo, hi = np.log(self.scale[0]), np.log(self.scale[1])
            s = float(np.exp(rng.uniform(lo, hi)))
        # Output pixel offsets from the patch centre, in output pixels.
        offsets = list(
            np.meshgrid(*(np.arange(m, dtype="float64") - (m - 1) / 2 for m in size), indexing="ij")
        )
        if self.elastic > 0 and rng.uniform() < self.elastic_prob:
            g = self.elastic_grid
            for axis in range(n):
                coarse = rng.normal(0.0, self.elastic, (g,) * n)
                offsets[axis] = offsets[axis] + (
                    _upsample_grid(coarse, *size) if n == 2 else _upsample_grid_nd(coarse, size)
                )
        # Rotation by k*90 degrees in the last two axes' plane, and flips, act on the offsets.
        if self.rotate90:
            h, w = size[-2:]
            k = int(rng.integers(4)) if h == w else 2 * int(rng.integers(2))
            for _ in range(k):
                offsets[-2], offsets[-1] = offsets[-1], -offsets[-2]
        if self.flip:
            for axis in reversed(range(n)):  # in 2D: x, then y
                if rng.uniform() < 0.5:
                    offsets[axis] = -offsets[axis]
        # Offsets in image pixels (zoom), then a random centre so the source window lies in the image
        # when it fits (else centred, mirrored outside).
        out = []
        for axis in range(n):
            half = (size[axis] - 1) / (2 * s)
            if centre is None:
                c = _centre(shape[axis], half, rng)
            elif n == 2:  # kept as it was: 2D runs replay (see the report on issue #11)
                c = float(centre[axis])
            else:  # the window's first voxel integral, so that an unzoomed patch is not resampled
                c = float(np.floor(float(centre[axis]) - half + 0.5)) + half
            out.append(offsets[axis] / s + c)
        return tuple(out)

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
        n = np.ndim(image) - 1
        size = (int(size),) * n if np.isscalar(size) else tuple(size)
        if len(size) != n:
            raise ValueError(f"size {size} does not match an image of shape {np.shape(image)}")
        coords = self.coordinates(image.shape, size, rng, centre=centre)
        image = np.asarray(image, dtype="float32")
        out_image = sample_bilinear(image, *coords) if n == 2 else sample_linear(image, *coords)
        out_mask = None if mask is None else sample_nearest(np.asarray(mask), *coords)
        return self.intensity(out_image, rng), out_mask

    def __call__(self, image, mask, rng=None, seed=None):
        """Augment (image, mask) keeping their size (the zoom picks a random window)."""
        return self.patch(image, mask, image.shape[:-1], rng=rng, seed=seed)


def grid_crops(shape, size):
    """Corners of ``size`` tiles covering an image (or volume) of ``shape``, in row-major order: a
    grid of :func:`kunet.tiling.tile_starts` with a stride of one tile (last tile flush)."""
    starts = [tile_starts(n, t, t) for n, t in zip(shape[: len(size)], size, strict=True)]
    return list(itertools.product(*starts))


def crop(image, mask, corner, size):
    """The ``size`` crop at ``corner``; mirrored past the image's edge when the image is smaller."""
    if all(c + t <= n for c, t, n in zip(corner, size, image.shape, strict=False)):
        window = tuple(slice(c, c + t) for c, t in zip(corner, size, strict=True))
        return image[window], None if mask is None else mask[window]
    coords = np.meshgrid(
        *(np.arange(c, c + t, dtype="float64") for c, t in zip(corner, size, strict=True)),
        indexing="ij",
    )
    out_mask = None if mask is None else sample_nearest(mask, *coords)
    return sample_nearest(image, *coords), out_mask
