"""Folder datasets: ``images/`` and ``masks/`` paired by file stem, as ``keras.utils.PyDataset``.

Layout::

    data/images/a.png   data/masks/a.png      (any of .png .jpg .jpeg .tif .tiff .bmp, matched by stem)
    data/images/b.tif   data/masks/b.png

Images may be 8- or 16-bit, grayscale or RGB; each is normalized on its own (:func:`kunet.io.normalize`).
Masks are class-index images (0 = background): grayscale or palette PNGs, or 0/255 binary masks.
Every pair is read and checked when the dataset is made (missing partners, unreadable files, size
mismatches, label values beyond ``num_classes``, NaN/inf pixels), each problem raising
:class:`DataError` naming the file; what had to be guessed (the number of classes, channel
conversions, 0/255 masks) is said as a :class:`kunet.io.GuessWarning`.

**In memory or streamed from disk** (``stream=``). The decoded pairs are held in memory when they
fit in :func:`memory_budget` (a quarter of the memory available; ``stream="auto"``, the default,
decides from the files' headers). A larger folder is streamed: its files' headers are checked first
(pairing, sizes, readability), then every pair is decoded and checked once, one at a time, with
the same errors and notes. Training patches and validation tiles then decode each pair when a
batch needs it, the next batches prepared in background threads (``prefetch``, default 2); the
tiles of an image share one decode through a small LRU cache bounded in bytes (``cache_bytes``,
default 64 MiB; training patches use it only when every training image fits in it). Memory then
does not grow with the number of images (one image, decoded whole, must still fit). The plan, the
batches and so a training run are the same either way.

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

import itertools
import math
import os
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
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
    image_header,
    list_images,
    mask_header,
    normalize,
    read_image,
    read_mask,
    to_channels,
)

__all__ = [
    "DataError",
    "Sample",
    "StreamedSample",
    "FolderData",
    "DecodedCache",
    "PatchDataset",
    "TileDataset",
    "pair_files",
    "load_folder",
    "folder_datasets",
    "split",
    "model_num_classes",
    "MAX_INFERRED_CLASSES",
    "memory_budget",
    "available_memory",
]

MAX_INFERRED_CLASSES = 64
# stream="auto" streams a folder whose decoded pairs (float32 images, int32 masks) would take more
# than this fraction of the memory available (KUNET_MEMORY_BUDGET, in bytes, sets the budget).
STREAM_FRACTION = 0.25
CACHE_BYTES = 64 << 20  # decoded pairs a streamed folder keeps (the most recent one always)
STREAM_WORKERS = 2  # threads decoding a streamed folder's pairs (Pillow and zlib release the GIL)


def model_num_classes(num_classes):
    """The UNet's output channels for masks with ``num_classes`` classes: 1 (one logit) for binary."""
    return 1 if num_classes <= 2 else num_classes


def available_memory():
    """Bytes of memory this process can still use: the kernel's MemAvailable, or less under a
    cgroup (container) memory limit."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            free = 8 << 30
    try:  # cgroup v2: the limit less what the group uses already
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return free


def memory_budget():
    """The decoded size up to which ``stream="auto"`` holds a folder in memory: the environment's
    ``KUNET_MEMORY_BUDGET`` (bytes), else ``STREAM_FRACTION`` of :func:`available_memory`."""
    value = os.environ.get("KUNET_MEMORY_BUDGET")
    if value:
        try:
            return int(float(value))
        except ValueError:
            raise DataError(
                f"KUNET_MEMORY_BUDGET must be a number of bytes; got {value!r}"
            ) from None
    return int(STREAM_FRACTION * available_memory())


def _decoded_bytes(shape, channels):
    """Memory of one decoded pair: a float32 image with ``channels`` and an int32 mask."""
    return math.prod(shape) * (4 * channels + 4)


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

    @property
    def shape(self):
        """The spatial shape: (H, W), or (D, H, W) for a volume."""
        return self.image.shape[:-1]

    @property
    def channels(self):
        return self.image.shape[-1]

    def load(self, cache=True):
        """``(image, mask)``: the arrays held."""
        return self.image, self.mask


@dataclass(eq=False)
class StreamedSample:
    """One image/mask pair on disk, decoded when needed: ``load()`` (or ``image``/``mask``) reads,
    checks and normalizes it as :func:`load_folder` does (the same errors, naming the file),
    through its folder's :class:`DecodedCache`. ``shape`` (spatial) and ``channels`` (as trained
    on) come from the files' headers."""

    name: str
    image_path: Path
    mask_path: Path
    shape: tuple
    channels: int
    raw: str | None = None
    meta: object = None
    reader: object = field(default=None, repr=False)

    def load(self, cache=True):
        """``(image, mask)``: float32 (*shape, channels), normalized as its folder says; int32.
        ``cache=False``: taken from the cache if it is there, else decoded without being kept."""
        return self.reader.load(self, cache)

    @property
    def image(self):
        """The decoded image (each access goes through the cache; prefer :meth:`load`)."""
        return self.load()[0]

    @property
    def mask(self):
        return self.load()[1]


