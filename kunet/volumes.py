"""3D volumes: reading (NIfTI, ``.npy``, multi-page TIFF stacks), normalization, writing masks.

Conventions (the 3D counterparts of :mod:`kunet.io`'s):

* A volume is read as float32 ``(D, H, W, C)``, channels last. A mask is read as int32 ``(D, H, W)``
  class indices (a mask holding only 0 and 255 is binary -> 0/1, as in 2D).
* Axis order: NIfTI stores voxels as ``(x, y, z)``; kunet reverses them to ``(z, y, x)`` =
  ``(D, H, W)`` (as ITK/SimpleITK arrays and TIFF stacks are laid out: slice ``k`` is the ``(y, x)``
  plane at ``z = k``), and reverses them back when writing, so a written mask lines up with its
  image voxel for voxel. A 4D NIfTI ``(x, y, z, c)`` gives C = c channels (a 5D one
  ``(x, y, z, 1, c)`` too). ``.npy``: ``(D, H, W)`` or ``(D, H, W, C)``. TIFF: the pages are D
  (tifffile's ``Z``/``Q``/``I`` axis), ``C``/``S`` axes become channels.
* :class:`VolumeMeta` keeps what a written mask needs to match its source: the format, and for
  NIfTI the affine and header (voxel spacing, orientation).
* NaN/inf voxels follow ``nan_policy`` as in :mod:`kunet.io`; a NaN in a mask is always an error.
* :func:`volume_header` gives a volume's shape and channels from its header, reading no voxel (what
  a streamed folder of volumes checks first).
* :func:`write_mask` writes atomically (a temporary file in the target folder, then a rename) and
  never replaces an existing file unless ``overwrite=True``.

NIfTI needs nibabel (``pip install kunet[nifti]``), TIFF stacks tifffile (``pip install kunet[cli]``);
both are imported only when such a file is read or written. Every problem raises
:class:`kunet.io.DataError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kunet import io as kio
from kunet.io import (
    DataError,
    _note,
    _one_line,
    apply_nan_policy,
    class_index_values,
    count_nonfinite,
)

__all__ = [
    "VOLUME_SUFFIXES",
    "VolumeMeta",
    "volume_suffix",
    "volume_stem",
    "is_volume_file",
    "holds_volumes",
    "list_volumes",
    "read_volume",
    "volume_header",
    "read_volume_mask",
    "load_volume",
    "write_mask",
    "mask_name",
]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npy", ".tif", ".tiff")
# Suffixes that are volumes whatever the folder (a .tif may be a 2D image or a stack: --3d says).
VOLUME_ONLY_SUFFIXES = (".nii.gz", ".nii", ".npy")


@dataclass
class VolumeMeta:
    """Where a volume came from: ``format`` ("nifti", "npy", "tiff"), the shape as read (D, H, W),
    the stored dtype, and for NIfTI the ``affine`` (4x4, voxel (x, y, z) -> world) and ``header``."""

    path: Path
    format: str
    shape: tuple
    dtype: str
    affine: np.ndarray | None = None
    header: object = None

    @property
    def spacing(self):
        """Voxel size along (D, H, W) (NIfTI's zooms reversed), or None when unknown."""
        if self.header is None:
            return None
        zooms = self.header.get_zooms()[:3]
        return tuple(float(z) for z in reversed(zooms))


def volume_suffix(path):
    """The volume suffix of ``path`` (``.nii.gz`` counts as one), lower case, or ''."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def volume_stem(path):
    """The file name without its volume suffix (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    suffix = volume_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else Path(path).stem


def is_volume_file(path):
    path = Path(path)
    return bool(volume_suffix(path)) and not path.name.startswith(".")


def list_volumes(folder, what="images"):
    """The volume files of ``folder`` sorted by name; DataError if it is missing or has none, or
    holds 2D images beside them."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what} folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what} path {folder} is not a folder")
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in entries if is_volume_file(p)]
    flat = [p for p in entries if kio.is_image_file(p) and not is_volume_file(p)]
    if flat:
        raise DataError(
            f"{what} folder {folder} mixes 2D images ({kio.show(p.name for p in flat)}) with "
            "volumes; keep them in separate folders"
        )
    if not files:
        raise DataError(
            f"{what} folder {folder} holds no volume files ({', '.join(VOLUME_SUFFIXES)})"
        )
    return files


def holds_volumes(folder):
    """Whether ``folder`` holds NIfTI or ``.npy`` files (what makes a folder a volume folder
    without ``--3d``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return volume_suffix(folder) in VOLUME_ONLY_SUFFIXES
    return any(
        p.is_file() and not p.name.startswith(".") and volume_suffix(p) in VOLUME_ONLY_SUFFIXES
        for p in folder.iterdir()
    )


# ---------------------------------------------------------------------------------- reading
def _nibabel(path):
    try:
        import nibabel
    except ImportError:
        raise DataError(
            f"{path}: reading or writing NIfTI needs nibabel: pip install kunet[nifti]"
        ) from None
    return nibabel


def _tifffile(path):
    try:
        import tifffile
    except ImportError:
        raise DataError(
            f"{path}: TIFF stacks need tifffile: pip install kunet[cli] (or pip install tifffile)"
        ) from None
    return tifffile


def _read_nifti(path):
    nib = _nibabel(path)
    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)  # scl_slope/inter applied (as nibabel's get_fdata)
    except Exception as e:  # noqa: BLE001 - any decoder failure is an unreadable file
        raise DataError(f"{path}: cannot read NIfTI ({_one_line(e)})") from None
    stored = str(img.get_data_dtype())
    if array.ndim == 5 and array.shape[3] == 1:  # (x, y, z, 1, c): NIfTI's vector layout
        array = array[:, :, :, 0]
    if array.ndim == 3:
        array = array.transpose(2, 1, 0)
    elif array.ndim == 4:
        array = array.transpose(2, 1, 0, 3)
    else:
        raise DataError(
            f"{path}: expected a 3D NIfTI volume (x, y, z) or (x, y, z, channels); got shape "
            f"{array.shape}"
        )
    meta = VolumeMeta(Path(path), "nifti", array.shape[:3], stored, img.affine.copy(), img.header)
    return np.ascontiguousarray(array), meta


def _read_npy(path):
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read .npy ({_one_line(e)})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected a numeric array; got dtype {array.dtype}")
    if array.ndim not in (3, 4):
        raise DataError(
            f"{path}: expected a volume of shape (D, H, W) or (D, H, W, C); got shape {array.shape}"
        )
    return array, VolumeMeta(Path(path), "npy", array.shape[:3], str(array.dtype))


def _tiff_layout(path, shape, axes):
    """How :func:`_read_tiff` lays out a series of ``shape`` and ``axes``: (the length-1 axes kept,
    the channel axis or None, the (D, H, W, C) shape); DataError naming the file when it is not a
    stack of 2D pages."""
    axes = axes.upper()
    # Squeeze length-1 axes other than Y and X; then the stack axis is whatever is left of them.
    keep = [i for i, a in enumerate(axes) if shape[i] > 1 or a in "YX"]
    kept = [shape[i] for i in keep]
    left = "".join(axes[i] for i in keep)
    channel_axes = [i for i, a in enumerate(left) if a in "CS"]
    channel = channel_axes[0] if len(channel_axes) == 1 else None
    if channel is not None:
        out = [n for i, n in enumerate(kept) if i != channel] + [kept[channel]]
        left = left[:channel] + left[channel + 1 :]
    elif not channel_axes:
        out = [*kept, 1]
    else:
        out = kept
    if len(out) != 4 or len(left) != 3 or left[1:] != "YX":
        raise DataError(
            f"{path}: expected a stack of 2D pages (a 3D TIFF, axes ZYX or ZYXC); got shape "
            f"{tuple(shape)} (axes {axes})"
        )
    return keep, channel, tuple(int(n) for n in out)


def _read_tiff(path):
    tifffile = _tifffile(path)
    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            axes = series.axes
            array = np.asarray(series.asarray())
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read TIFF ({_one_line(e)})") from None
    keep, channel, shape = _tiff_layout(path, array.shape, axes)
    array = array.reshape([array.shape[i] for i in keep])
    array = np.moveaxis(array, channel, -1) if channel is not None else array.reshape(shape)
    return array, VolumeMeta(Path(path), "tiff", array.shape[:3], str(array.dtype))


def _read_any(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = volume_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        return _read_nifti(path)
    if suffix == ".npy":
        return _read_npy(path)
    if suffix in (".tif", ".tiff"):
        return _read_tiff(path)
    raise DataError(f"{path}: not a volume file ({', '.join(VOLUME_SUFFIXES)})")


def volume_header(path, mask=False):
    """``((D, H, W), channels, meta)`` of the volume file at ``path`` as :func:`read_volume` (or,
    with ``mask``, :func:`read_volume_mask`: channels 1) will give them, from the file's header: no
    voxel is read. DataError naming the file when the header cannot be read or holds no volume."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = volume_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        nib = _nibabel(path)
        try:
            img = nib.load(str(path))  # the header; voxels are read on demand
            shape, stored = tuple(int(n) for n in img.shape), str(img.get_data_dtype())
            affine = img.affine.copy()
        except Exception as e:  # noqa: BLE001 - any decoder failure is an unreadable file
            raise DataError(f"{path}: cannot read NIfTI ({_one_line(e)})") from None
        if len(shape) == 5 and shape[3] == 1:
            shape = shape[:3] + shape[4:]
        if len(shape) not in (3, 4):
            raise DataError(
                f"{path}: expected a 3D NIfTI volume (x, y, z) or (x, y, z, channels); got shape "
                f"{shape}"
            )
        shape = (*shape[2::-1], *shape[3:])
        meta = VolumeMeta(path, "nifti", shape[:3], stored, affine, img.header)
    elif suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            shape, dtype = tuple(int(n) for n in array.shape), array.dtype
            del array
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: cannot read .npy ({_one_line(e)})") from None
        if dtype.kind not in "biuf":
            raise DataError(f"{path}: expected a numeric array; got dtype {dtype}")
        if len(shape) not in (3, 4):
            raise DataError(
                f"{path}: expected a volume of shape (D, H, W) or (D, H, W, C); got shape {shape}"
            )
        meta = VolumeMeta(path, "npy", shape[:3], str(dtype))
    elif suffix in (".tif", ".tiff"):
        tifffile = _tifffile(path)
        try:
            with tifffile.TiffFile(str(path)) as tif:
                series = tif.series[0]
                stored, axes = tuple(int(n) for n in series.shape), series.axes
                dtype = str(series.dtype)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: cannot read TIFF ({_one_line(e)})") from None
        shape = _tiff_layout(path, stored, axes)[2]
        meta = VolumeMeta(path, "tiff", shape[:3], dtype)
    else:
        raise DataError(f"{path}: not a volume file ({', '.join(VOLUME_SUFFIXES)})")
    if len(shape) == 3:
        shape = (*shape, 1)
    if mask:
        if shape[-1] != 1:
            raise DataError(f"{path}: expected a 3D mask (D, H, W); got an array of shape {shape}")
    elif min(shape) < 1:
        raise DataError(f"{path}: empty volume (shape {shape})")
    return shape[:3], shape[3], meta


def read_volume(path, nan_policy="error"):
    """The volume at ``path`` as float32 (D, H, W, C) in its stored value range, and its
    :class:`VolumeMeta`. NaN/inf voxels follow ``nan_policy`` ('error' raises DataError naming the
    file and the count, 'zero' sets them to 0, 'ignore' keeps them)."""
    array, meta = _read_any(path)
    if array.ndim == 3:
        array = array[..., None]
    if min(array.shape[:3]) < 1 or array.shape[-1] < 1:
        raise DataError(f"{path}: empty volume (shape {array.shape})")
    array = apply_nan_policy(array.astype("float32"), nan_policy, str(path))
    return array, meta


def read_volume_mask(path, guesses=None):
    """The mask at ``path`` as int32 (D, H, W) class indices, and its :class:`VolumeMeta`.

    A single-channel 4D volume is accepted; 0/255 masks become 0/1 (noted in ``guesses``)."""
    path = Path(path)
    array, meta = _read_any(path)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(
            f"{path}: expected a 3D mask (D, H, W); got an array of shape {array.shape}"
        )
    array = class_index_values(array, path)
    values = np.unique(array)
    top = values.max(initial=0)
    if values.size <= 2 and top in (255, 65535) and values.min() in (0, top):
        _note(guesses, path, f"mask values 0/{top:g} read as 0/1 (binary)")
        array = array == top
    return np.ascontiguousarray(array.astype("int32")), meta


def load_volume(
    path, channels=None, nan_policy="error", guesses=None, normalization="percentile",
    value_range=None,
):  # fmt: skip
    """What training and prediction feed the model for the volume file ``path``: read, checked for
    NaN/inf, converted to ``channels`` and normalized over the whole volume
    (:func:`kunet.io.normalize`). Returns (float32 (D, H, W, C), :class:`VolumeMeta`)."""
    kio.check_nan_policy(nan_policy)
    volume, meta = read_volume(path, "error" if nan_policy == "error" else "ignore")
    if channels is not None:
        volume = kio.to_channels(volume, channels, path, guesses)
    return kio.normalize(volume, nan_policy, normalization, value_range), meta


# ---------------------------------------------------------------------------------- writing
def mask_name(source, out_format=None):
    """The file name of the mask predicted for the volume file ``source``: the same stem and, by
    default, the same format (``a.nii.gz`` -> ``a.nii.gz``, ``a.tif`` -> ``a.tif``)."""
    suffix = out_format or volume_suffix(source)
    if suffix == ".nii":
        suffix = ".nii.gz"
    return volume_stem(source) + suffix


def _mask_dtype(mask):
    top = int(mask.max(initial=0))
    return np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32


def _save(tmp, mask, suffix, like):
    if suffix in (".nii", ".nii.gz"):
        nib = _nibabel(tmp)
        data = mask.transpose(2, 1, 0)  # (D, H, W) -> NIfTI's (x, y, z)
        if like is not None and like.format == "nifti":
            header = like.header.copy()
            header.set_data_dtype(data.dtype)
            img = nib.Nifti1Image(data, like.affine, header)
            img.header.set_slope_inter(1.0, 0.0)  # class indices, not scaled intensities
            img.set_qform(like.header.get_qform(), int(like.header["qform_code"]))
            img.set_sform(like.affine, int(like.header["sform_code"]) or 2)
        else:
            img = nib.Nifti1Image(
                data, np.eye(4) if like is None or like.affine is None else like.affine
            )
        img.header.set_intent("label")
        nib.save(img, tmp)
    elif suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, mask)
    elif suffix in (".tif", ".tiff"):
        _tifffile(tmp).imwrite(tmp, mask, photometric="minisblack", metadata={"axes": "ZYX"})
    else:
        raise DataError(
            f"{tmp}: cannot write a volume as {suffix or 'this'} (use {', '.join(VOLUME_SUFFIXES)})"
        )


def write_mask(path, mask, like=None, overwrite=False):
    """Write the class-index volume ``mask`` (D, H, W) to ``path`` (``.nii``/``.nii.gz``, ``.npy``
    or ``.tif``/``.tiff``, by its suffix), with the affine and header of ``like`` (the source
    image's :class:`VolumeMeta`) for NIfTI.

    The file appears whole or not at all (written to a temporary file beside it, flushed, then
    renamed). An existing ``path`` is a DataError unless ``overwrite=True``; the check and the
    rename are one step (a hard link, which fails if the name is taken), so a file made meanwhile
    is not replaced either. Returns ``path``.
    """
    from kunet.outputs import _fsync_dir, _fsync_file, temporary_path

    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise DataError(f"{path}: a volume mask must be (D, H, W); got shape {mask.shape}")
    if like is not None and tuple(like.shape) != mask.shape:
        raise DataError(
            f"{path}: the mask is {'x'.join(map(str, mask.shape))} (DxHxW) but its image "
            f"{like.path} is {'x'.join(map(str, like.shape))}"
        )
    if count_nonfinite(mask) or (mask.size and mask.min() < 0):
        raise DataError(f"{path}: a mask holds class indices >= 0")
    suffix = volume_suffix(path)
    if not suffix:
        raise DataError(f"{path}: unknown volume format (use {', '.join(VOLUME_SUFFIXES)})")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise DataError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    mask = mask.astype(_mask_dtype(mask))
    tmp = temporary_path(path, suffix=suffix)
    try:
        _save(str(tmp), mask, suffix, like)
        _fsync_file(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: no check-then-replace race
            except FileExistsError:
                raise DataError(
                    f"{path} already exists; pass overwrite=True (--overwrite) to replace it"
                ) from None
            except OSError:  # a file system without hard links: check, then rename
                if path.exists() or path.is_symlink():
                    raise DataError(
                        f"{path} already exists; pass overwrite=True (--overwrite) to replace it"
                    ) from None
                os.replace(tmp, path)
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path
