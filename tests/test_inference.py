"""kunet.inference: overlap-tile prediction matches whole-image prediction; memory is per batch."""

from __future__ import annotations

import math

import numpy as np
import pytest

import kunet
from kunet.inference import predict_image, predict_tiled, tile_starts, to_labels, window


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
