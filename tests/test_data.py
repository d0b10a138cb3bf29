"""kunet.io + kunet.data: folders of images/masks in every supported format, and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import kunet
from kunet import data, io


def _disks(h, w, classes, rng):
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), "uint8")
    for c in range(1, classes):
        cy, cx, r = rng.uniform(6, h - 6), rng.uniform(6, w - 6), rng.uniform(4, 7)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
    return mask


def make_folder(root, n=4, size=(40, 48), classes=2, seed=0):
    """images/ + masks/ with bright disks on noise; binary masks as 0/255 PNG, else class-index."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = _disks(*size, classes, rng)
        image = (60 * mask + rng.normal(40, 8, size)).clip(0, 255).astype("uint8")
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask * 255 if classes == 2 else mask).save(root / "masks" / f"im{i}.png")
    return root / "images", root / "masks"


# ---------------------------------------------------------------------------------- formats
def test_reads_every_image_format(tmp_path):
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 255, (20, 30), dtype="uint8")
    gray16 = gray8.astype("uint16") * 257
    rgb = rng.integers(0, 255, (20, 30, 3), dtype="uint8")
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, gray8])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray(gray16).save(tmp_path / "g16.tif")
    Image.fromarray(rgb).save(tmp_path / "rgb.tiff")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # a real 16-bit PNG
    shapes = {
        p: io.read_image(tmp_path / p).shape
        for p in ("g8.png", "g16.png", "rgb.png", "rgba.png", "rgb.jpg", "g16.tif", "rgb.tiff")
    }
    assert shapes["g8.png"] == shapes["g16.png"] == shapes["g16.tif"] == (20, 30, 1)
    assert shapes["rgb.png"] == shapes["rgba.png"] == shapes["rgb.jpg"] == (20, 30, 3)
    assert io.read_image(tmp_path / "g16.tif").max() == gray16.max()
    # Per-image normalization makes 8- and 16-bit versions of one picture the same input.
    np.testing.assert_allclose(
        io.normalize(io.read_image(tmp_path / "g8.png")),
        io.normalize(io.read_image(tmp_path / "g16.png")),
        atol=1e-5,
    )


def test_reads_every_mask_format(tmp_path):
    labels = np.zeros((8, 10), "uint8")
    labels[2:5, 3:7] = 1
    labels[6:, :2] = 2
    Image.fromarray(labels * 127).save(tmp_path / "bin255.png")  # values 0, 127, 254: indices
    Image.fromarray((labels > 0).astype("uint8") * 255).save(tmp_path / "binary.png")
    Image.fromarray(labels).save(tmp_path / "index.png")
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    Image.fromarray(labels.astype("uint16")).save(tmp_path / "index16.tif")
    np.testing.assert_array_equal(io.read_mask(tmp_path / "binary.png"), labels > 0)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "index.png"), labels)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "palette.png"), labels)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "index16.tif"), labels)
    assert io.read_mask(tmp_path / "index.png").dtype == np.int32
    Image.fromarray((labels > 0).astype("uint16") * 65535).save(tmp_path / "binary16.png")
    np.testing.assert_array_equal(io.read_mask(tmp_path / "binary16.png"), labels > 0)
    # JPEG masks are lossy: read as binary, thresholded at half range.
    Image.fromarray((labels > 0).astype("uint8") * 255).save(tmp_path / "binary.jpg", quality=95)
    jpeg = io.read_mask(tmp_path / "binary.jpg")
    assert set(np.unique(jpeg)) <= {0, 1} and (jpeg == (labels > 0)).mean() > 0.95


def test_written_masks_read_back_as_class_indices(tmp_path):
    labels = np.random.default_rng(0).integers(0, 4, (9, 11))
    io.write_mask(tmp_path / "m.png", labels, 4)
    assert Image.open(tmp_path / "m.png").mode == "P"
    np.testing.assert_array_equal(io.read_mask(tmp_path / "m.png"), labels)
    io.write_mask(tmp_path / "b.png", labels > 1, 2)
    np.testing.assert_array_equal(io.read_mask(tmp_path / "b.png"), labels > 1)


