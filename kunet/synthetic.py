"""Synthetic microscopy-like segmentation data: textured nuclei with exact masks, numpy only.

:func:`make_nuclei` draws fluorescence-microscopy-like images the way a microscope would make them:

1. objects: nuclei (irregular ellipses: random radii, rotation and a wobbly outline made of low
   harmonics; some placed touching a neighbour) with varied brightness, a dimmer rim, a smooth
   chromatin texture and a few nucleoli; with ``num_classes=2`` also elongated spindle cells
   (class 2);
2. distractors that are *not* in the mask: bright debris specks and dim, out-of-focus ghost
   nuclei;
3. optics: a smooth background texture, an uneven illumination field (multiplicative gradient
   and vignette) plus an additive background gradient, then a Gaussian blur (point-spread
   function);
4. sensor: Poisson (shot) noise at a random photon level plus Gaussian read noise, then a robust
   per-image rescale to [0, 1].

The masks are exact: the object supports before blur and noise. A global threshold is a poor
segmenter of these images (uneven illumination, dim nuclei, debris, ghosts); run
``python -m kunet.synthetic`` to see its score (:func:`otsu_dice`).

Everything is deterministic: image ``i`` depends only on ``(seed, i)`` and the keyword arguments,
so ``make_nuclei(10, seed=s)[0][:5]`` equals ``make_nuclei(5, seed=s)[0]``.

:func:`make_blobs3d` is the 3D counterpart (``kunet demo --3d``): ellipsoids of varied size,
orientation and brightness in a volume with smooth intensity variation (a gain field and a background
gradient), blur and noise.

Example:
    >>> images, masks = make_nuclei(256, size=64, seed=0)   # (256, 64, 64, 1) float32, (256, 64, 64) uint8
    >>> model = kunet.UNet(num_classes=1, filters=(16, 32), input_shape=(None, None, 1))
    >>> model.fit(images, masks, epochs=5)
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "make_nuclei",
    "make_blobs3d",
    "gaussian_blur",
    "otsu_threshold",
    "otsu_dice",
    "dice_score",
]

_NUCLEUS, _SPINDLE = 1, 2


# ---------------------------------------------------------------------------------------- filters
def gaussian_blur(image, sigma, axes=(-2, -1)):
    """Separable Gaussian blur of the last two axes of ``image`` (or of ``axes``: ``(-3, -2, -1)``
    for a volume) with reflect padding, numpy only.

    ``sigma`` in pixels; ``sigma <= 0`` returns the input unchanged (as float32). The kernel spans
    ``+-ceil(3 * sigma)`` pixels (capped so that reflect padding stays valid for small images).
    """
    x = np.asarray(image, dtype=np.float32)
    if sigma <= 0:
        return x
    for axis in axes:
        length = x.shape[axis]
        radius = int(min(np.ceil(3.0 * sigma), length - 1))
        if radius < 1:
            continue
        taps = np.arange(-radius, radius + 1, dtype=np.float32)
        kernel = np.exp(-0.5 * (taps / sigma) ** 2)
        kernel /= kernel.sum()
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="reflect")
        out = np.zeros_like(x)
        for j, w in enumerate(kernel):
            out += w * np.take(padded, np.arange(j, j + length), axis=axis)
        x = out
    return x


def _smooth_noise(rng, shape, sigma, axes=(-2, -1)):
    """White noise blurred by ``sigma`` and rescaled to zero mean, unit standard deviation."""
    field = gaussian_blur(rng.standard_normal(shape).astype(np.float32), sigma, axes)
    return (field - field.mean()) / (field.std() + 1e-6)


# ---------------------------------------------------------------------------------------- objects
def _blob(yy, xx, cy, cx, a, b, theta, harmonics):
    """Normalised radius of every pixel in an irregular ellipse's frame: inside where < 1."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    outline = np.ones_like(rho)
    for k, amp, phase in harmonics:
        outline += amp * np.cos(k * phi + phase)
    return rho / outline


def _random_shape(rng, kind):
    """Radii (a, b), rotation and outline harmonics of one object of the given kind."""
    if kind == _SPINDLE:
        a, b = rng.uniform(8.0, 13.0), rng.uniform(2.2, 3.5)
        harmonics = [(k, rng.uniform(0.0, 0.05), rng.uniform(0, 2 * np.pi)) for k in (2, 3)]
    else:
        r = rng.uniform(3.5, 8.0)
        ecc = rng.uniform(0.65, 1.0)
        a, b = r, r * ecc
        harmonics = [
            (k, rng.uniform(0.0, 0.09 / (k - 1)), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)
        ]
    return a, b, rng.uniform(0, np.pi), harmonics


