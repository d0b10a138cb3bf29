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
