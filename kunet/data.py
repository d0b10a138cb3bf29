"""Folder datasets: ``images/`` and ``masks/`` paired by file stem, as ``keras.utils.PyDataset``.

Layout::

    data/images/a.png   data/masks/a.png      (any of .png .jpg .jpeg .tif .tiff .bmp, matched by stem)
    data/images/b.tif   data/masks/b.png

Images may be 8- or 16-bit, grayscale or RGB; each is normalized on its own (:func:`kunet.io.normalize`).
Masks are class-index images (0 = background): grayscale or palette PNGs, or 0/255 binary masks.
Every pair is read and checked when the dataset is made (missing partners, unreadable files, size
mismatches, label values beyond ``num_classes``, NaN/inf pixels), each problem raising
:class:`DataError` naming the file; what had to be guessed (the number of classes, channel
conversions, 0/255 masks) is said as a :class:`kunet.io.GuessWarning`. The data is held in memory
(the use case: a few to a few hundred images).

3D volumes (:mod:`kunet.volumes`: NIfTI, ``.npy``, TIFF stacks) load the same way with
``volumes=True``: images (D, H, W, C), masks (D, H, W), paired by the name without its suffix
(``a.nii.gz`` with ``a.nii.gz`` or ``a.npy``); :class:`PatchDataset` and :class:`TileDataset` then
give (B, d, h, w, C) patches.

Example:
    >>> train, val = kunet.data.folder_datasets("data/images", "data/masks", patch_size=128)
    >>> model = kunet.UNet(num_classes=train.model_num_classes, input_shape=(None, None, train.channels))
    >>> model.fit(train, validation_data=val, epochs=20)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from kunet import _failpoints
from kunet import augment as _augment
from kunet import volumes as _volumes
from kunet.io import (
    DataError,
    Guesses,
    check_nan_policy,
    image_dtype,
    list_images,
    normalize,
    read_image,
    read_mask,
    to_channels,
)

__all__ = [
    "DataError",
    "Sample",
    "FolderData",
    "PatchDataset",
    "TileDataset",
    "pair_files",
    "load_folder",
    "folder_datasets",
    "split",
    "model_num_classes",
    "MAX_INFERRED_CLASSES",
]

MAX_INFERRED_CLASSES = 64


def model_num_classes(num_classes):
    """The UNet's output channels for masks with ``num_classes`` classes: 1 (one logit) for binary."""
    return 1 if num_classes <= 2 else num_classes


@dataclass(eq=False)  # identity equality: comparing pixel arrays field by field is ambiguous
class Sample:
    """One image/mask pair in memory: ``image`` normalized float32 (H, W, C), ``mask`` int32 (H, W)."""

    name: str
    image_path: Path
    mask_path: Path | None
    image: np.ndarray
    mask: np.ndarray | None
    raw: str | None = None  # the stored image's pixel type ("uint8", "uint16", ...)
    meta: object = None  # a volume's kunet.volumes.VolumeMeta (its NIfTI affine and header)


@dataclass
class FolderData:
    """Loaded pairs plus what was inferred: ``num_classes`` (with background, >= 2), ``channels``
    and ``notes`` (what had to be guessed, see :class:`kunet.io.Guesses`)."""

    samples: list
    num_classes: int
    channels: int
    notes: list = field(default_factory=list)  # what was guessed, one line per kind
    normalized: str | None = None  # the normalization applied, None: images as stored

    @property
    def model_num_classes(self):
        return model_num_classes(self.num_classes)

    def normalize(self, method="percentile", value_range=None, nan_policy="error"):
        """Normalize every sample's image in place (:func:`kunet.io.normalize`); once only."""
        if self.normalized:
            raise ValueError(f"the images are normalized already ({self.normalized})")
        for s in self.samples:
            s.image = normalize(s.image, nan_policy, method, value_range)
        self.normalized = method
        return self


def pair_files(images, masks, volumes=False):
    """[(stem, image_path, mask_path)] for ``images`` and ``masks`` folders paired by file stem
    (``volumes``: volume files, the stem without ``.nii.gz`` etc.)."""
    listing = _volumes.list_volumes if volumes else list_images
    stem_of = _volumes.volume_stem if volumes else (lambda f: f.stem)
    image_files = listing(images, "images")
    mask_files = listing(masks, "masks")

    def by_stem(files, what):
        table = {}
        for f in files:
            stem = stem_of(f)
            if stem in table:
                raise DataError(f"{what}: {table[stem]} and {f} have the same stem {stem!r}")
            table[stem] = f
        return table

    image_by_stem = by_stem(image_files, "images")
    mask_by_stem = by_stem(mask_files, "masks")
    for stem, path in image_by_stem.items():
        if stem not in mask_by_stem:
            raise DataError(f"{path} has no mask (expected {Path(masks) / stem}.<png|tif|...>)")
    for stem, path in mask_by_stem.items():
        if stem not in image_by_stem:
            raise DataError(f"{path} has no image (expected {Path(images) / stem}.<png|tif|...>)")
    return [(stem, image_by_stem[stem], mask_by_stem[stem]) for stem in sorted(image_by_stem)]


