"""Segmentation losses that accept logits (or probabilities), binary and multi-class.

Conventions shared by every loss here:

* ``y_pred`` is (N, H, W, C) for images or (N, D, H, W, C) for volumes. C == 1 means binary: a
  sigmoid is applied (when ``from_logits``) and ``y_true`` holds {0, 1} (or soft) values shaped
  (N, H, W) or (N, H, W, 1) ((N, D, H, W) or (N, D, H, W, 1) for volumes). C >= 2 means multi-class:
  a softmax is applied and ``y_true`` holds integer class indices, shaped likewise. Any other
  ``y_true`` shape is a ValueError naming both shapes.
* Everything is computed in float32, even under mixed precision.
* Each loss returns one value per sample, so Keras' ``sample_weight`` and reductions apply.
* Overlap losses (Dice, Jaccard, Tversky) are soft, computed per sample over every pixel (voxel),
  and averaged over classes (``include_background=False`` drops class 0 in the multi-class case).

Cross-entropy and focal terms reuse Keras' own ``keras.losses`` functions.
"""

from __future__ import annotations

import keras
from keras import ops

from kunet._args import check_kwargs

_PACKAGE = "kunet.losses"


def _check_target(y_true, y_pred):
    """ValueError unless ``y_true`` is (N, *spatial) or (N, *spatial, 1) for ``y_pred``
    (N, *spatial, C): a mask of another rank or size would be reshaped onto the wrong pixels."""
    t, p = tuple(y_true.shape), tuple(y_pred.shape)
    ok = len(t) == len(p) - 1 or (len(t) == len(p) and t[-1] in (1, None))
    if ok:  # batch and spatial sides, where both are known
        ok = all(
            a is None or b is None or a == b for a, b in zip(t[: len(p) - 1], p[:-1], strict=True)
        )
    if not ok:
        axes = "N, D, H, W" if len(p) == 5 else "N, H, W" if len(p) == 4 else "N, ..."
        raise ValueError(
            f"y_true must be ({axes}) or ({axes}, 1) to match y_pred of shape {p}; got shape {t}"
        )


def _binary_target(y_true, y_pred):
    target = ops.cast(y_true, "float32")
    _check_target(target, y_pred)
    if len(target.shape) == len(y_pred.shape) - 1:
        target = ops.expand_dims(target, -1)
    return target


def _sparse_labels(y_true, y_pred):
    labels = ops.cast(y_true, "int32")
    _check_target(labels, y_pred)
    if len(labels.shape) == len(y_pred.shape):
        labels = ops.squeeze(labels, -1)
    return labels


def _prepare(y_true, y_pred, from_logits):
    """Float32 probabilities and matching one-hot targets, both (N, pixels, C)."""
    y_pred = ops.cast(y_pred, "float32")
    num_classes = y_pred.shape[-1]
    if num_classes is None:
        raise ValueError("the last (class) axis of y_pred must be known")
    if num_classes == 1:
        probs = ops.sigmoid(y_pred) if from_logits else y_pred
        target = _binary_target(y_true, y_pred)
    else:
        probs = ops.softmax(y_pred, axis=-1) if from_logits else y_pred
        target = ops.one_hot(_sparse_labels(y_true, y_pred), num_classes, dtype="float32")
    batch = ops.shape(probs)[0]
    return (
        ops.reshape(probs, (batch, -1, num_classes)),
        ops.reshape(target, (batch, -1, num_classes)),
    )


class _OverlapLoss(keras.losses.Loss):
    """Tversky index family: 1 - (tp + s) / (tp + alpha*fp + beta*fn + s), mean over classes."""

    alpha = beta = 0.5

    def __init__(
        self,
        from_logits=True,
        smooth=1.0,
        include_background=True,
        batch_dice=False,
        name=None,
        **kwargs,
    ):
        check_kwargs(self, kwargs, keras.losses.Loss)  # the subclass's own arguments included
        super().__init__(name=name or type(self).__name__.lower(), **kwargs)
        self.from_logits = from_logits
        self.smooth = float(smooth)
        self.include_background = include_background
        self.batch_dice = bool(batch_dice)

    def call(self, y_true, y_pred):
        probs, target = _prepare(y_true, y_pred, self.from_logits)
        axes = (0, 1) if self.batch_dice else 1
        tp = ops.sum(probs * target, axis=axes)
        fp = ops.sum(probs * (1.0 - target), axis=axes)
        fn = ops.sum((1.0 - probs) * target, axis=axes)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        if not self.include_background and index.shape[-1] > 1:
            index = index[..., 1:]
        loss = 1.0 - ops.mean(index, axis=-1)
        if self.batch_dice:  # one value for the batch, given to each sample (sample_weight works)
            loss = ops.broadcast_to(loss, ops.shape(probs)[:1])
        return loss

    def get_config(self):
        return {
            **super().get_config(),
            "from_logits": self.from_logits,
            "smooth": self.smooth,
            "include_background": self.include_background,
            "batch_dice": self.batch_dice,
        }


