"""kunet.inference: overlap-tile prediction matches whole-image prediction, for images and volumes;
memory is per batch."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import kunet
from kunet.inference import (
    predict_image,
    predict_tiled,
    remove_small_components,
    tile_starts,
    to_labels,
    window,
)


class _Recorder:
    """A stand-in model: output = 2 * first channel; records every batch shape it is given."""

    def __init__(self):
        self.shapes = []

    def predict_on_batch(self, x):
        self.shapes.append(x.shape)
        return 2.0 * x[..., :1]


def test_tile_starts_cover_and_end_flush():
    assert tile_starts(100, 32, 16)[-1] == 68
    assert tile_starts(20, 32, 16) == [0]
    for length, tile, stride in ((100, 32, 16), (64, 64, 32), (130, 40, 25)):
        starts = tile_starts(length, tile, stride)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + tile] = True
        assert covered.all() and starts[-1] + tile == length


def test_window_shapes():
    g = window((16, 8), "gaussian")
    assert g.shape == (16, 8) and g.max() == pytest.approx(1.0) and g.min() > 0
    assert g[8, 4] > g[0, 0]
    np.testing.assert_array_equal(window((4, 4), "constant"), np.ones((4, 4)))
    with pytest.raises(ValueError, match="blend"):
        window((4, 4), "median")


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_blending_reproduces_a_pointwise_model_exactly(blend):
    image = np.random.default_rng(0).random((70, 90, 2)).astype("float32")
    out = predict_tiled(_Recorder(), image, tile_size=32, overlap=0.5, blend=blend, batch_size=3)
    assert out.shape == (70, 90, 1)
    np.testing.assert_allclose(out[..., 0], 2 * image[..., 0], rtol=1e-5, atol=1e-6)


def test_large_image_runs_one_tile_batch_at_a_time():
    image = np.zeros((3000, 2000), "float32")
    image[1000:1200, 500:900] = 1.0
    model = _Recorder()
    out = predict_tiled(model, image, tile_size=512, overlap=0.25, batch_size=4)
    assert out.shape == (3000, 2000, 1)
    n_tiles = len(tile_starts(3000, 512, 384)) * len(tile_starts(2000, 512, 384))
    # Every call sees one fixed-size batch (the last one padded): never all the tiles at once.
    assert all(shape == (4, 512, 512, 1) for shape in model.shapes)
    assert len(model.shapes) == math.ceil(n_tiles / 4) and n_tiles > 4
    np.testing.assert_allclose(out[..., 0], 2 * image, atol=1e-5)


def test_image_smaller_than_a_tile_and_2d_input():
    image = np.random.default_rng(0).random((10, 7)).astype("float32")
    out = predict_tiled(_Recorder(), image, tile_size=16)
    assert out.shape == (10, 7, 1)
    np.testing.assert_allclose(out[..., 0], 2 * image, rtol=1e-5)


def test_tiled_matches_whole_image_prediction_away_from_the_borders():
    model = kunet.UNet(num_classes=3, filters=(4, 8), input_shape=(None, None, 1))
    image = np.random.default_rng(1).random((96, 128, 1)).astype("float32")
    whole = predict_image(model, image)
    tiled = predict_tiled(model, image, tile_size=64, overlap=0.5, blend="gaussian", batch_size=4)
    assert tiled.shape == whole.shape == (96, 128, 3)
    np.testing.assert_allclose(tiled.sum(-1), 1.0, rtol=1e-5)  # blended probabilities
    inner = np.s_[16:-16, 16:-16]
    error = np.abs(tiled[inner] - whole[inner])
    # Probabilities of this random net spread ~0.05 around 1/3; tiles agree to a small fraction.
    assert error.max() < 0.02 and error.mean() < 0.001
    flat = predict_tiled(model, image, tile_size=64, overlap=0.5, blend="constant", batch_size=4)
    assert np.abs(flat[inner] - whole[inner]).mean() > error.mean()  # why Gaussian is the default
    assert to_labels(tiled).shape == (96, 128)


def test_whole_image_prediction_mirrors_odd_sizes_instead_of_zero_padding():
    """A side that is not a multiple of 2**depth is mirrored up, not zero-padded by the graph: the
    network sees image content at the border, as it did in training, and the whole-image and
    tiled paths agree (both mirror)."""
    model = kunet.UNet(num_classes=1, filters=(4, 8), input_shape=(None, None, 1))
    image = np.random.default_rng(3).random((30, 29, 1)).astype("float32") + 1.0  # far from 0
    whole = predict_image(model, image, activation=None)
    assert whole.shape == (30, 29, 1)
    mirrored = np.pad(image, ((0, 2), (0, 3), (0, 0)), mode="reflect")  # up to 32 x 32
    expected = np.asarray(model.predict_on_batch(mirrored[None]))[0, :30, :29]
    np.testing.assert_allclose(whole, expected, rtol=1e-4, atol=1e-5)
    zero_padded = np.asarray(model.predict_on_batch(image[None]))[0]  # the graph's own padding
    assert np.abs(zero_padded - whole).max() > 1e-3  # (so the test can tell the two apart)
    tiled = predict_tiled(model, image, tile_size=32, activation=None)
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-5)


def test_tta_averages_flips_and_keeps_the_shape():
    model = kunet.UNet(num_classes=1, filters=(4, 8), input_shape=(None, None, 1))
    image = np.random.default_rng(2).random((40, 40, 1)).astype("float32")
    plain = predict_tiled(model, image, tile_size=32, batch_size=2)
    tta = predict_tiled(model, image, tile_size=32, batch_size=2, tta=True)
    assert tta.shape == plain.shape == (40, 40, 1)
    assert tta.min() >= 0.0 and tta.max() <= 1.0  # sigmoid applied to the logits
    # TTA of a flipped image is the flipped TTA (flip-equivariant by construction).
    flipped = predict_tiled(model, image[:, ::-1], tile_size=32, batch_size=2, tta=True)
    np.testing.assert_allclose(flipped[:, ::-1], tta, atol=1e-4)


def test_bad_arguments():
    image = np.zeros((8, 8, 1), "float32")
    for kwargs in ({"overlap": 1.0}, {"tile_size": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            predict_tiled(_Recorder(), image, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        predict_tiled(_Recorder(), np.zeros((2, 8, 8, 1)))


# ------------------------------------------------------------------------------------------ 3D
def _conv3d(kernel=1, channels=2, classes=3, seed=0):
    """A functional Conv3D model (N, D, H, W, channels) -> (N, D, H, W, classes) with random
    weights; kernel 1 makes it pointwise (translation- and flip-equivariant)."""
    inputs = keras.Input((None, None, None, channels))
    conv = keras.layers.Conv3D(classes, kernel, padding="same")
    model = keras.Model(inputs, conv(inputs))
    rng = np.random.default_rng(seed)
    conv.set_weights([w + rng.normal(size=w.shape).astype("float32") for w in conv.get_weights()])
    return model


class _Volume:
    """A 3D stand-in model: ``fn(x)`` on every batch (N, d, h, w, C); records the batch shapes."""

    spatial_dims = 3

    def __init__(self, fn=lambda x: 2.0 * x[..., :1], **attributes):
        self.fn, self.shapes = fn, []
        self.__dict__.update(attributes)

    def predict_on_batch(self, x):
        self.shapes.append(x.shape)
        return self.fn(x)


def test_window_3d_is_the_separable_gaussian():
    g = window((4, 6, 9), "gaussian")
    assert g.shape == (4, 6, 9) and g.max() == pytest.approx(1.0) and g.min() > 0
    assert g[2, 3, 4] > g[0, 3, 4] and g[2, 3, 4] > g[2, 0, 4] and g[2, 3, 4] > g[2, 3, 0]
    axis = [window((n, 1))[:, 0].astype("float64") for n in (4, 6, 9)]  # the 1D profiles
    expected = np.maximum(np.multiply.outer(np.multiply.outer(axis[0], axis[1]), axis[2]), 1e-3)
    np.testing.assert_allclose(g, expected, rtol=1e-6)
    np.testing.assert_array_equal(window((3, 4, 5), "constant"), np.ones((3, 4, 5)))
    for bad in (8, (4,), (2, 2, 2, 2), (4, 0, 4)):
        with pytest.raises(ValueError, match="tile_size"):
            window(bad)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize(
    "shape, tile, overlap",
    [((13, 11, 9), 8, 0.5), ((9, 15, 10), (4, 8, 6), 0.25), ((5, 7, 3), 8, 0.5)],
)
def test_3d_tiled_equals_whole_volume_for_a_pointwise_model(shape, tile, overlap, blend):
    model = _conv3d()
    volume = np.random.default_rng(0).random((*shape, 2)).astype("float32")
    whole = predict_image(model, volume)
    reference = np.asarray(model.predict_on_batch(volume[None]))[0]  # no padding for 1x1x1
    np.testing.assert_allclose(whole, reference, rtol=1e-5, atol=1e-5)
    tiled = predict_tiled(model, volume, tile_size=tile, overlap=overlap, blend=blend, batch_size=3)
    assert tiled.shape == whole.shape == (*shape, 3)
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)
    probs = predict_tiled(model, volume, tile_size=tile, overlap=overlap, activation="softmax")
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    labels = to_labels(probs)
    assert labels.shape == shape and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, reference.argmax(-1))


def test_3d_tiles_are_cut_one_fixed_batch_at_a_time():
    model = _Volume()
    volume = np.random.default_rng(1).random((20, 17, 12)).astype("float32")  # (D, H, W)
    out = predict_tiled(model, volume, tile_size=(8, 8, 4), overlap=0.5, batch_size=5)
    assert out.shape == (20, 17, 12, 1)
    np.testing.assert_allclose(out[..., 0], 2 * volume, rtol=1e-5)
    n_tiles = len(tile_starts(20, 8, 4)) * len(tile_starts(17, 8, 4)) * len(tile_starts(12, 4, 2))
    assert all(shape == (5, 8, 8, 4, 1) for shape in model.shapes)
    assert len(model.shapes) == math.ceil(n_tiles / 5) and n_tiles > 5


def test_3d_whole_volume_is_mirrored_up_to_the_size_multiple():
    """Odd sides are mirrored (not zero-padded) up to ``size_multiple``, which wins over the
    ``filters`` fallback; a model that mixes every voxel shows the content it was given."""
    model = _Volume(
        fn=lambda x: np.broadcast_to(x.mean(axis=(1, 2, 3), keepdims=True), x.shape),
        size_multiple=4,
        filters=(4, 8, 16),  # would mean a multiple of 8
    )
    volume = np.random.default_rng(2).random((5, 6, 3, 1)).astype("float32")
    out = predict_image(model, volume)
    assert model.shapes == [(1, 8, 8, 4, 1)] and out.shape == (5, 6, 3, 1)
    mirrored = np.pad(volume, ((0, 3), (0, 2), (0, 1), (0, 0)), mode="reflect")
    np.testing.assert_allclose(out, np.full(out.shape, mirrored.mean()), rtol=1e-5)
    assert abs(mirrored.mean() - volume.mean()) > 1e-3  # (so the test can tell)
    model.size_multiple = None  # the fallback: 2 ** len(filters)
    predict_image(model, volume)
    assert model.shapes[-1] == (1, 8, 8, 8, 1)


def _ramps(x):
    """Not flip-equivariant: adds 1, 10 and 100 times the D, H and W voxel index to the input."""
    d, h, w = (np.arange(n, dtype="float32") for n in x.shape[1:4])
    ramp = d[:, None, None] + 10 * h[None, :, None] + 100 * w[None, None, :]
    return x[..., :1] + ramp[None, ..., None]


def test_tta_3d_averages_all_eight_flips():
    volume = np.random.default_rng(3).random((6, 5, 4, 1)).astype("float32")
    model = _Volume(fn=_ramps)
    out = predict_image(model, volume, tta=True)
    assert len(model.shapes) == 8  # every combination of flips of D, H and W
    # Averaged over all flips each ramp is its mean: only flipping every axis removes all three.
    np.testing.assert_allclose(out, volume + (2.5 + 10 * 2 + 100 * 1.5), rtol=1e-5)
    tiled = predict_tiled(_Volume(fn=_ramps), volume, tile_size=(6, 5, 4), tta=True)
    np.testing.assert_allclose(tiled, out, rtol=1e-5)


def test_tta_3d_is_exact_for_a_flip_equivariant_model_and_commutes_with_flips():
    volume = np.random.default_rng(4).random((7, 6, 5, 2)).astype("float32")
    pointwise = _conv3d()
    np.testing.assert_allclose(
        predict_tiled(pointwise, volume, tile_size=4, tta=True),
        predict_image(pointwise, volume),
        rtol=1e-5,
        atol=1e-5,
    )
    model = _conv3d(kernel=3, seed=1)  # a random 3x3x3 kernel: not flip-equivariant
    tta = predict_image(model, volume, tta=True)
    assert np.abs(tta - predict_image(model, volume)).max() > 1e-3
    for axis in range(3):  # TTA of a flipped volume is the flipped TTA, along D as well
        flipped = predict_image(model, np.flip(volume, axis), tta=True)
        np.testing.assert_allclose(np.flip(flipped, axis), tta, rtol=1e-4, atol=1e-5)


def test_spatial_dims_come_from_the_model():
    model = _conv3d(channels=1)
    assert predict_image(model, np.zeros((4, 4, 4), "float32")).shape == (4, 4, 4, 3)
    image_model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(2, 1)])
    assert predict_image(image_model, np.zeros((4, 6), "float32")).shape == (4, 6, 2)


def test_wrong_ranks_name_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(D, H, W, C\).*shape \(8, 8\)"):
        predict_image(_Volume(), np.zeros((8, 8), "float32"))
    with pytest.raises(ValueError, match=r"\(D, H, W, C\).*shape \(1, 8, 8, 8, 1\)"):
        predict_tiled(_conv3d(channels=1), np.zeros((1, 8, 8, 8, 1), "float32"), tile_size=4)
    with pytest.raises(ValueError, match=r"\(H, W, C\).*shape \(4, 8, 8, 1\)"):
        predict_image(_Recorder(), np.zeros((4, 8, 8, 1), "float32"))
    with pytest.raises(ValueError, match=r"tile_size.*\(d, h, w\)"):
        predict_tiled(_Volume(), np.zeros((8, 8, 8), "float32"), tile_size=(4, 4))
    with pytest.raises(ValueError, match="tile_size"):
        predict_tiled(_Volume(), np.zeros((8, 8, 8), "float32"), tile_size=(4, 0, 4))
    with pytest.raises(ValueError, match="channel"):
        predict_tiled(_conv3d(channels=2), np.zeros((8, 8, 8, 3), "float32"), tile_size=4)
    sequence_model = keras.Sequential([keras.Input((None, 1)), keras.layers.Conv1D(2, 1)])
    with pytest.raises(ValueError, match=r"\(N, D, H, W, C\).*\(None, None, 1\)"):
        predict_image(sequence_model, np.zeros((8, 1), "float32"))
    with pytest.raises(ValueError, match=r"\(D, H, W, K\)"):
        to_labels(np.zeros((8, 3)))
    with pytest.raises(ValueError, match=r"\(D, H, W\).*shape \(2, 2, 2, 2\)"):
        remove_small_components(np.zeros((2, 2, 2, 2), "int32"), {1: 2})


def test_nan_policy_on_volumes():
    volume = np.ones((4, 4, 4), "float32")
    volume[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="1"):
        predict_tiled(_Volume(), volume, tile_size=4)
    out = predict_tiled(_Volume(), volume, tile_size=4, nan_policy="zero")
    assert out[1, 2, 3, 0] == 0 and out[0, 0, 0, 0] == pytest.approx(2.0)


def test_remove_small_components_3d_is_26_connected():
    labels = np.zeros((6, 6, 6), "int32")
    labels[0, 0, 0] = labels[1, 1, 1] = 1  # two voxels touching at a corner only: one component
    labels[4, 4, 4] = 1  # alone
    labels[3:5, 0:2, 4] = 2  # four voxels of class 2
    out = remove_small_components(labels, {1: 2, "2": 5})
    assert out[0, 0, 0] == out[1, 1, 1] == 1  # kept: 6-connectivity would have removed them
    assert out[4, 4, 4] == 0 and not (out == 2).any()
    assert out.sum() == 2 and (labels.sum() - out.sum()) == 1 + 4 * 2
    np.testing.assert_array_equal(remove_small_components(labels, {}), labels)