def load_folder(
    images,
    masks,
    *,
    num_classes=None,
    channels=None,
    nan_policy="error",
    guesses=None,
    normalization="percentile",
    value_range=None,
    volumes=False,
):
    """Read and check every pair of ``images``/``masks``; returns a :class:`FolderData`.

    Args:
        num_classes: classes in the masks including background (2 = binary; 1 is read as binary
            too). None: inferred as the largest label + 1 (at least 2), and said so.
        channels: the channels the images are converted to (1 or 3). None: 3 if any image is RGB,
            else 1.
        nan_policy: NaN/inf pixels in an image: 'error' (DataError naming the file and the count),
            'zero' (set to 0 after normalization) or 'ignore'. NaN in a mask is always an error.
        guesses: a :class:`kunet.io.Guesses` collecting what had to be guessed (inferred classes,
            alpha dropped, channel conversions, 0/255 masks; ``Guesses(strict=True)`` refuses them).
            None: each kind is issued once as a :class:`kunet.io.GuessWarning`. The lines are also
            in the result's ``notes``.
        normalization: how each image is normalized (:func:`kunet.io.normalize`'s ``method``,
            with ``value_range`` for "dataset"); None: kept as stored, to normalize later with
            :meth:`FolderData.normalize` (once a plan has chosen how).
        volumes: the folders hold 3D volumes (:mod:`kunet.volumes`), not 2D images.
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise DataError(f"num_classes must be a positive int; got {num_classes!r}")
    check_nan_policy(nan_policy)
    warn = guesses is None
    guesses = Guesses() if guesses is None else guesses
    if num_classes == 1:
        num_classes = 2
    pairs = pair_files(images, masks, volumes)
    raw, dtypes, metas = [], {}, {}
    largest, largest_path = 0, None
    for stem, image_path, mask_path in pairs:
        _failpoints.reached("data:read")
        if volumes:
            image, meta = _volumes.read_volume(
                image_path, "error" if nan_policy == "error" else "ignore"
            )
            dtypes[stem], metas[stem] = meta.dtype, meta
            mask = _volumes.read_volume_mask(mask_path, guesses)[0]
            if image.shape[:3] != mask.shape:
                raise DataError(
                    f"{mask_path} is {_dims(mask.shape)} (DxHxW) but its image {image_path} is "
                    f"{_dims(image.shape[:3])}"
                )
        else:
            image = read_image(image_path, "error" if nan_policy == "error" else "ignore", guesses)
            dtypes[stem] = image_dtype(image_path)
            mask = read_mask(mask_path, guesses)
            if image.shape[:2] != mask.shape:
                raise DataError(
                    f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                    f"{image_path} is {image.shape[1]}x{image.shape[0]}"
                )
        top = int(mask.max(initial=0))
        if num_classes == 2 and top >= 2:
            values = np.unique(mask)
            raise DataError(
                f"{mask_path} holds the values {_values(values)}, but the masks must be binary here "
                "(0/1 or 0/255, for num_classes 1 or 2); for more classes give their number"
            )
        if num_classes is not None and top >= num_classes:
            raise DataError(
                f"{mask_path} has label {top} but num_classes is {num_classes} "
                f"(labels must be 0..{num_classes - 1})"
            )
        if top > largest:
            largest, largest_path = top, mask_path
        raw.append((stem, image_path, mask_path, image, mask))
    if num_classes is None:
        num_classes = max(2, largest + 1)
        if num_classes > MAX_INFERRED_CLASSES:
            raise DataError(
                f"{largest_path} has label {largest}: {num_classes} classes inferred, which looks "
                "like an instance-label mask; give the number of classes explicitly if it is right"
            )
        kind = "binary" if num_classes == 2 else f"labels 0..{num_classes - 1}"
        guesses.note(
            "",
            f"{num_classes} classes inferred from the masks ({kind}); set the number of "
            "classes (--num-classes / num_classes=) if that is wrong",
        )
    if channels is None:
        channels = 3 if any(r[3].shape[-1] == 3 for r in raw) else 1
    samples = [
        Sample(
            stem,
            ip,
            mp,
            to_channels(image, channels, ip, guesses),
            mask,
            raw=dtypes[stem],
            meta=metas.get(stem),
        )
        for stem, ip, mp, image, mask in raw
    ]
    if warn:
        guesses.emit()
    data = FolderData(samples, num_classes, channels, guesses.lines())
    if normalization is not None:
        data.normalize(normalization, value_range, nan_policy)
    return data


def _dims(shape):
    return "x".join(str(n) for n in shape)


def _values(values, limit=6):
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def _targets(masks, num_classes):
    y = np.stack(masks)
    return y.astype("float32") if model_num_classes(num_classes) == 1 else y.astype("int32")


class _SampleDataset(keras.utils.PyDataset):
    """What PatchDataset and TileDataset share: the samples, their classes, channels and sizes."""

    def __init__(self, samples, num_classes, patch_size, batch_size, what, **kwargs):
        # One loader thread by default: batches are prepared while the step runs, and on TensorFlow
        # Keras then feeds them through tf.data without autotuning, whose threads otherwise competed
        # with the step on small machines (the training speed it cost: benchmarks/README.md).
        kwargs.setdefault("workers", 1)
        super().__init__(**kwargs)
        if not samples:
            raise DataError(f"no {what} images")
        self.samples = list(samples)
        self.num_classes = int(num_classes)
        self.model_num_classes = model_num_classes(self.num_classes)
        self.channels = self.samples[0].image.shape[-1]
        self.spatial_dims = self.samples[0].image.ndim - 1  # 2: images, 3: volumes
        self.patch_size = _size(patch_size, self.spatial_dims)
        self.batch_size = int(batch_size)


class PatchDataset(_SampleDataset):
    """Random (augmented) ``patch_size`` patches of in-memory samples, for training.

    A fraction ``foreground`` of the patches (default 1/3, as in nnU-Net) is centred on a random
    foreground pixel, so that small or sparse objects are seen often; the rest are placed uniformly.

    ``patches_per_epoch`` defaults to enough patches to cover the training images twice (at least
    16). Deterministic: batch ``i`` of epoch ``e`` depends only on ``(seed, e, i)``. The epoch counter
    advances in ``on_epoch_end`` (set :attr:`epoch` to resume). Each epoch visits the images in a
    shuffled order (``shuffle=True``), cycling until ``patches_per_epoch`` patches.

    Yields ``(x, y)``: x float32 (B, P, P, C); y float32 {0, 1} (B, P, P) for binary data (model with
    one output channel), int32 class indices otherwise. For volumes (samples (D, H, W, C)), patches
    are (B, P, P, P, C) and (B, P, P, P), flipped along all three axes and rotated in the (H, W)
    plane (:class:`kunet.augment.Augment` works in both).
    """

    def __init__(
        self,
        samples,
        num_classes,
        patch_size=128,
        batch_size=4,
        patches_per_epoch=None,
        shuffle=True,
        augment=True,
        seed=0,
        foreground=1 / 3,
        **kwargs,
    ):
        super().__init__(samples, num_classes, patch_size, batch_size, "training", **kwargs)
        if not 0.0 <= foreground <= 1.0:
            raise DataError(f"foreground must be in [0, 1]; got {foreground!r}")
        self.foreground = float(foreground)
        self._foreground_pixels = {}
        if patches_per_epoch is None:
            area = sum(math.prod(s.image.shape[:-1]) for s in self.samples)
            per_patch = math.prod(self.patch_size)
            patches_per_epoch = max(len(self.samples), math.ceil(2 * area / per_patch), 16)
        self.patches_per_epoch = int(patches_per_epoch)
        self.shuffle = bool(shuffle)
        if augment is True:
            augment = _augment.Augment()
        elif augment in (False, None):
            augment = _augment.Augment.none()
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self):
        return math.ceil(self.patches_per_epoch / self.batch_size)

    def _order(self):
        n = len(self.samples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch, 0xA11]).permutation(n)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        order = self._order()
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.patches_per_epoch)
        images, masks = [], []
        for k in range(start, stop):
            i = order[k % len(order)]
            sample = self.samples[i]
            rng = np.random.default_rng([self.seed, self.epoch, k])
            centre = None
            if self.foreground > 0 and rng.uniform() < self.foreground:
                centre = self._foreground_centre(i, rng)
            image, mask = self.augment.patch(
                sample.image, sample.mask, self.patch_size, rng=rng, centre=centre
            )
            images.append(image)
            masks.append(mask)
        return np.stack(images).astype("float32"), _targets(masks, self.num_classes)

    def _foreground_centre(self, i, rng):
        """A random foreground pixel ((y, x), or voxel (z, y, x)) of sample ``i``, or None."""
        if i not in self._foreground_pixels:
            self._foreground_pixels[i] = np.flatnonzero(self.samples[i].mask > 0)
        pixels = self._foreground_pixels[i]
        if pixels.size == 0:
            return None
        flat = int(pixels[rng.integers(pixels.size)])
        return tuple(int(c) for c in np.unravel_index(flat, self.samples[i].mask.shape))

    def on_epoch_end(self):
        self.epoch += 1


class TileDataset(_SampleDataset):
    """Every sample cut into a fixed grid of ``patch_size`` tiles, in order: for validation.

    The last tile of a row or column is flush with the image's edge; images smaller than the tile are
    mirrored to fill it. Same ``(x, y)`` format as :class:`PatchDataset`.
    """

    def __init__(self, samples, num_classes, patch_size=128, batch_size=4, **kwargs):
        super().__init__(samples, num_classes, patch_size, batch_size, "validation", **kwargs)
        self.tiles = [
            (i, corner)
            for i, s in enumerate(self.samples)
            for corner in _augment.grid_crops(s.image.shape, self.patch_size)
        ]

    def __len__(self):
        return math.ceil(len(self.tiles) / self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        images, masks = [], []
        for i, corner in self.tiles[index * self.batch_size : (index + 1) * self.batch_size]:
            s = self.samples[i]
            image, mask = _augment.crop(s.image, s.mask, corner, self.patch_size)
            images.append(image)
            masks.append(mask)
        return np.stack(images).astype("float32"), _targets(masks, self.num_classes)


def _size(size, spatial_dims=2):
    if np.isscalar(size):
        size = (int(size),) * spatial_dims
    size = tuple(int(s) for s in size)
    if len(size) != spatial_dims or min(size) < 1:
        shape = "(h, w)" if spatial_dims == 2 else "(d, h, w)"
        raise DataError(f"patch_size must be a positive int or {shape}; got {size!r}")
    return size


def split(samples, val_split, seed=0):
    """(train, val) lists: a seeded random ``val_split`` fraction (at least one) for validation.

    With a single sample, or ``val_split == 0``, validation uses the training samples.
    """
    if not 0.0 <= val_split < 1.0:
        raise DataError(f"val_split must be in [0, 1); got {val_split!r}")
    n = len(samples)
    if n < 2 or val_split == 0:
        return list(samples), list(samples)
    n_val = min(n - 1, max(1, round(n * val_split)))
    order = np.random.default_rng([seed, 0x5B1]).permutation(n)
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [samples[i] for i in train], [samples[i] for i in val]


def folder_datasets(
    images,
    masks,
    *,
    patch_size=128,
    batch_size=4,
    val_split=0.2,
    seed=0,
    shuffle=True,
    augment=True,
    num_classes=None,
    channels=None,
    patches_per_epoch=None,
    foreground=1 / 3,
    nan_policy="error",
    guesses=None,
    volumes=False,
    **kwargs,
):
    """Training and validation datasets from ``images``/``masks`` folders (``volumes=True``:
    folders of 3D volumes, see :mod:`kunet.volumes`).

    Returns ``(train, val)``: a :class:`PatchDataset` of random augmented patches and a
    :class:`TileDataset` of the held-out images' tiles. Both carry ``num_classes`` (mask classes,
    with background), ``model_num_classes`` (what ``kunet.UNet(num_classes=...)`` needs: 1 for binary)
    and ``channels``. ``nan_policy`` and ``guesses`` are :func:`load_folder`'s. ``kwargs``
    (``workers``, default 1 loader thread; ``use_multiprocessing``; ``max_queue_size``) go to
    ``keras.utils.PyDataset``.
    """
    data = load_folder(
        images,
        masks,
        num_classes=num_classes,
        channels=channels,
        nan_policy=nan_policy,
        guesses=guesses,
        volumes=volumes,
    )
    train_samples, val_samples = split(data.samples, val_split, seed)
    train = PatchDataset(
        train_samples,
        data.num_classes,
        patch_size=patch_size,
        batch_size=batch_size,
        patches_per_epoch=patches_per_epoch,
        shuffle=shuffle,
        augment=augment,
        seed=seed,
        foreground=foreground,
        **kwargs,
    )
    val = TileDataset(val_samples, data.num_classes, patch_size, batch_size, **kwargs)
    return train, val
