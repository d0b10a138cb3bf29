"""Dice and IoU metrics for segmentation that accept logits (or probabilities).

Both accumulate true positives, false positives and false negatives per class over every batch of an
epoch (a "global" score, not a mean of per-batch scores), from hard predictions: ``logit > 0`` (i.e.
probability > ``threshold``) for one output channel, ``argmax`` for several. Predictions are
(N, H, W, C) for images or (N, D, H, W, C) for volumes, masks (N, H, W) / (N, D, H, W), optionally
with a trailing axis of 1 (the conventions of :mod:`kunet.losses`).

``result()`` is the mean over foreground classes (the single class for ``num_classes=1``, classes
1..C-1 otherwise), or one class's score with ``class_id=k``. ``per_class_result()`` returns every
class's score. A class absent from both truth and prediction scores 1.0 (nothing to find, nothing
found).
"""

from __future__ import annotations

import keras
from keras import ops

from kunet._args import check_kwargs
from kunet.losses import _binary_target, _sparse_labels

_PACKAGE = "kunet.metrics"


class _OverlapMetric(keras.metrics.Metric):
    def __init__(
        self,
        num_classes=1,
        from_logits=True,
        threshold=0.5,
        class_id=None,
        name=None,
        dtype=None,
        **kwargs,
    ):
        check_kwargs(self, kwargs, keras.metrics.Metric)
        super().__init__(name=name or type(self).__name__.lower(), dtype=dtype)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}")
        if class_id is not None and not 0 <= class_id < num_classes:
            raise ValueError(
                f"class_id must be in [0, {num_classes - 1}] for num_classes={num_classes}; "
                f"got {class_id!r}"
            )
        self.num_classes = num_classes
        self.from_logits = from_logits
        self.threshold = float(threshold)
        self.class_id = class_id
        self.tp, self.fp, self.fn = (
            self.add_variable(shape=(num_classes,), initializer="zeros", dtype="float32", name=n)
            for n in ("tp", "fp", "fn")
        )

    def _hard(self, y_true, y_pred):
        """Hard prediction and target, both one-hot float32 (N, pixels, C) (voxels for volumes)."""
        y_pred = ops.cast(y_pred, "float32")
        if y_pred.shape[-1] != self.num_classes:
            raise ValueError(
                f"{self.name}: y_pred has {y_pred.shape[-1]} channels but the metric was built "
                f"with num_classes={self.num_classes}"
            )
        if self.num_classes == 1:
            probs = ops.sigmoid(y_pred) if self.from_logits else y_pred
            pred = ops.cast(probs > self.threshold, "float32")
            target = ops.cast(_binary_target(y_true, y_pred) > 0.5, "float32")
        else:
            pred = ops.one_hot(ops.argmax(y_pred, axis=-1), self.num_classes, dtype="float32")
            target = ops.one_hot(_sparse_labels(y_true, y_pred), self.num_classes, dtype="float32")
        batch = ops.shape(pred)[0]
        return (
            ops.reshape(pred, (batch, -1, self.num_classes)),
            ops.reshape(target, (batch, -1, self.num_classes)),
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        pred, target = self._hard(y_true, y_pred)
        if sample_weight is not None:
            w = ops.cast(sample_weight, "float32")
            w = ops.reshape(w, (ops.shape(w)[0], -1, 1))  # (N, 1 or pixels, 1) broadcasts
            pred, target = pred * w, target * w
        # With weights, pred and target carry the same per-pixel weight: tp = sum(pred * [target]).
        hit = ops.sum(pred * ops.cast(target > 0, "float32"), axis=(0, 1))
        self.tp.assign_add(hit)
        self.fp.assign_add(ops.sum(pred, axis=(0, 1)) - hit)
        self.fn.assign_add(ops.sum(target, axis=(0, 1)) - hit)

    def _score(self, tp, fp, fn):
        raise NotImplementedError

    def per_class_result(self):
        """Every class's score, shape (num_classes,)."""
        return self._score(
            ops.convert_to_tensor(self.tp),
            ops.convert_to_tensor(self.fp),
            ops.convert_to_tensor(self.fn),
        )

    def result(self):
        scores = self.per_class_result()
        if self.class_id is not None:
            return scores[self.class_id]
        if self.num_classes == 1:
            return scores[0]
        return ops.mean(scores[1:])

    def reset_state(self):
        for v in (self.tp, self.fp, self.fn):
            v.assign(ops.zeros((self.num_classes,), dtype="float32"))

    def get_config(self):
        return {
            "name": self.name,
            "dtype": self.dtype,
            "num_classes": self.num_classes,
            "from_logits": self.from_logits,
            "threshold": self.threshold,
            "class_id": self.class_id,
        }


@keras.saving.register_keras_serializable(_PACKAGE)
class Dice(_OverlapMetric):
    """Dice coefficient 2TP / (2TP + FP + FN), accumulated over the epoch.

    Args:
        num_classes: the model's output channels (1 = binary).
        from_logits: predictions are logits (default) rather than probabilities.
        threshold: probability threshold for the binary case.
        class_id: report this class only (default: mean over foreground classes).
    """

    def _score(self, tp, fp, fn):
        denom = 2.0 * tp + fp + fn
        return ops.where(denom > 0, 2.0 * tp / ops.maximum(denom, 1e-12), 1.0)


@keras.saving.register_keras_serializable(_PACKAGE)
class IoU(_OverlapMetric):
    """Intersection over union TP / (TP + FP + FN), accumulated over the epoch.

    Same arguments as :class:`Dice`.
    """

    def _score(self, tp, fp, fn):
        denom = tp + fp + fn
        return ops.where(denom > 0, tp / ops.maximum(denom, 1e-12), 1.0)