class DecodedCache:
    """A least-recently-used cache of decoded pairs bounded in bytes, safe across threads.

    ``get(key, read)`` returns the cached value or calls ``read()`` -> ``(value, nbytes)``; a key
    being read by one thread is waited for by the others (one decode per pair at a time). Entries
    beyond ``max_bytes`` are dropped, oldest first, except the most recent one (a validation image
    larger than the cache is still decoded once for all its tiles).
    """

    def __init__(self, max_bytes=CACHE_BYTES):
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = 0
        self._entries = OrderedDict()  # key -> (value, nbytes)
        self._bytes = 0
        self._lock = threading.Lock()
        self._reading = {}  # key -> threading.Event

    def __len__(self):
        return len(self._entries)

    @property
    def nbytes(self):
        return self._bytes

    def clear(self):
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def get(self, key, read, keep=True):
        """The value of ``key``: cached, or ``read()`` (and kept unless ``keep`` is False)."""
        if not keep:
            with self._lock:
                if key in self._entries:
                    self.hits += 1
                    return self._entries[key][0]
                self.misses += 1
            return read()[0]
        while True:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return self._entries[key][0]
                event = self._reading.get(key)
                if event is None:
                    event = self._reading[key] = threading.Event()
                    break
            event.wait()  # another thread reads it: cached when it is done (or read here again)
        try:
            value, size = read()
        finally:
            with self._lock:
                del self._reading[key]
                event.set()
        with self._lock:
            self.misses += 1
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
        return value

    def __getstate__(self):  # a copy (in a worker process) starts empty
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_bytes"])


class _Notes:
    """What reading one pair had to guess, kept to be said in the folder's order (pairs are read in
    worker threads) by a :class:`kunet.io.Guesses`, which refuses them under ``strict``."""

    def __init__(self):
        self.items = []

    def note(self, path, text):
        self.items.append((path, text))


def _read_pair(image_path, mask_path, nan_policy, guesses, volumes):
    """The image as stored (float32, channels last), its mask (int32) and, for a volume, its
    :class:`kunet.volumes.VolumeMeta`; DataError naming the file for an unreadable file, NaN/inf
    (``nan_policy`` 'error') or an image and mask of different sizes."""
    if volumes:
        image, meta = _volumes.read_volume(image_path, nan_policy)
        mask = _volumes.read_volume_mask(mask_path, guesses)[0]
        if image.shape[:3] != mask.shape:
            raise DataError(
                f"{mask_path} is {_dims(mask.shape)} (DxHxW) but its image {image_path} is "
                f"{_dims(image.shape[:3])}"
            )
        return image, mask, meta
    image = read_image(image_path, nan_policy, guesses)
    mask = read_mask(mask_path, guesses)
    _check_sizes(image_path, image.shape[:2], mask_path, mask.shape)
    return image, mask, None


