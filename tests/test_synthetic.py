"""``kunet.synthetic``: deterministic nuclei-like images with exact masks, and the threshold baseline."""

import numpy as np
import pytest

from kunet.synthetic import (
    dice_score,
    gaussian_blur,
    make_blobs3d,
    make_nuclei,
    otsu_dice,
    otsu_threshold,
)


def test_same_seed_gives_the_same_arrays():
    a = make_nuclei(4, size=32, seed=7)
    b = make_nuclei(4, size=32, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_different_seeds_give_different_arrays():
    a_images, a_masks = make_nuclei(4, size=32, seed=0)
    b_images, b_masks = make_nuclei(4, size=32, seed=1)
    assert not np.array_equal(a_images, b_images)
    assert not np.array_equal(a_masks, b_masks)


def test_image_i_depends_only_on_seed_and_i():
    few_images, few_masks = make_nuclei(3, size=32, seed=5)
    many_images, many_masks = make_nuclei(6, size=32, seed=5)
    np.testing.assert_array_equal(few_images, many_images[:3])
    np.testing.assert_array_equal(few_masks, many_masks[:3])


def test_shapes_dtypes_and_ranges():
    images, masks = make_nuclei(5, size=32, seed=0)
    assert images.shape == (5, 32, 32, 1) and images.dtype == np.float32
    assert masks.shape == (5, 32, 32) and masks.dtype == np.uint8
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(np.unique(masks)) <= {0, 1}
    assert images.std() > 0.05  # not blank


def test_masks_are_binary_and_cover_a_sane_fraction():
    _, masks = make_nuclei(32, size=64, seed=0)
    assert set(np.unique(masks)) == {0, 1}
    assert 0.05 < masks.mean() < 0.35
    assert (masks.reshape(32, -1).max(axis=1) == 1).mean() > 0.9  # nearly every image has nuclei


def test_nuclei_are_brighter_than_their_surroundings():
    images, masks = make_nuclei(16, size=64, seed=3)
    for image, mask in zip(images[..., 0], masks, strict=True):
        if mask.any():
            assert image[mask == 1].mean() > image[mask == 0].mean() + 0.1


def test_extra_channels_see_the_same_objects():
    gray_images, gray_masks = make_nuclei(3, size=32, seed=2)
    rgb_images, rgb_masks = make_nuclei(3, size=32, seed=2, channels=3)
    assert rgb_images.shape == (3, 32, 32, 3)
    assert rgb_images.min() >= 0.0 and rgb_images.max() <= 1.0
    np.testing.assert_array_equal(gray_masks, rgb_masks)
    assert not np.array_equal(rgb_images[..., 0], rgb_images[..., 1])


def test_two_class_variant_has_nuclei_and_spindles():
    images, masks = make_nuclei(16, size=64, seed=0, num_classes=2)
    assert masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1, 2}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": -1},
        {"n": 2, "size": 4},
        {"n": 2, "channels": 0},
        {"n": 2, "num_classes": 3},
        {"n": 2, "density": -1.0},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        make_nuclei(**kwargs)


def test_zero_images():
    images, masks = make_nuclei(0, size=16)
    assert images.shape == (0, 16, 16, 1) and masks.shape == (0, 16, 16)


def test_gaussian_blur_keeps_constants_and_spreads_an_impulse():
    flat = np.full((2, 16, 16), 0.3, np.float32)
    np.testing.assert_allclose(gaussian_blur(flat, 1.5), flat, atol=1e-6)
    impulse = np.zeros((21, 21), np.float32)
    impulse[10, 10] = 1.0
    blurred = gaussian_blur(impulse, 1.0)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-4)
    assert blurred[10, 10] == blurred.max() < 0.2
    np.testing.assert_allclose(blurred, blurred.T, atol=1e-7)
    np.testing.assert_allclose(blurred, blurred[::-1, ::-1], atol=1e-7)
    np.testing.assert_array_equal(gaussian_blur(impulse, 0.0), impulse)


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.2, 0.03, 1000), rng.normal(0.7, 0.03, 500)
    threshold = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < threshold < high.min()
    assert 0.4 < threshold < 0.5  # the middle of the gap, not its edge


def test_dice_score():
    a = np.array([[1, 1, 0, 0]])
    assert dice_score(a, a) == 1.0
    assert dice_score(a, 1 - a) == 0.0
    assert dice_score(a, [[1, 0, 0, 0]]) == pytest.approx(2 / 3)
    assert dice_score(np.zeros(4), np.zeros(4)) == 1.0


def test_a_global_threshold_does_not_solve_the_task():
    """A fair test: Otsu's threshold finds the nuclei roughly, but far from the demo's 0.90."""
    images, masks = make_nuclei(64, size=64, seed=0)
    for per_image in (True, False):
        assert 0.5 < otsu_dice(images, masks, per_image=per_image) < 0.87


# ---------------------------------------------------------------------------------------- 3D
def test_blobs3d_shapes_determinism_and_ranges():
    images, masks = make_blobs3d(3, size=16, seed=2)
    assert images.shape == (3, 16, 16, 16, 1) and images.dtype == np.float32
    assert masks.shape == (3, 16, 16, 16) and masks.dtype == np.uint8
    assert images.min() >= 0.0 and images.max() <= 1.0 and set(np.unique(masks)) <= {0, 1}
    more_images, more_masks = make_blobs3d(5, size=16, seed=2)
    np.testing.assert_array_equal(more_images[:3], images)  # volume i depends on (seed, i) only
    np.testing.assert_array_equal(more_masks[:3], masks)
    assert not np.array_equal(make_blobs3d(3, size=16, seed=3)[0], images)
    with pytest.raises(ValueError, match="size"):
        make_blobs3d(1, size=4)


def test_blobs3d_are_brighter_but_no_global_threshold_finds_them():
    images, masks = make_blobs3d(16, size=32, seed=0)
    assert 0.03 < masks.mean() < 0.25
    for image, mask in zip(images[..., 0], masks, strict=True):
        if mask.any():
            assert image[mask == 1].mean() > image[mask == 0].mean() + 0.15
    assert 0.3 < otsu_dice(images, masks) < 0.8  # the demo's UNet must reach 0.9


def test_gaussian_blur_of_a_volume_blurs_every_axis():
    impulse = np.zeros((9, 9, 9), np.float32)
    impulse[4, 4, 4] = 1.0
    blurred = gaussian_blur(impulse, 1.0, axes=(-3, -2, -1))
    assert blurred.sum() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(blurred, blurred.transpose(2, 1, 0), atol=1e-7)
    along = [blurred[2, 4, 4], blurred[4, 2, 4], blurred[4, 4, 2]]  # 2 voxels off, on each axis
    assert min(along) > 0.005 and max(along) == pytest.approx(min(along), rel=1e-5)