def test_load_folder_pairs_by_stem_and_infers_classes(tmp_path):
    images, masks = make_folder(tmp_path, n=3, classes=3)
    # Different suffixes pair by stem: a TIFF image with a PNG mask.
    Image.open(images / "im0.png").save(images / "im0.tif")
    (images / "im0.png").unlink()
    (images / "notes.txt").write_text("ignored")
    loaded = data.load_folder(images, masks)
    assert [s.name for s in loaded.samples] == ["im0", "im1", "im2"]
    assert loaded.num_classes == 3 and loaded.model_num_classes == 3 and loaded.channels == 1
    assert loaded.samples[0].image_path.suffix == ".tif"
    binary = data.load_folder(*make_folder(tmp_path / "b", n=2, classes=2))
    assert binary.num_classes == 2 and binary.model_num_classes == 1
    assert set(np.unique(binary.samples[0].mask)) == {0, 1}


def test_rgb_and_gray_mix_becomes_rgb(tmp_path):
    images, masks = make_folder(tmp_path, n=2)
    Image.open(images / "im1.png").convert("RGB").save(images / "im1.png")
    loaded = data.load_folder(images, masks)
    assert loaded.channels == 3
    assert all(s.image.shape[-1] == 3 for s in loaded.samples)


# ---------------------------------------------------------------------------------- datasets
def test_folder_datasets_batches(tmp_path):
    train, val = data.folder_datasets(
        *make_folder(tmp_path, n=5, classes=3), patch_size=32, batch_size=3, val_split=0.2, seed=1
    )
    assert isinstance(train, kunet.data.PatchDataset)
    assert len(train.samples) == 4 and len(val.samples) == 1
    x, y = train[0]
    assert x.shape == (3, 32, 32, 1) and x.dtype == np.float32
    assert y.shape == (3, 32, 32) and y.dtype == np.int32
    assert set(np.unique(y)) <= {0, 1, 2}
    xv, yv = val[0]
    assert xv.shape[1:] == (32, 32, 1) and len(val.tiles) == 4  # 40x48 in 32-px tiles: 2 x 2


def test_binary_targets_are_float_zero_one(tmp_path):
    train, _ = data.folder_datasets(*make_folder(tmp_path), patch_size=16, batch_size=2)
    _, y = train[0]
    assert y.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}


def test_batches_are_deterministic_and_change_each_epoch(tmp_path):
    folder = make_folder(tmp_path)
    a, _ = data.folder_datasets(*folder, patch_size=16, batch_size=2, seed=5)
    b, _ = data.folder_datasets(*folder, patch_size=16, batch_size=2, seed=5)
    np.testing.assert_array_equal(a[1][0], b[1][0])
    np.testing.assert_array_equal(a[1][0], a[1][0])  # indexing twice gives the same batch
    first = a[1][0]
    a.on_epoch_end()
    assert not np.array_equal(first, a[1][0])
    c, _ = data.folder_datasets(*folder, patch_size=16, batch_size=2, seed=6)
    assert not np.array_equal(first, c[1][0])


def test_split_is_seeded_and_disjoint():
    samples = list(range(10))
    train, val = data.split(samples, 0.3, seed=0)
    assert len(val) == 3 and not set(train) & set(val) and sorted(train + val) == samples
    assert data.split(samples, 0.3, seed=0) == (train, val)
    assert data.split([7], 0.3) == ([7], [7])  # one image: validate on it


