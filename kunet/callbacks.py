"""Training callbacks: stop at the first NaN/inf instead of training a dead model.

:class:`TerminateOnNonFinite` is what ``kunet.UNet.fit`` adds by itself (unless you pass it, or
Keras' ``TerminateOnNaN``, yourself) and what ``kunet train`` runs before its checkpoints. It is
Keras' ``TerminateOnNaN(raise_error=True)`` plus a check of the weights at each epoch end: on
TensorFlow's oneDNN CPU kernels a NaN input can turn the weights and moving statistics NaN while
the loss stays finite (ReLU maps NaN to 0 there), which a loss check alone never sees.
"""

from __future__ import annotations

import math

import keras

from kunet.io import show

__all__ = ["NonFiniteError", "TerminateOnNonFinite", "nonfinite_weights"]


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/inf loss or weights; the message says where."""


def nonfinite_weights(model):
    """Paths of the model's variables (weights and moving statistics) holding NaN/inf values."""
    ops = keras.ops
    weights = [v for v in model.weights if "float" in str(v.dtype)]
    flags = [ops.logical_not(ops.all(ops.isfinite(v))) for v in weights]
    if not flags or not bool(ops.any(ops.stack(flags))):  # one read back in the common case
        return []
    return [v.path for v, bad in zip(weights, flags, strict=True) if bool(bad)]


class TerminateOnNonFinite(keras.callbacks.Callback):
    """Raises :class:`NonFiniteError` at the first batch whose loss is NaN/inf, and at an epoch end
    where any weight is, before the callbacks after it (checkpoints) see that epoch.

    The loss of a batch whose images hold NaN/inf is NaN under ``kunet.UNet`` on every backend (the
    training step checks its input), so such a batch stops training at once with this message.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteError(
                f"training stopped at epoch {self._epoch + 1}, batch {batch + 1}: the loss is "
                f"{float(loss)} (a batch of images holding NaN/inf values, or a diverging run: "
                "try a lower learning rate)"
            )

    def on_epoch_end(self, epoch, logs=None):
        bad = nonfinite_weights(self.model)
        if bad:
            raise NonFiniteError(
                f"training stopped at the end of epoch {epoch + 1}: {len(bad)} variable(s) hold "
                f"NaN/inf values ({show(bad)}) (NaN/inf inputs, or a diverging run)"
            )