def _draw_objects(rng, size, density, num_classes, chromatin):
    """Object intensity image (before optics) and its exact label image."""
    signal = np.zeros((size, size), np.float32)
    labels = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    count = rng.poisson(density * size * size / 4096.0)
    centres = []
    for _ in range(count):
        kind = _SPINDLE if num_classes >= 2 and rng.random() < 0.35 else _NUCLEUS
        a, b, theta, harmonics = _random_shape(rng, kind)
        if centres and rng.random() < 0.3:  # touch a neighbour
            py, px, pr = centres[rng.integers(len(centres))]
            angle = rng.uniform(0, 2 * np.pi)
            dist = 0.85 * (pr + 0.5 * (a + b))
            cy, cx = py + dist * np.sin(angle), px + dist * np.cos(angle)
        else:
            cy, cx = rng.uniform(-2, size + 2, size=2)
        centres.append((cy, cx, 0.5 * (a + b)))
        reach = int(np.ceil(max(a, b) * 1.4)) + 2
        y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, size)
        x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, size)
        if y0 >= y1 or x0 >= x1:
            continue
        win = (slice(y0, y1), slice(x0, x1))
        rho = _blob(yy[win], xx[win], cy, cx, a, b, theta, harmonics)
        inside = rho < 1.0
        if not inside.any():
            continue
        level = rng.uniform(0.3, 1.0)
        # Dimmer towards the rim, textured inside (chromatin), a few nucleoli.
        profile = level * (1.0 - 0.35 * np.minimum(rho, 1.0) ** 2)
        if kind == _NUCLEUS:
            profile = profile * (1.0 + 0.22 * chromatin[win])
            for _ in range(rng.integers(0, 3)):
                t, f = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
                ny = cy + f * b * np.sin(t)
                nx = cx + f * a * np.cos(t)
                spot = np.exp(-((yy[win] - ny) ** 2 + (xx[win] - nx) ** 2) / (2 * 0.9**2))
                profile = profile * (1.0 + rng.choice([-0.35, 0.35]) * spot)
        else:
            profile = profile * (1.0 + 0.08 * chromatin[win])
        region = signal[win]
        region[inside] = np.maximum(region[inside], profile[inside])
        labels[win][inside] = kind
    return signal, labels


def _distractors(rng, size):
    """Unlabelled structures: bright debris specks and dim out-of-focus ghost nuclei."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    scale = size * size / 4096.0
    debris = np.zeros((size, size), np.float32)
    for _ in range(rng.poisson(3.0 * scale)):
        cy, cx = rng.uniform(0, size, size=2)
        r = rng.uniform(0.6, 1.6)
        debris += rng.uniform(0.4, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    ghosts = np.zeros((size, size), np.float32)
    for _ in range(rng.poisson(1.5 * scale)):
        a, b, theta, harmonics = _random_shape(rng, _NUCLEUS)
        cy, cx = rng.uniform(0, size, size=2)
        rho = _blob(yy, xx, cy, cx, a * 1.2, b * 1.2, theta, harmonics)
        ghosts = np.maximum(ghosts, rng.uniform(0.15, 0.35) * (rho < 1.0))
    return debris + gaussian_blur(ghosts, rng.uniform(2.5, 3.5))


def _illumination(rng, size):
    """Multiplicative illumination field (gradient x vignette) and additive background gradient."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    t = rng.uniform(0, 2 * np.pi)
    ramp = xx * np.cos(t) + yy * np.sin(t)  # in about [-0.7, 0.7]
    gain = 1.0 + rng.uniform(0.3, 0.7) * ramp
    vy, vx = rng.uniform(-0.3, 0.3, size=2)
    gain = gain * (1.0 - rng.uniform(0.0, 0.6) * ((yy - vy) ** 2 + (xx - vx) ** 2))
    t2 = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(0.02, 0.12) + rng.uniform(0.05, 0.25) * (
        0.5 + xx * np.cos(t2) + yy * np.sin(t2)
    )
    return np.clip(gain, 0.2, None).astype(np.float32), offset.astype(np.float32)