def test_fit_takes_the_folder_dataset(tmp_path):
    train, val = data.folder_datasets(
        *make_folder(tmp_path), patch_size=16, batch_size=2, patches_per_epoch=4
    )
    model = kunet.UNet(
        num_classes=train.model_num_classes,
        filters=(4, 8),
        input_shape=(None, None, train.channels),
    )
    history = model.fit(train, validation_data=val, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert "val_dice" in history.history


# ---------------------------------------------------------------------------------- bad input
def _error(fn, *args, **kwargs):
    with pytest.raises(io.DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_image_without_mask_and_mask_without_image(tmp_path):
    images, masks = make_folder(tmp_path)
    (masks / "im2.png").unlink()
    assert "im2.png has no mask" in _error(data.load_folder, images, masks)
    images, masks = make_folder(tmp_path / "b")
    (images / "im3.png").unlink()
    assert "im3.png has no image" in _error(data.load_folder, images, masks)


def test_size_mismatch_names_the_files(tmp_path):
    images, masks = make_folder(tmp_path)
    Image.fromarray(np.zeros((40, 40), "uint8")).save(masks / "im1.png")
    message = _error(data.load_folder, images, masks)
    assert "im1.png" in message and "40x40" in message and "48x40" in message


def test_unreadable_file(tmp_path):
    images, masks = make_folder(tmp_path)
    (images / "im0.png").write_bytes(b"not a png at all")
    assert "im0.png: cannot read image" in _error(data.load_folder, images, masks)
    (images / "im0.tif").write_bytes(b"II*\x00garbage")
    (images / "im0.png").unlink()
    assert "im0.tif" in _error(data.load_folder, images, masks)


def test_mask_values_beyond_num_classes(tmp_path):
    images, masks = make_folder(tmp_path, classes=4)
    message = _error(data.load_folder, images, masks, num_classes=3)
    assert "masks/im" in message and "label 3" in message and "num_classes is 3" in message


def test_instance_label_masks_are_not_taken_for_classes(tmp_path):
    images, masks = make_folder(tmp_path, n=1)
    Image.fromarray(np.arange(40 * 48).reshape(40, 48).astype("uint16") % 200).save(
        masks / "im0.png"
    )
    assert "instance" in _error(data.load_folder, images, masks)
    assert data.load_folder(images, masks, num_classes=200).num_classes == 200


def test_empty_missing_and_duplicate(tmp_path):
    (tmp_path / "empty").mkdir()
    images, masks = make_folder(tmp_path / "d")
    assert "holds no image files" in _error(data.load_folder, tmp_path / "empty", masks)
    assert "does not exist" in _error(data.load_folder, tmp_path / "nope", masks)
    Image.open(images / "im0.png").save(images / "im0.jpg")
    assert "same stem" in _error(data.load_folder, images, masks)


def test_rgb_colour_masks_are_refused(tmp_path):
    images, masks = make_folder(tmp_path, n=1)
    colour = np.zeros((40, 48, 3), "uint8")
    colour[5:10, 5:10] = (255, 0, 0)
    Image.fromarray(colour).save(masks / "im0.png")
    assert "RGB mask" in _error(data.load_folder, images, masks)


def test_foreground_patches_find_sparse_objects(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.zeros((64, 64), "uint8")
    mask[50:53, 5:8] = 255  # one 3x3 object in a 64x64 image
    image = np.random.default_rng(0).integers(0, 255, (64, 64), dtype="uint8")
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    samples = data.load_folder(tmp_path / "images", tmp_path / "masks").samples

    def hits(foreground, augment=False):
        ds = data.PatchDataset(
            samples,
            2,
            patch_size=16,
            batch_size=8,
            patches_per_epoch=32,
            foreground=foreground,
            augment=augment,
        )
        return np.mean([y.reshape(len(y), -1).max(-1).mean() for _, y in (ds[i] for i in range(4))])

    assert hits(1.0) == 1.0  # every patch centred on the object
    assert hits(1.0, augment=True) > 0.9  # elastic warps may move the object off a 16-px patch
    assert hits(0.0) < 0.5  # uniform placement mostly misses it
    with pytest.raises(io.DataError):
        data.PatchDataset(samples, 2, foreground=1.5)