def _check_sizes(image_path, image_shape, mask_path, mask_shape):
    if tuple(image_shape) != tuple(mask_shape):
        raise DataError(
            f"{mask_path} is {mask_shape[1]}x{mask_shape[0]} (WxH) but its image "
            f"{image_path} is {image_shape[1]}x{image_shape[0]}"
        )


def _check_labels(mask, mask_path, num_classes):
    """The largest label of ``mask``; DataError when it is out of ``num_classes``' range."""
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
    return top


def _header(image_path, mask_path, volumes):
    """``(shape, channels as stored, stored pixel type, meta)`` of a pair from its files' headers:
    DataError naming the file when one cannot be read or their sizes differ."""
    if volumes:
        shape, channels, meta = _volumes.volume_header(image_path)
        mask_shape = _volumes.volume_header(mask_path, mask=True)[0]
        if mask_shape != shape:
            raise DataError(
                f"{mask_path} is {_dims(mask_shape)} (DxHxW) but its image {image_path} is "
                f"{_dims(shape)}"
            )
        return shape, channels, meta.dtype, meta
    height, width, channels = image_header(image_path)
    _check_sizes(image_path, (height, width), mask_path, mask_header(mask_path))
    return (height, width), channels, image_dtype(image_path), None


class _Reader:
    """How a streamed folder's pairs are decoded: the checks and conversions of
    :func:`load_folder` (``num_classes``, ``channels``, ``nan_policy``, ``strict``) and the
    normalization, with a :class:`DecodedCache`."""

    def __init__(self, num_classes, channels, nan_policy, strict, volumes, cache_bytes):
        self.num_classes = num_classes
        self.channels = channels
        self.nan_policy = nan_policy
        self.strict = strict
        self.volumes = volumes
        self.normalization = None  # (method, value_range, nan_policy) once normalized
        self.cache = DecodedCache(CACHE_BYTES if cache_bytes is None else cache_bytes)

    def normalize(self, method, value_range, nan_policy):
        self.normalization = (method, value_range, nan_policy)
        self.cache.clear()

    def decode(self, sample, notes, conversions):
        """``(image, mask, largest label)`` of ``sample``, checked as :func:`load_folder` checks a
        pair (its guesses in ``notes``, channel conversions in ``conversions``)."""
        read_policy = "error" if self.nan_policy == "error" else "ignore"
        image, mask, _ = _read_pair(
            sample.image_path, sample.mask_path, read_policy, notes, self.volumes
        )
        if tuple(image.shape[:-1]) != tuple(sample.shape):
            raise DataError(
                f"{sample.image_path} is {_dims(image.shape[:-1])} but was {_dims(sample.shape)} "
                "when its folder was read: was it replaced while kunet ran?"
            )
        top = _check_labels(mask, sample.mask_path, self.num_classes)
        image = to_channels(image, self.channels, sample.image_path, conversions)
        if self.normalization is not None:
            method, value_range, nan_policy = self.normalization
            image = normalize(image, nan_policy, method, value_range)
        return image, mask, top

    def load(self, sample, cache=True):
        def read():
            guesses = Guesses(self.strict)  # said when the folder was read; refused if strict
            image, mask, _ = self.decode(sample, guesses, guesses)
            return (image, mask), image.nbytes + mask.nbytes

        return self.cache.get(sample.name, read, keep=cache)


