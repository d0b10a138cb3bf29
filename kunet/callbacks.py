"""Training callbacks: stop at the first NaN/inf instead of training a dead model; anneal the
learning rate over a time budget.

:class:`TerminateOnNonFinite` is what ``kunet.UNet.fit`` adds by itself (unless you pass it, or
Keras' ``TerminateOnNaN``, yourself) and what ``kunet train`` runs before its checkpoints. It is
Keras' ``TerminateOnNaN(raise_error=True)`` plus a check of the weights at each epoch end: on
TensorFlow's oneDNN CPU kernels a NaN input can turn the weights and moving statistics NaN while
the loss stays finite (ReLU maps NaN to 0 there), which a loss check alone never sees.
"""

from __future__ import annotations

import math
import time

import keras

from kunet.io import show

__all__ = ["NonFiniteError", "TerminateOnNonFinite", "nonfinite_weights", "LearningRateSchedule"]


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


class LearningRateSchedule(keras.callbacks.Callback):
    """Cosine (or constant) learning rate over a run, with a linear warm-up, set once per epoch.

    Progress runs from 0 to 1 over the run: elapsed seconds over ``budget`` (counted from
    ``start``, a ``time.monotonic()`` reading) when there is a time budget, so the rate reaches its
    end as the budget runs out; else epochs over ``epochs``. Each epoch uses the rate at its
    predicted midpoint (the last epoch's length predicts the next one), set before the epoch begins:
    the one moment every backend reads a new value (JAX's training loop takes the optimizer's state
    in at epoch starts). ``resumed_from`` (a progress in [0, 1)) continues a resumed run's schedule
    over its new budget. ``progress`` is the progress reached so far.
    """

    def __init__(
        self,
        peak,
        *,
        warmup=0.0,
        final=0.01,
        shape="cosine",
        budget=None,
        start=None,
        epochs=None,
        resumed_from=0.0,
    ):
        super().__init__()
        if shape not in ("cosine", "constant"):
            raise ValueError(f"shape must be 'cosine' or 'constant'; got {shape!r}")
        if not budget and not epochs:
            raise ValueError("give a time budget or a number of epochs")
        self.peak, self.warmup, self.final, self.shape = float(peak), warmup, final, shape
        self.budget, self.start, self.epochs = budget, start, epochs
        self.resumed_from = float(resumed_from or 0.0)
        self.progress = self.resumed_from
        self._began = self._last = None

    def rate(self, progress):
        """The learning rate at ``progress`` in [0, 1]."""
        progress = min(max(progress, 0.0), 1.0)
        if self.warmup and progress < self.warmup:
            return self.peak * max(progress / self.warmup, 0.01)
        if self.shape == "constant":
            return self.peak
        t = (progress - self.warmup) / max(1.0 - self.warmup, 1e-9)
        return self.peak * (self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * t)))

    def _elapsed_progress(self, seconds_ahead=0.0):
        elapsed = time.monotonic() - self.start + seconds_ahead
        return self.resumed_from + (1.0 - self.resumed_from) * elapsed / self.budget

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._began = time.monotonic()
        if self.budget:
            midpoint = self._elapsed_progress((self._last or self.budget / 16) / 2)
        else:
            midpoint = (epoch + 0.5) / self.epochs
        self.model.optimizer.learning_rate.assign(self.rate(midpoint))

    def on_epoch_end(self, epoch, logs=None):
        self._last = time.monotonic() - self._began
        done = self._elapsed_progress() if self.budget else (epoch + 1) / self.epochs
        self.progress = min(1.0, done)
