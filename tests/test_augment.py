"""kunet.augment: image and mask move together, labels stay integers, a seed fixes everything."""

from __future__ import annotations

import numpy as np
import pytest

from kunet.augment import Augment, crop, grid_crops, sample_nearest


def _pair(h=24, w=24, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), "int32")
    mask[3:10, 4:15] = 1
    mask[12:20, 8:20] = 2 % classes
    image = np.concatenate(
        [mask[..., None].astype("float32"), rng.random((h, w, 1)).astype("float32")], axis=-1
    )
    return image, mask


def _dihedral(a):
    out = []
    for k in range(4):
        r = np.rot90(a, k)
        out += [r, np.flip(r, 1)]
    return out


def test_same_seed_same_result_and_different_seed_differs():
    image, mask = _pair()
    aug = Augment()
    a = aug.patch(image, mask, 16, seed=3)
    b = aug.patch(image, mask, 16, seed=3)
    c = aug.patch(image, mask, 16, seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_patch_shapes_dtypes_and_labels_kept():
    image, mask = _pair()
    for seed in range(10):
        img, msk = Augment().patch(image, mask, (16, 12), seed=seed)
        assert img.shape == (16, 12, 2) and img.dtype == np.float32
        assert msk.shape == (16, 12) and msk.dtype == mask.dtype
        assert set(np.unique(msk)) <= set(np.unique(mask))


def test_flips_and_rotations_are_the_same_dihedral_map_on_image_and_mask():
    image, mask = _pair()
    aug = Augment(scale=None, elastic=0.0, brightness=0.0, contrast=None, gamma=None)
    seen = set()
    for seed in range(24):
        img, msk = aug(image, mask, seed=seed)
        # Pure flips/rotations sample whole pixels: the image's label channel equals the mask.
        np.testing.assert_array_equal(img[..., 0], msk)
        matches = [i for i, d in enumerate(_dihedral(mask)) if np.array_equal(d, msk)]
        assert matches, "not a flip/rotation of the mask"
        seen.add(matches[0])
        ok = [i for i, d in enumerate(_dihedral(image[..., 1])) if np.allclose(d, img[..., 1])]
        assert set(matches) & set(ok)
    assert len(seen) >= 5  # several of the 8 dihedral transforms are drawn


def test_scale_and_elastic_move_image_and_mask_together():
    image, mask = _pair(48, 48)
    aug = Augment(elastic=10.0, elastic_prob=1.0, brightness=0.0, contrast=None, gamma=None)
    for seed in range(5):
        img, msk = aug.patch(image, mask, 32, seed=seed)
        # Bilinear image vs nearest mask differ only along label edges.
        agree = np.abs(img[..., 0] - msk) < 0.5
        assert agree.mean() > 0.9


def test_elastic_deformation_changes_the_geometry():
    image, mask = _pair(48, 48)
    plain = Augment(
        flip=False,
        rotate90=False,
        scale=None,
        elastic=0.0,
        brightness=0.0,
        contrast=None,
        gamma=None,
    )
    warped = Augment(
        flip=False,
        rotate90=False,
        scale=None,
        elastic=10.0,
        elastic_prob=1.0,
        brightness=0.0,
        contrast=None,
        gamma=None,
    )
    _, m0 = plain.patch(image, mask, 48, seed=1)
    _, m1 = warped.patch(image, mask, 48, seed=1)
    np.testing.assert_array_equal(m0, mask)  # full-size, no-op geometry
    assert not np.array_equal(m1, mask)


def test_intensity_changes_image_only():
    image, mask = _pair()
    geometry_only = Augment(brightness=0.0, contrast=None, gamma=None)
    full = Augment()
    for seed in range(5):
        img0, m0 = geometry_only.patch(image, mask, 16, seed=seed)
        img1, m1 = full.patch(image, mask, 16, seed=seed)
        np.testing.assert_array_equal(m0, m1)
        assert not np.allclose(img0, img1)


def test_patch_larger_than_image_is_mirrored():
    image, mask = _pair(10, 8)
    img, msk = Augment.none().patch(image, mask, 16, seed=0)
    assert img.shape == (16, 16, 2) and msk.shape == (16, 16)
    assert set(np.unique(msk)) <= set(np.unique(mask))


def test_plain_crop_is_an_exact_window():
    image, mask = _pair(30, 30)
    img, msk = Augment.none().patch(image, mask, 16, seed=2)
    for y in range(15):
        for x in range(15):
            if np.array_equal(image[y : y + 16, x : x + 16], img):
                np.testing.assert_array_equal(mask[y : y + 16, x : x + 16], msk)
                return
    pytest.fail("a plain crop is not a window of the image")


def test_grid_crops_cover_the_image():
    for shape, size in (((40, 50), (16, 16)), ((10, 70), (16, 32)), ((16, 16), (16, 16))):
        covered = np.zeros(shape, bool)
        for y, x in grid_crops(shape, size):
            covered[y : y + size[0], x : x + size[1]] = True
        assert covered.all()
    image, mask = _pair(10, 10)
    img, msk = crop(image, mask, (0, 0), (16, 16))
    assert img.shape == (16, 16, 2) and msk.shape == (16, 16)


def _grid_crops_before(shape, size):
    """grid_crops as it was before it used kunet.tiling.tile_starts (the reference)."""
    corners = []
    for axis_len, tile in zip(shape[:2], size, strict=True):
        if axis_len <= tile:
            corners.append([0])
            continue
        starts = list(range(0, axis_len - tile + 1, tile))
        if starts[-1] != axis_len - tile:
            starts.append(axis_len - tile)
        corners.append(starts)
    return [(y, x) for y in corners[0] for x in corners[1]]


def test_grid_crops_are_the_tile_starts_of_inference_with_a_stride_of_one_tile():
    from kunet.inference import tile_starts

    assert grid_crops((40, 50, 1), (16, 16)) == [
        (y, x) for y in (0, 16, 24) for x in (0, 16, 32, 34)
    ]
    assert grid_crops((10, 70), (16, 32)) == [(0, 0), (0, 32), (0, 38)]
    for h in (1, 8, 15, 16, 17, 31, 32, 33, 64, 100):
        for w in (1, 16, 47, 48, 96, 129):
            for size in ((16, 16), (32, 16), (8, 48)):
                shape = (h, w, 3)
                origins = grid_crops(shape, size)
                assert origins == _grid_crops_before(shape, size), (shape, size)
                ys, xs = tile_starts(h, size[0], size[0]), tile_starts(w, size[1], size[1])
                assert origins == [(y, x) for y in ys for x in xs], (shape, size)


def test_sample_nearest_mirrors_outside():
    a = np.arange(5)[None, :].repeat(2, 0)
    ys = np.zeros((1, 9))
    xs = np.arange(-2, 7, dtype=float)[None, :]
    np.testing.assert_array_equal(sample_nearest(a, ys, xs)[0], [2, 1, 0, 1, 2, 3, 4, 3, 2])


def test_patch_centred_on_a_given_pixel():
    image, mask = _pair(40, 40)
    plain = Augment.none()
    img, msk = plain.patch(image, mask, 9, seed=0, centre=(15, 20))
    np.testing.assert_array_equal(msk, mask[11:20, 16:25])
    np.testing.assert_array_equal(img, image[11:20, 16:25])
