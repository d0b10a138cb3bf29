"""Dice and IoU metrics: accumulation over batches, logits, per-class values, serialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kunet import metrics


def _np_scores(y_true, pred, num_classes):
    """Global per-class (dice, iou) from hard predictions, with empty classes scoring 1."""
    dice, iou = [], []
    for c in range(num_classes):
        t, p = y_true == c, pred == c
        if num_classes == 1:
            t, p = y_true == 1, pred == 1
        tp, fp, fn = (t & p).sum(), (~t & p).sum(), (t & ~p).sum()
        dice.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        iou.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
    return np.array(dice), np.array(iou)


def _result(metric):
    return keras.ops.convert_to_numpy(metric.result())


def test_binary_metrics_accumulate_over_batches():
    rng = np.random.default_rng(0)
    y = (rng.random((2, 4, 10, 10)) > 0.6).astype("float32")
    logits = rng.normal(size=(2, 4, 10, 10, 1)).astype("float32")
    dice, iou = metrics.Dice(), metrics.IoU()
    for b in range(2):
        dice.update_state(y[b], logits[b])
        iou.update_state(y[b], logits[b])
    ref_dice, ref_iou = _np_scores(y.reshape(-1), (logits.reshape(-1) > 0).astype(int), 1)
    np.testing.assert_allclose(_result(dice), ref_dice[0], rtol=1e-6)
    np.testing.assert_allclose(_result(iou), ref_iou[0], rtol=1e-6)
    # the global score is not the mean of per-batch scores
    assert 0 < _result(dice) < 1


def test_binary_threshold_on_probabilities():
    y = np.array([[[1.0, 1.0, 0.0, 0.0]]])
    probs = np.array([[[0.9, 0.4, 0.3, 0.6]]], "float32")[..., None]
    m = metrics.Dice(from_logits=False, threshold=0.5)
    m.update_state(y, probs)
    np.testing.assert_allclose(_result(m), 2 * 1 / (2 * 1 + 1 + 1))
    m = metrics.Dice(from_logits=False, threshold=0.35)
    m.update_state(y, probs)
    np.testing.assert_allclose(_result(m), 2 * 2 / (2 * 2 + 1 + 0))


def test_multiclass_mean_over_foreground_and_per_class():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=(3, 12, 12))
    logits = rng.normal(size=(3, 12, 12, 4)).astype("float32")
    dice, iou = metrics.Dice(num_classes=4), metrics.IoU(num_classes=4)
    dice.update_state(y[..., None], logits)  # (N,H,W,1) masks work too
    iou.update_state(y, logits)
    ref_dice, ref_iou = _np_scores(y.reshape(-1), logits.argmax(-1).reshape(-1), 4)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(dice.per_class_result()), ref_dice, rtol=1e-6
    )
    np.testing.assert_allclose(_result(dice), ref_dice[1:].mean(), rtol=1e-6)
    np.testing.assert_allclose(_result(iou), ref_iou[1:].mean(), rtol=1e-6)
    only2 = metrics.Dice(num_classes=4, class_id=2)
    only2.update_state(y, logits)
    np.testing.assert_allclose(_result(only2), ref_dice[2], rtol=1e-6)


def test_perfect_and_empty_and_reset():
    y = np.zeros((1, 8, 8), "int32")
    y[0, 2:5, 2:5] = 1
    m = metrics.IoU(num_classes=3)
    m.update_state(y, (np.eye(3)[y] * 10).astype("float32"))
    assert _result(m) == pytest.approx(1.0)  # class 2 absent everywhere counts as 1
    m.update_state(y, (np.eye(3)[np.full_like(y, 2)] * 10).astype("float32"))
    assert _result(m) < 1.0
    m.reset_state()
    m.update_state(y, (np.eye(3)[y] * 10).astype("float32"))
    assert _result(m) == pytest.approx(1.0)


def test_sample_weight_zero_ignores_sample():
    rng = np.random.default_rng(2)
    y = (rng.random((2, 6, 6)) > 0.5).astype("float32")
    logits = rng.normal(size=(2, 6, 6, 1)).astype("float32")
    weighted = metrics.Dice()
    weighted.update_state(y, logits, sample_weight=np.array([1.0, 0.0]))
    first = metrics.Dice()
    first.update_state(y[:1], logits[:1])
    np.testing.assert_allclose(_result(weighted), _result(first), rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        metrics.Dice(num_classes=0)
    with pytest.raises(ValueError, match="class_id"):
        metrics.IoU(num_classes=2, class_id=2)
    m = metrics.Dice(num_classes=3)
    with pytest.raises(ValueError, match="num_classes=3"):
        m.update_state(np.zeros((1, 4, 4)), np.zeros((1, 4, 4, 2), "float32"))


def test_metrics_serialize():
    m = metrics.IoU(num_classes=5, class_id=3, threshold=0.3, name="iou_3")
    clone = keras.metrics.deserialize(keras.metrics.serialize(m))
    assert type(clone) is metrics.IoU and clone.get_config() == m.get_config()


# ------------------------------------------------------------------------------------ volumes
def _images(array):
    """(N, D, H, W, ...) -> (N, D*H, W, ...): the same voxels as a batch of 2D images."""
    return array.reshape(array.shape[0], -1, *array.shape[3:])


@pytest.mark.parametrize("channel_axis", [False, True])
def test_binary_metrics_on_volumes(channel_axis):
    rng = np.random.default_rng(3)
    y = (rng.random((3, 2, 5, 6, 7)) > 0.6).astype("float32")  # 3 batches of (2, 5, 6, 7)
    logits = rng.normal(size=(3, 2, 5, 6, 7, 1)).astype("float32")
    probs = 1 / (1 + np.exp(-logits))
    volume = [metrics.Dice(), metrics.IoU(), metrics.Dice(from_logits=False, threshold=0.7)]
    image = [metrics.Dice(), metrics.IoU(), metrics.Dice(from_logits=False, threshold=0.7)]
    for b in range(3):
        mask = y[b][..., None] if channel_axis else y[b]
        for m, m2, pred in zip(volume, image, (logits[b], logits[b], probs[b]), strict=True):
            m.update_state(mask, pred)
            m2.update_state(_images(mask), _images(pred))
    ref_dice, ref_iou = _np_scores(y.reshape(-1), (logits.reshape(-1) > 0).astype(int), 1)
    ref_07, _ = _np_scores(y.reshape(-1), (probs.reshape(-1) > 0.7).astype(int), 1)
    for m, m2, ref in zip(volume, image, (ref_dice, ref_iou, ref_07), strict=True):
        np.testing.assert_allclose(_result(m), ref[0], rtol=1e-6)
        np.testing.assert_allclose(_result(m), _result(m2), rtol=1e-6)
    assert 0 < _result(volume[0]) < 1 and _result(volume[2]) != _result(volume[0])


@pytest.mark.parametrize("from_logits", [True, False])
def test_multiclass_metrics_on_volumes(from_logits):
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, size=(2, 6, 5, 7))
    logits = rng.normal(size=(2, 6, 5, 7, 3)).astype("float32")
    pred = logits if from_logits else np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    dice = metrics.Dice(num_classes=3, from_logits=from_logits)
    iou = metrics.IoU(num_classes=3, from_logits=from_logits)
    dice.update_state(y[..., None], pred)
    iou.update_state(y, pred)
    ref_dice, ref_iou = _np_scores(y.reshape(-1), logits.argmax(-1).reshape(-1), 3)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(dice.per_class_result()), ref_dice, rtol=1e-6
    )
    np.testing.assert_allclose(_result(dice), ref_dice[1:].mean(), rtol=1e-6)
    np.testing.assert_allclose(_result(iou), ref_iou[1:].mean(), rtol=1e-6)
    flat = metrics.IoU(num_classes=3, from_logits=from_logits)
    flat.update_state(_images(y), _images(pred))
    np.testing.assert_allclose(_result(iou), _result(flat), rtol=1e-6)


def test_volume_sample_weights_per_sample_and_per_voxel():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, size=(2, 4, 5, 6))
    logits = rng.normal(size=(2, 4, 5, 6, 3)).astype("float32")
    per_sample = metrics.Dice(num_classes=3)
    per_sample.update_state(y, logits, sample_weight=np.array([0.0, 1.0]))
    second = metrics.Dice(num_classes=3)
    second.update_state(y[1:], logits[1:])
    np.testing.assert_allclose(_result(per_sample), _result(second), rtol=1e-6)
    keep = rng.random(y.shape) > 0.5  # per-voxel weights: only the kept voxels count
    per_voxel = metrics.Dice(num_classes=3)
    per_voxel.update_state(y, logits, sample_weight=keep.astype("float32"))
    ref_dice, _ = _np_scores(y[keep], logits.argmax(-1)[keep], 3)
    np.testing.assert_allclose(_result(per_voxel), ref_dice[1:].mean(), rtol=1e-6)


def test_volume_mask_of_the_wrong_shape_is_named():
    m = metrics.Dice(num_classes=2)
    with pytest.raises(ValueError, match=r"y_true must be \(N, D, H, W\).*got shape \(1, 4, 4\)"):
        m.update_state(np.zeros((1, 4, 4)), np.zeros((1, 4, 4, 4, 2), "float32"))
    with pytest.raises(ValueError, match=r"got shape \(1, 4, 6, 5\)"):
        m.update_state(np.zeros((1, 4, 6, 5)), np.zeros((1, 4, 5, 6, 2), "float32"))
    binary = metrics.IoU()
    with pytest.raises(ValueError, match=r"got shape \(1, 4, 5, 6, 2\)"):
        binary.update_state(np.zeros((1, 4, 5, 6, 2)), np.zeros((1, 4, 5, 6, 1), "float32"))