def _one_image(rng, size, channels, density, num_classes):
    chromatin = _smooth_noise(rng, (size, size), 0.9)
    signal, labels = _draw_objects(rng, size, density, num_classes, chromatin)
    signal = signal + _distractors(rng, size)
    gain, offset = _illumination(rng, size)
    texture = 0.04 * _smooth_noise(rng, (size, size), 3.0)
    psf = rng.uniform(0.6, 1.2)
    photons = rng.uniform(40.0, 250.0)
    read_noise = rng.uniform(0.01, 0.03)
    planes = []
    for c in range(channels):
        channel_gain = 1.0 if c == 0 else rng.uniform(0.5, 1.2)
        clean = gaussian_blur(channel_gain * gain * signal + offset + texture, psf)
        clean = np.clip(clean, 0.0, None)
        noisy = rng.poisson(clean * photons) / photons
        noisy = noisy + read_noise * rng.standard_normal(clean.shape)
        lo, hi = np.percentile(noisy, (0.5, 99.8))
        planes.append(np.clip((noisy - lo) / max(hi - lo, 1e-6), 0.0, 1.0))
    return np.stack(planes, axis=-1).astype(np.float32), labels


def make_nuclei(n, size=64, seed=0, channels=1, num_classes=1, density=8.0):
    """Synthetic fluorescence-like images of nuclei with exact segmentation masks.

    Args:
        n: number of images.
        size: height and width in pixels (nuclei are 7-16 px across whatever the size, as at a
            fixed magnification; the count scales with the area).
        seed: integer seed; image ``i`` depends only on ``(seed, i)`` and the other arguments.
        channels: channels of the images (extra channels see the same objects with their own
            gain and noise).
        num_classes: 1: masks in {0, 1} (nuclei); 2: masks in {0, 1, 2}, class 2 being elongated
            spindle cells (a second shape class to tell from the round nuclei).
        density: mean number of objects per 64 x 64 pixels.

    Returns:
        ``(images, masks)``: ``images`` float32 (n, size, size, channels) in [0, 1]; ``masks``
        uint8 (n, size, size) of class indices (0 = background).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8; got {size!r}")
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
        raise ValueError(f"channels must be a positive int; got {channels!r}")
    if num_classes not in (1, 2):
        raise ValueError(
            f"num_classes must be 1 (nuclei) or 2 (nuclei, spindles); got {num_classes!r}"
        )
    if density < 0:
        raise ValueError(f"density must be >= 0; got {density!r}")
    images = np.zeros((n, size, size, channels), np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        images[i], masks[i] = _one_image(
            np.random.default_rng(child), size, channels, density, num_classes
        )
    return images, masks


# ---------------------------------------------------------------------------------------- 3D
def _rotation(rng):
    """A random 3D rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _one_volume(rng, size, density):
    zz, yy, xx = np.mgrid[0:size, 0:size, 0:size].astype(np.float32)
    signal = np.zeros((size, size, size), np.float32)
    labels = np.zeros((size, size, size), np.uint8)
    count = max(1, rng.poisson(density * (size / 32.0) ** 3))
    for _ in range(count):
        radii = rng.uniform(3.5, 7.0, size=3)
        centre = rng.uniform(2, size - 2, size=3)
        rot = _rotation(rng)
        reach = int(np.ceil(radii.max())) + 1
        lo = np.maximum(centre.astype(int) - reach, 0)
        hi = np.minimum(centre.astype(int) + reach + 1, size)
        win = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        d = np.stack([zz[win] - centre[0], yy[win] - centre[1], xx[win] - centre[2]], axis=-1)
        u = (d @ rot) / radii  # in the ellipsoid's frame, scaled by its radii
        rho = np.sqrt((u * u).sum(axis=-1))
        inside = rho < 1.0
        level = rng.uniform(0.35, 1.0)
        profile = level * (1.0 - 0.3 * rho**2)
        region = signal[win]
        region[inside] = np.maximum(region[inside], profile[inside])
        labels[win][inside] = 1
    # Smooth intensity variation: a multiplicative gain (a ramp and a slow random field) and an
    # additive background gradient, so that no single threshold fits the whole volume.
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    ramp = (
        (zz - size / 2) * direction[0]
        + (yy - size / 2) * direction[1]
        + (xx - size / 2) * direction[2]
    ) / size
    slow = _smooth_noise(rng, (size, size, size), size / 6.0, axes=(-3, -2, -1))
    gain = np.clip(1.0 + rng.uniform(0.4, 0.8) * ramp + 0.15 * slow, 0.3, None)
    t = rng.standard_normal(3)
    t /= np.linalg.norm(t)
    background = rng.uniform(0.05, 0.15) + rng.uniform(0.15, 0.35) * (
        0.5 + ((zz - size / 2) * t[0] + (yy - size / 2) * t[1] + (xx - size / 2) * t[2]) / size
    )
    clean = gaussian_blur(gain * signal + background, rng.uniform(0.5, 0.9), axes=(-3, -2, -1))
    noisy = clean + rng.uniform(0.05, 0.1) * rng.standard_normal(clean.shape)
    lo, hi = np.percentile(noisy, (0.5, 99.8))
    image = np.clip((noisy - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return image[..., None].astype(np.float32), labels


def make_blobs3d(n, size=32, seed=0, density=5.0):
    """Synthetic 3D volumes: ellipsoids ("blobs") in noise, with exact masks.

    Each volume holds about ``density * (size / 32)**3`` ellipsoids (radii 3.5-7 voxels, random
    orientation and brightness), under a smooth multiplicative gain field and an additive background
    gradient, blurred (point-spread function) and with Gaussian noise, rescaled to [0, 1]. Volume
    ``i`` depends only on ``(seed, i)`` and the other arguments.

    Returns ``(images, masks)``: float32 (n, size, size, size, 1) in [0, 1] and uint8
    (n, size, size, size) in {0, 1}.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8; got {size!r}")
    if not density > 0:
        raise ValueError(f"density must be > 0; got {density!r}")
    images = np.zeros((n, size, size, size, 1), np.float32)
    masks = np.zeros((n, size, size, size), np.uint8)
    for i, child in enumerate(np.random.SeedSequence([seed, 3]).spawn(n)):
        images[i], masks[i] = _one_volume(np.random.default_rng(child), size, density)
    return images, masks


# ---------------------------------------------------------------------------------------- baseline
def otsu_threshold(values, bins=256):
    """Otsu's threshold of values in [0, 1]: the cut that maximises the between-class variance.

    Foreground is ``values > threshold``.
    """
    hist, edges = np.histogram(np.asarray(values).ravel(), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1e-12)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mean0 - mean1) ** 2
    best = np.flatnonzero(between >= between.max() * (1.0 - 1e-9))
    # Empty bins between two modes leave a plateau of equally good cuts: take its middle.
    return float(0.5 * (edges[best[0] + 1] + edges[best[-1] + 1]))


def dice_score(truth, prediction):
    """Dice of two binary arrays, pooled over every pixel (1.0 when both are empty)."""
    t, p = np.asarray(truth) > 0, np.asarray(prediction) > 0
    denom = t.sum() + p.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(t, p).sum() / denom)


def otsu_dice(images, masks, per_image=True):
    """Dice of the Otsu-threshold baseline (channel 0; any non-zero class counts as foreground), for
    images (N, H, W, C) or volumes (N, D, H, W, C).

    ``per_image=True`` thresholds each image at its own Otsu level; ``False`` uses one level for
    the whole set.
    """
    x = np.asarray(images)[..., 0]
    if per_image:
        pred = np.stack([img > otsu_threshold(img) for img in x])
    else:
        pred = x > otsu_threshold(x)
    return dice_score(masks, pred)


if __name__ == "__main__":  # python -m kunet.synthetic: the threshold baseline's score
    import time

    start = time.perf_counter()
    imgs, msks = make_nuclei(512, size=64, seed=0)
    took = time.perf_counter() - start
    print(f"512 images of 64 x 64 in {took:.2f} s; foreground {msks.mean():.3f}")
    print(f"Otsu per image: Dice {otsu_dice(imgs, msks):.3f}")
    print(f"Otsu global:    Dice {otsu_dice(imgs, msks, per_image=False):.3f}")
    start = time.perf_counter()
    vols, vmsks = make_blobs3d(64, size=32, seed=0)
    took = time.perf_counter() - start
    print(f"64 volumes of 32^3 in {took:.2f} s; foreground {vmsks.mean():.3f}")
    print(f"Otsu per volume: Dice {otsu_dice(vols, vmsks):.3f}")