@keras.saving.register_keras_serializable(_PACKAGE)
class Dice(_OverlapLoss):
    """Soft Dice loss, 1 - 2|P∩T| / (|P| + |T|), per sample, mean over classes.

    Args:
        from_logits: ``y_pred`` holds logits (default) rather than probabilities.
        smooth: added to numerator and denominator; keeps empty masks finite (empty truth and empty
            prediction give a loss of 0).
        include_background: in the multi-class case, include class 0 in the mean (default True).
        batch_dice: overlap summed over the whole batch, not per sample (each sample's loss is
            the batch's): steadier for sparse objects, which many patches lack (nnU-Net's 2D
            default).
    """


@keras.saving.register_keras_serializable(_PACKAGE)
class Jaccard(_OverlapLoss):
    """Soft Jaccard (IoU) loss, 1 - |P∩T| / |P∪T|, per sample, mean over classes."""

    alpha = beta = 1.0


@keras.saving.register_keras_serializable(_PACKAGE)
class Tversky(_OverlapLoss):
    """Tversky loss, 1 - tp / (tp + alpha*fp + beta*fn); beta > alpha favours recall.

    ``alpha = beta = 0.5`` is Dice, ``alpha = beta = 1`` is Jaccard. Default (0.3, 0.7).
    """

    def __init__(self, alpha=0.3, beta=0.7, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta}


def _pixel_mean(values):
    """Mean over every axis but the batch axis (every pixel or voxel) -> (N,)."""
    return ops.mean(ops.reshape(values, (ops.shape(values)[0], -1)), axis=-1)


def cross_entropy(y_true, y_pred, from_logits=True):
    """Per-sample mean pixel (voxel) cross-entropy: binary for C == 1, sparse categorical for
    C >= 2."""
    y_pred = ops.cast(y_pred, "float32")
    if y_pred.shape[-1] == 1:
        target = _binary_target(y_true, y_pred)
        ce = keras.losses.binary_crossentropy(target, y_pred, from_logits=from_logits)
    else:
        labels = _sparse_labels(y_true, y_pred)
        ce = keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=from_logits)
    return _pixel_mean(ce)


@keras.saving.register_keras_serializable(_PACKAGE)
class Focal(keras.losses.Loss):
    """Focal loss (Lin et al. 2017), binary or multi-class, per-sample mean over pixels (voxels).

    Wraps ``keras.losses.binary_focal_crossentropy`` / ``categorical_focal_crossentropy`` with the
    integer-mask and logits conventions of this module.
    """

    def __init__(self, gamma=2.0, alpha=0.25, from_logits=True, name="focal", **kwargs):
        check_kwargs(self, kwargs, keras.losses.Loss)
        super().__init__(name=name, **kwargs)
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)
        self.from_logits = from_logits

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        if y_pred.shape[-1] == 1:
            loss = keras.losses.binary_focal_crossentropy(
                _binary_target(y_true, y_pred),
                y_pred,
                apply_class_balancing=self.alpha is not None,
                alpha=0.25 if self.alpha is None else self.alpha,
                gamma=self.gamma,
                from_logits=self.from_logits,
            )
        else:
            target = ops.one_hot(_sparse_labels(y_true, y_pred), y_pred.shape[-1], dtype="float32")
            loss = keras.losses.categorical_focal_crossentropy(
                target,
                y_pred,
                alpha=1.0 if self.alpha is None else self.alpha,
                gamma=self.gamma,
                from_logits=self.from_logits,
            )
        return _pixel_mean(loss)

    def get_config(self):
        return {
            **super().get_config(),
            "gamma": self.gamma,
            "alpha": self.alpha,
            "from_logits": self.from_logits,
        }


@keras.saving.register_keras_serializable(_PACKAGE)
class CEDice(keras.losses.Loss):
    """``ce_weight * cross-entropy + dice_weight * Dice``: kunet's default training loss.

    Binary cross-entropy for one output channel, sparse categorical cross-entropy for several.
    """

    def __init__(
        self,
        ce_weight=1.0,
        dice_weight=1.0,
        from_logits=True,
        smooth=1.0,
        include_background=True,
        batch_dice=False,
        name="ce_dice",
        **kwargs,
    ):
        check_kwargs(self, kwargs, keras.losses.Loss)
        super().__init__(name=name, **kwargs)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.from_logits = from_logits
        self.smooth = float(smooth)
        self.include_background = include_background
        self.batch_dice = bool(batch_dice)
        self._dice = Dice(
            from_logits=from_logits,
            smooth=smooth,
            include_background=include_background,
            batch_dice=batch_dice,
        )

    def call(self, y_true, y_pred):
        ce = cross_entropy(y_true, y_pred, from_logits=self.from_logits)
        return self.ce_weight * ce + self.dice_weight * self._dice.call(y_true, y_pred)

    def get_config(self):
        return {
            **super().get_config(),
            "ce_weight": self.ce_weight,
            "dice_weight": self.dice_weight,
            "from_logits": self.from_logits,
            "smooth": self.smooth,
            "include_background": self.include_background,
            "batch_dice": self.batch_dice,
        }