def _ordered(fn, items, workers):
    """``fn(item)`` for each item, in order, computed up to ``workers`` ahead in threads."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    items = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="kunet-read") as pool:
        pending = deque(pool.submit(fn, item) for item in itertools.islice(items, workers))
        try:
            while pending:
                future = pending.popleft()
                for item in itertools.islice(items, 1):
                    pending.append(pool.submit(fn, item))
                yield future.result()
        finally:
            for future in pending:
                future.cancel()


@dataclass
class FolderData:
    """Loaded pairs plus what was inferred: ``num_classes`` (with background, >= 2), ``channels``
    and ``notes`` (what had to be guessed, see :class:`kunet.io.Guesses`).

    ``samples`` are :class:`Sample` (in memory) or, for a streamed folder (``streamed``),
    :class:`StreamedSample`; both give ``load() -> (image, mask)``, ``shape`` and ``channels``.
    ``statistics``: the plan's :class:`kunet.plan.DatasetStatistics`, gathered while a streamed
    folder was checked (``load_folder(..., fingerprint=True)``). ``decoded_bytes``: the memory the
    decoded pairs take (or would take, streamed)."""

    samples: list
    num_classes: int
    channels: int
    notes: list = field(default_factory=list)  # what was guessed, one line per kind
    normalized: str | None = None  # the normalization applied, None: images as stored
    statistics: object = None
    reader: object = field(default=None, repr=False)
    decoded_bytes: int = 0

    @property
    def model_num_classes(self):
        return model_num_classes(self.num_classes)

    @property
    def streamed(self):
        """Whether the pairs stay on disk, decoded when needed."""
        return self.reader is not None

    @property
    def spatial_dims(self):
        """2 for images, 3 for volumes."""
        return len(self.samples[0].shape)

    def normalize(self, method="percentile", value_range=None, nan_policy="error"):
        """Normalize every sample's image (:func:`kunet.io.normalize`): in place, or for a streamed
        folder as each is decoded; once only."""
        if self.normalized:
            raise ValueError(f"the images are normalized already ({self.normalized})")
        if self.reader is not None:
            normalize(np.zeros((1, 1), "float32"), nan_policy, method, value_range)  # the checks
            self.reader.normalize(method, value_range, nan_policy)
        else:
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
    stream="auto",
    fingerprint=False,
    workers=None,
    cache_bytes=None,
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
        stream: False: decode every pair into memory; True: stream them from disk (each pair is
            still decoded and checked once here, one at a time, then decoded again when used);
            "auto": stream when the decoded pairs would exceed :func:`memory_budget` (read from
            the files' headers).
        fingerprint: while checking a streamed folder, also gather the plan's statistics
            (``result.statistics``, which :func:`kunet.plan.fingerprint` uses), so that planning
            reads each file once.
        workers: threads decoding a streamed folder while it is checked (default 2).
        cache_bytes: the size of a streamed folder's :class:`DecodedCache` (default 64 MiB).
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise DataError(f"num_classes must be a positive int; got {num_classes!r}")
    if stream not in (True, False, "auto"):
        raise ValueError(f"stream must be True, False or 'auto'; got {stream!r}")
    check_nan_policy(nan_policy)
    warn = guesses is None
    guesses = Guesses() if guesses is None else guesses
    if num_classes == 1:
        num_classes = 2
    pairs = pair_files(images, masks, volumes)
    if stream is False:
        data = _load_in_memory(pairs, num_classes, channels, nan_policy, guesses, volumes)
    else:
        headers = [_header(ip, mp, volumes) for _, ip, mp in pairs]
        target = channels or (3 if any(h[1] == 3 for h in headers) else 1)
        decoded = sum(_decoded_bytes(h[0], target) for h in headers)
        if stream == "auto" and decoded <= memory_budget():
            data = _load_in_memory(pairs, num_classes, channels, nan_policy, guesses, volumes)
        else:
            data = _check_streamed(
                pairs, headers, num_classes, target, nan_policy, guesses, volumes,
                normalization and (normalization, value_range), fingerprint,
                STREAM_WORKERS if workers is None else int(workers), cache_bytes,
            )  # fmt: skip
            data.decoded_bytes = decoded
    if warn:
        guesses.emit()
    data.notes = guesses.lines()
    if normalization is not None and not data.normalized:
        data.normalize(normalization, value_range, nan_policy)
    return data


def _infer_classes(num_classes, largest, largest_path, guesses):
    if num_classes is not None:
        return num_classes
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
    return num_classes


def _load_in_memory(pairs, num_classes, channels, nan_policy, guesses, volumes):
    """Every pair decoded, checked and held (:func:`load_folder` with ``stream=False``)."""
    raw = []
    largest, largest_path = 0, None
    read_policy = "error" if nan_policy == "error" else "ignore"
    for stem, image_path, mask_path in pairs:
        _failpoints.reached("data:read")
        image, mask, meta = _read_pair(image_path, mask_path, read_policy, guesses, volumes)
        dtype = meta.dtype if volumes else image_dtype(image_path)
        top = _check_labels(mask, mask_path, num_classes)
        if top > largest:
            largest, largest_path = top, mask_path
        raw.append((stem, image_path, mask_path, image, mask, dtype, meta))
    num_classes = _infer_classes(num_classes, largest, largest_path, guesses)
    if channels is None:
        channels = 3 if any(r[3].shape[-1] == 3 for r in raw) else 1
    samples = [
        Sample(stem, ip, mp, to_channels(image, channels, ip, guesses), mask, raw=dtype, meta=meta)
        for stem, ip, mp, image, mask, dtype, meta in raw
    ]
    data = FolderData(samples, num_classes, channels)
    data.decoded_bytes = sum(s.image.nbytes + s.mask.nbytes for s in samples)
    return data


def _check_streamed(
    pairs, headers, num_classes, channels, nan_policy, guesses, volumes, normalization,
    fingerprint, workers, cache_bytes,
):  # fmt: skip
    """Every pair decoded and checked once, one at a time (a few ahead in threads), with the
    guesses said in the folder's order; the pairs stay on disk (:func:`load_folder`,
    ``stream=True``)."""
    reader = _Reader(num_classes, channels, nan_policy, guesses.strict, volumes, cache_bytes)
    if normalization:
        reader.normalize(*normalization, nan_policy)
    samples = [
        StreamedSample(stem, ip, mp, shape, channels, raw=dtype, meta=meta, reader=reader)
        for (stem, ip, mp), (shape, _, dtype, meta) in zip(pairs, headers, strict=True)
    ]
    stats = None
    if fingerprint:
        from kunet.plan import DatasetStatistics

        stats = DatasetStatistics(normalization[0] if normalization else None)

    def check(sample):
        notes, conversions = _Notes(), _Notes()
        image, mask, top = reader.decode(sample, notes, conversions)
        return image, mask, top, notes.items, conversions.items

    largest, largest_path, converted = 0, None, []
    results = _ordered(check, samples, workers)
    try:
        for sample, (image, mask, top, notes, conversions) in zip(samples, results, strict=True):
            _failpoints.reached("data:read")
            for path, text in notes:
                guesses.note(path, text)
            converted += conversions
            if top > largest:
                largest, largest_path = top, sample.mask_path
            if stats is not None:
                stats.add(image, mask, sample.raw)
            del image, mask
    finally:
        results.close()  # on an error: no more reads started, the running ones finish
    num_classes = _infer_classes(num_classes, largest, largest_path, guesses)
    for path, text in converted:  # said after the classes, as in memory
        guesses.note(path, text)
    reader.num_classes = num_classes
    data = FolderData(samples, num_classes, channels, statistics=stats, reader=reader)
    data.normalized = normalization[0] if normalization else None
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
    """What PatchDataset and TileDataset share: the samples, their classes, channels and sizes, and
    the batches prepared ahead.

    ``prefetch`` threads prepare the next batches while one is used (default: ``STREAM_WORKERS``
    for streamed samples, whose decoding takes time; none in memory). Each batch is computed for
    its ``(epoch, index)``, so the batches are the same with or without them, on every backend.
    (Keras' own ``workers`` > 1 run an enqueuer instead, which ``fit`` starts before its first
    epoch and drains into the next one: the batches an epoch trains on then shift by one.)

    A pair that cannot be decoded (a streamed file damaged or replaced after its folder was read)
    raises :class:`DataError` naming the file and is kept as ``error``: a backend that wraps the
    exceptions of its input pipeline (TensorFlow's tf.data) loses its type, not the error."""

    def __init__(self, samples, num_classes, patch_size, batch_size, what, prefetch=None, **kwargs):
        if not samples:
            raise DataError(f"no {what} images")
        # In memory, one loader and nothing ahead: batches are prepared while the step runs on
        # TensorFlow (Keras feeds them through tf.data without autotuning, whose threads otherwise
        # competed with the step on small machines: benchmarks/README.md).
        kwargs.setdefault("workers", 1)
        super().__init__(**kwargs)
        self.samples = list(samples)
        self.streamed = any(isinstance(s, StreamedSample) for s in self.samples)
        if prefetch is None:
            keras_parallel = self.workers > 1 or self.use_multiprocessing
            prefetch = STREAM_WORKERS if self.streamed and not keras_parallel else 0
        self.prefetch = int(prefetch)
        self.num_classes = int(num_classes)
        self.model_num_classes = model_num_classes(self.num_classes)
        self.channels = self.samples[0].channels
        self.spatial_dims = len(self.samples[0].shape)  # 2: images, 3: volumes
        self.patch_size = _size(patch_size, self.spatial_dims)
        self.batch_size = int(batch_size)
        self.error = None
        self._ahead = {}  # (epoch, index) -> Future of the batch
        self._lock = threading.Lock()
        self._pool = None

    def _epoch(self):
        return 0

    def _batch(self, index, epoch):
        raise NotImplementedError

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        epoch = self._epoch()
        if not self.prefetch:
            return self._batch(index, epoch)
        with self._lock:
            future = self._ahead.pop((epoch, index), None)
            for key in [k for k in self._ahead if k[0] != epoch or k[1] < index]:
                self._ahead.pop(key).cancel()  # another epoch's, or passed: not wanted
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="kunet-batch")
            for k in range(index + 1, min(index + 1 + self.prefetch, len(self))):
                if (epoch, k) not in self._ahead:
                    self._ahead[(epoch, k)] = self._pool.submit(self._batch, k, epoch)
        return future.result() if future is not None else self._batch(index, epoch)

    def __getstate__(self):  # a copy (a worker process) prepares nothing ahead yet
        state = dict(self.__dict__)
        state.update(_ahead={}, _lock=None, _pool=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _load(self, i, cache=True):
        try:
            return self.samples[i].load(cache)
        except DataError as e:
            self.error = e
            raise


class PatchDataset(_SampleDataset):
    """Random (augmented) ``patch_size`` patches of the samples (in memory or streamed), for
    training.

    A fraction ``foreground`` of the patches (default 1/3, as in nnU-Net) is centred on a random
    foreground pixel, so that small or sparse objects are seen often; the rest are placed uniformly.

    ``patches_per_epoch`` defaults to enough patches to cover the training images twice (at least
    16). Deterministic: batch ``i`` of epoch ``e`` depends only on ``(seed, e, i)``, whether the
    samples are in memory or streamed. The epoch counter advances in ``on_epoch_end`` (set
    :attr:`epoch` to resume). Each epoch visits the images in a shuffled order (``shuffle=True``),
    cycling until ``patches_per_epoch`` patches; each patch of a streamed sample decodes it (kept in
    the cache only when every training image fits in it).

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
        self._foreground_rows = {}  # in memory: sample -> cumulative foreground per row (slice)
        if patches_per_epoch is None:
            area = sum(math.prod(s.shape) for s in self.samples)
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
        # Each epoch visits the images in a cycle, which defeats a least-recently-used cache unless
        # every one fits in it: streamed patches are cached only then (else decoded, not kept).
        reader = getattr(self.samples[0], "reader", None)
        self._cache = reader is not None and reader.cache.max_bytes >= sum(
            _decoded_bytes(s.shape, s.channels) for s in self.samples
        )

    def __len__(self):
        return math.ceil(self.patches_per_epoch / self.batch_size)

    def _order(self, epoch):
        n = len(self.samples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, 0xA11]).permutation(n)

    def _epoch(self):
        return self.epoch

    def _batch(self, index, epoch):
        order = self._order(epoch)
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.patches_per_epoch)
        images, masks = [], []
        for k in range(start, stop):
            i = order[k % len(order)]
            image, mask = self._load(i, self._cache)
            rng = np.random.default_rng([self.seed, epoch, k])
            centre = None
            if self.foreground > 0 and rng.uniform() < self.foreground:
                centre = self._foreground_centre(i, mask, rng)
            image, mask = self.augment.patch(image, mask, self.patch_size, rng=rng, centre=centre)
            images.append(image)
            masks.append(mask)
        return np.stack(images).astype("float32"), _targets(masks, self.num_classes)

    def _foreground_centre(self, i, mask, rng):
        """A random foreground pixel ((y, x), or voxel (z, y, x)) of sample ``i`` (its ``mask``),
        or None: the ``n``-th foreground pixel in row-major order, ``n`` uniform, found from the
        foreground count per row (per slice) rather than a list of every foreground pixel."""
        ends = self._foreground_rows.get(i)
        if ends is None:
            per_row = np.count_nonzero((mask > 0).reshape(mask.shape[0], -1), axis=1)
            ends = np.cumsum(per_row)
            if not self.streamed:
                self._foreground_rows[i] = ends
        total = int(ends[-1]) if ends.size else 0
        if total == 0:
            return None
        n = int(rng.integers(total))
        row = int(np.searchsorted(ends, n, side="right"))
        within = n - (int(ends[row - 1]) if row else 0)
        rest = int(np.flatnonzero(mask[row] > 0)[within])
        return (row, *(int(c) for c in np.unravel_index(rest, mask.shape[1:])))

    def on_epoch_end(self):
        self.epoch += 1


class TileDataset(_SampleDataset):
    """Every sample cut into a fixed grid of ``patch_size`` tiles, in order: for validation.

    The last tile of a row or column is flush with the image's edge; images smaller than the tile are
    mirrored to fill it. Same ``(x, y)`` format as :class:`PatchDataset`. Streamed samples are
    decoded one at a time (the tiles of an image are consecutive: its decoded pair stays cached
    while they are cut), so validation holds about one image.
    """

    def __init__(self, samples, num_classes, patch_size=128, batch_size=4, **kwargs):
        super().__init__(samples, num_classes, patch_size, batch_size, "validation", **kwargs)
        self.tiles = [
            (i, corner)
            for i, s in enumerate(self.samples)
            for corner in _augment.grid_crops(s.shape, self.patch_size)
        ]

    def __len__(self):
        return math.ceil(len(self.tiles) / self.batch_size)

    def _batch(self, index, epoch):
        images, masks = [], []
        for i, corner in self.tiles[index * self.batch_size : (index + 1) * self.batch_size]:
            image, mask = self._load(i)
            image, mask = _augment.crop(image, mask, corner, self.patch_size)
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
    stream="auto",
    cache_bytes=None,
    **kwargs,
):
    """Training and validation datasets from ``images``/``masks`` folders (``volumes=True``:
    folders of 3D volumes, see :mod:`kunet.volumes`).

    Returns ``(train, val)``: a :class:`PatchDataset` of random augmented patches and a
    :class:`TileDataset` of the held-out images' tiles. Both carry ``num_classes`` (mask classes,
    with background), ``model_num_classes`` (what ``kunet.UNet(num_classes=...)`` needs: 1 for binary)
    and ``channels``. ``nan_policy``, ``guesses``, ``stream`` and ``cache_bytes`` are
    :func:`load_folder`'s. ``prefetch``: threads preparing batches ahead (default 2 when streamed,
    none in memory; the batches stay the same). Other ``kwargs`` (``workers``,
    ``use_multiprocessing``, ``max_queue_size``) go to ``keras.utils.PyDataset``.
    """
    data = load_folder(
        images,
        masks,
        num_classes=num_classes,
        channels=channels,
        nan_policy=nan_policy,
        guesses=guesses,
        volumes=volumes,
        stream=stream,
        workers=kwargs.get("prefetch"),
        cache_bytes=cache_bytes,
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
