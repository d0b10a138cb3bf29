"""Losses: values against numpy references, binary and multi-class, float32 under mixed precision."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kunet import losses


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_tversky(y_true, logits, alpha, beta, smooth=1.0, include_background=True):
    """Per-sample Tversky loss reference in numpy."""
    n, c = logits.shape[0], logits.shape[-1]
    if c == 1:
        p = 1 / (1 + np.exp(-logits))
        t = y_true.reshape(p.shape).astype("float64")
    else:
        p = _np_softmax(logits)
        t = np.eye(c)[y_true.reshape(p.shape[:-1])]
    p, t = p.reshape(n, -1, c), t.reshape(n, -1, c)
    tp = (p * t).sum(1)
    fp = (p * (1 - t)).sum(1)
    fn = ((1 - p) * t).sum(1)
    index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    if not include_background and c > 1:
        index = index[:, 1:]
    return 1 - index.mean(-1)


def _binary_case(rng):
    return (rng.random((3, 8, 6)) > 0.5).astype("float32"), rng.normal(size=(3, 8, 6, 1))


def _multi_case(rng):
    return rng.integers(0, 4, size=(3, 8, 6)), rng.normal(size=(3, 8, 6, 4))


@pytest.mark.parametrize("case", [_binary_case, _multi_case])
@pytest.mark.parametrize(
    "loss, alpha, beta",
    [
        (losses.Dice(), 0.5, 0.5),
        (losses.Jaccard(), 1.0, 1.0),
        (losses.Tversky(alpha=0.3, beta=0.7), 0.3, 0.7),
        (losses.Tversky(alpha=0.5, beta=0.5), 0.5, 0.5),
    ],
)
def test_overlap_losses_match_numpy(case, loss, alpha, beta):
    y_true, logits = case(np.random.default_rng(0))
    expected = _np_tversky(y_true, logits, alpha, beta).mean()
    got = float(loss(y_true, logits.astype("float32")))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_dice_excluding_background():
    y_true, logits = _multi_case(np.random.default_rng(1))
    expected = _np_tversky(y_true, logits, 0.5, 0.5, include_background=False).mean()
    got = float(losses.Dice(include_background=False)(y_true, logits.astype("float32")))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_masks_with_channel_axis_give_same_loss():
    y_true, logits = _multi_case(np.random.default_rng(2))
    logits = logits.astype("float32")
    for loss in (losses.Dice(), losses.CEDice(), losses.Focal()):
        np.testing.assert_allclose(
            float(loss(y_true, logits)), float(loss(y_true[..., None], logits)), rtol=1e-6
        )


def test_perfect_prediction_scores_near_zero():
    y = np.zeros((2, 16, 16), "int32")
    y[:, 4:12, 4:12] = 1
    binary_logits = np.where(y[..., None] == 1, 20.0, -20.0).astype("float32")
    assert float(losses.Dice()(y, binary_logits)) < 1e-3
    multi_logits = (np.eye(2)[y] * 40.0 - 20.0).astype("float32")
    assert float(losses.Dice()(y, multi_logits)) < 1e-3
    assert float(losses.CEDice()(y, multi_logits)) < 1e-3


def test_empty_truth_and_empty_prediction_is_zero_loss():
    y = np.zeros((1, 8, 8), "float32")
    assert float(losses.Dice()(y, np.full((1, 8, 8, 1), -30.0, "float32"))) < 1e-6


def test_from_probabilities():
    y_true, logits = _binary_case(np.random.default_rng(3))
    probs = (1 / (1 + np.exp(-logits))).astype("float32")
    np.testing.assert_allclose(
        float(losses.Dice(from_logits=False)(y_true, probs)),
        float(losses.Dice()(y_true, logits.astype("float32"))),
        rtol=1e-5,
    )


@pytest.mark.parametrize("case", [_binary_case, _multi_case])
def test_ce_dice_is_cross_entropy_plus_dice(case):
    y_true, logits = case(np.random.default_rng(4))
    logits = logits.astype("float32")
    if logits.shape[-1] == 1:
        ce = keras.losses.BinaryCrossentropy(from_logits=True)(y_true[..., None], logits)
    else:
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y_true, logits)
    expected = float(ce) + float(losses.Dice()(y_true, logits))
    np.testing.assert_allclose(float(losses.CEDice()(y_true, logits)), expected, rtol=1e-5)
    weighted = losses.CEDice(ce_weight=0.0, dice_weight=2.0)(y_true, logits)
    np.testing.assert_allclose(float(weighted), 2 * float(losses.Dice()(y_true, logits)), rtol=1e-5)


def test_focal_matches_keras():
    y_true, logits = _binary_case(np.random.default_rng(5))
    logits = logits.astype("float32")
    ref = keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=True, alpha=0.25, gamma=2.0, from_logits=True
    )(y_true[..., None], logits)
    np.testing.assert_allclose(float(losses.Focal()(y_true, logits)), float(ref), rtol=1e-5)
    y_true, logits = _multi_case(np.random.default_rng(6))
    logits = logits.astype("float32")
    ref = keras.losses.CategoricalFocalCrossentropy(alpha=0.25, gamma=2.0, from_logits=True)(
        np.eye(4)[y_true], logits
    )
    np.testing.assert_allclose(float(losses.Focal()(y_true, logits)), float(ref), rtol=1e-5)


def test_focal_downweights_easy_pixels():
    y = np.ones((1, 4, 4), "float32")
    easy, hard = np.full((1, 4, 4, 1), 3.0, "float32"), np.full((1, 4, 4, 1), -1.0, "float32")
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    ratio_focal = float(losses.Focal()(y, easy)) / float(losses.Focal()(y, hard))
    ratio_bce = float(bce(y[..., None], easy)) / float(bce(y[..., None], hard))
    assert ratio_focal < ratio_bce


@pytest.mark.parametrize("cls", [losses.Dice, losses.Jaccard, losses.CEDice, losses.Focal])
def test_float16_logits_give_float32_loss(cls):
    y_true, logits = _multi_case(np.random.default_rng(7))
    value = cls()(y_true, keras.ops.cast(logits, "float16"))
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    ref = cls()(y_true, logits.astype("float32"))
    np.testing.assert_allclose(float(value), float(ref), rtol=2e-3)


def test_per_sample_values_and_sample_weight():
    y_true, logits = _binary_case(np.random.default_rng(8))
    logits = logits.astype("float32")
    per_sample = _np_tversky(y_true, logits, 0.5, 0.5)
    weighted = losses.Dice()(y_true, logits, sample_weight=np.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(float(weighted), per_sample[0] / 3, rtol=1e-5)


@pytest.mark.parametrize(
    "loss",
    [
        losses.Dice(smooth=0.5, include_background=False),
        losses.Jaccard(from_logits=False),
        losses.Tversky(alpha=0.2, beta=0.8),
        losses.Focal(gamma=1.5, alpha=None),
        losses.CEDice(ce_weight=0.5, dice_weight=2.0),
    ],
)
def test_losses_serialize(loss):
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(clone) is type(loss)
    assert clone.get_config() == loss.get_config()
    y_true, logits = _binary_case(np.random.default_rng(9))
    np.testing.assert_allclose(
        float(clone(y_true, logits.astype("float32"))),
        float(loss(y_true, logits.astype("float32"))),
        rtol=1e-6,
    )


# ------------------------------------------------------------------------------------ volumes
def _np_cross_entropy(y_true, logits):
    """Per-sample mean voxel cross-entropy from logits, in float64 numpy."""
    n, c = logits.shape[0], logits.shape[-1]
    if c == 1:
        z, t = logits.reshape(n, -1), y_true.reshape(n, -1).astype("float64")
        ce = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    else:
        z = logits.reshape(n, -1, c)
        log_p = z - z.max(-1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
        ce = -np.take_along_axis(log_p, y_true.reshape(n, -1, 1), axis=-1)[..., 0]
    return ce.mean(1)


def _binary_volume(rng):
    return (rng.random((2, 5, 6, 7)) > 0.6).astype("float32"), rng.normal(size=(2, 5, 6, 7, 1))


def _multi_volume(rng):
    return rng.integers(0, 3, size=(2, 5, 6, 7)), rng.normal(size=(2, 5, 6, 7, 3))


def _as_images(array):
    """(N, D, H, W, ...) -> (N, D*H, W, ...): the same voxels as a batch of 2D images."""
    return array.reshape(array.shape[0], -1, *array.shape[3:])


_VOLUME_LOSSES = [
    (losses.Dice(), 0.5, 0.5),
    (losses.Jaccard(), 1.0, 1.0),
    (losses.Tversky(alpha=0.3, beta=0.7), 0.3, 0.7),
    (losses.Dice(include_background=False, smooth=0.5), 0.5, 0.5),
]


@pytest.mark.parametrize("case", [_binary_volume, _multi_volume])
@pytest.mark.parametrize("loss, alpha, beta", _VOLUME_LOSSES)
@pytest.mark.parametrize("channel_axis", [False, True])
def test_overlap_losses_on_volumes_match_numpy_and_2d(case, loss, alpha, beta, channel_axis):
    y_true, logits = case(np.random.default_rng(10))
    logits = logits.astype("float32")
    mask = y_true[..., None] if channel_axis else y_true
    expected = _np_tversky(y_true, logits, alpha, beta, loss.smooth, loss.include_background).mean()
    got = float(loss(mask, logits))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(got, float(loss(_as_images(mask), _as_images(logits))), rtol=1e-5)
    probs = (1 / (1 + np.exp(-logits))) if logits.shape[-1] == 1 else _np_softmax(logits)
    from_probs = type(loss)(**{**loss.get_config(), "from_logits": False})
    np.testing.assert_allclose(float(from_probs(mask, probs.astype("float32"))), got, rtol=1e-5)


@pytest.mark.parametrize("case", [_binary_volume, _multi_volume])
def test_cross_entropy_focal_and_ce_dice_on_volumes(case):
    y_true, logits = case(np.random.default_rng(11))
    logits = logits.astype("float32")
    ce = keras.ops.convert_to_numpy(losses.cross_entropy(y_true, logits))
    np.testing.assert_allclose(ce, _np_cross_entropy(y_true, logits), rtol=1e-5)
    images = (_as_images(y_true), _as_images(logits))
    for loss in (losses.CEDice(), losses.Focal(), losses.Focal(alpha=None, gamma=1.0)):
        got = float(loss(y_true, logits))
        np.testing.assert_allclose(got, float(loss(*images)), rtol=1e-5)
        np.testing.assert_allclose(float(loss(y_true[..., None], logits)), got, rtol=1e-6)
    expected = _np_cross_entropy(y_true, logits) + _np_tversky(y_true, logits, 0.5, 0.5)
    np.testing.assert_allclose(float(losses.CEDice()(y_true, logits)), expected.mean(), rtol=1e-5)
    probs = (1 / (1 + np.exp(-logits))) if logits.shape[-1] == 1 else _np_softmax(logits)
    np.testing.assert_allclose(
        float(losses.CEDice(from_logits=False)(y_true, probs.astype("float32"))),
        expected.mean(),
        rtol=1e-4,
    )


def test_batch_dice_on_volumes_pools_the_batch():
    y_true, logits = _multi_volume(np.random.default_rng(12))
    logits = logits.astype("float32")
    pooled = _np_tversky(y_true.reshape(1, -1), logits.reshape(1, -1, 3), 0.5, 0.5)[0]
    per_sample = keras.ops.convert_to_numpy(losses.Dice(batch_dice=True).call(y_true, logits))
    np.testing.assert_allclose(per_sample, [pooled, pooled], rtol=1e-5)


@pytest.mark.parametrize(
    "y_shape, logits_shape",
    [
        ((2, 6, 7), (2, 5, 6, 7, 1)),  # a 2D mask for a volume
        ((2, 5, 7, 6), (2, 5, 6, 7, 3)),  # same voxel count, other layout
        ((2, 5, 6, 7, 3), (2, 5, 6, 7, 1)),  # a channel axis that is not 1
        ((2, 4, 6), (2, 4, 6, 3, 2)),  # the image mask of 3D predictions
        ((2, 8, 7), (2, 8, 6, 2)),  # 2D: sizes differ
    ],
)
def test_mask_shape_mismatch_names_both_shapes(y_shape, logits_shape):
    y_true = np.zeros(y_shape, "float32")
    logits = np.zeros(logits_shape, "float32")
    for loss in (losses.Dice(), losses.CEDice(), losses.Focal(), losses.Tversky()):
        with pytest.raises(ValueError, match=r"y_true must be .*shape \(2, .*got shape \(2, "):
            loss(y_true, logits)
