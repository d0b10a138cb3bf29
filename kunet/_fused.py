"""The one place that decides whether a DoubleConv runs the fused Triton kernel or plain Keras layers.

Policy, most specific first:

1. ``DoubleConv(fused=True|False)`` (or ``UNet(fused=...)``, which passes it to every DoubleConv);
2. the global policy set with :func:`set_fused` (``"auto"``, ``True`` or ``False``);
3. the environment variable ``KUNET_FUSED`` (``auto``, ``1``/``true``/``on``, ``0``/``false``/``off``),
   read once, at the first decision, if :func:`set_fused` was never called;
4. ``"auto"``.

``"auto"`` takes the fused path only when it can run: the Keras backend is torch, Triton imports, the
layer uses batch normalization, and the input is a real CUDA tensor (or a CPU tensor while
``TRITON_INTERPRET=1`` is set, which is how the CPU test-suite exercises the kernels). Otherwise it
falls back to the plain layers silently. ``True`` raises a :class:`FusedUnavailableError` that says why
when the fused path cannot run. JAX and TensorFlow never take the Triton path.

Symbolic tracing (building a functional model: torch "meta" tensors, Keras tensors) always takes the
plain path: both paths produce the same shapes and the same variables.

The plain path is the backend's own fast ops where kunet has them, with the same math and variables
as the Keras sublayers:

* torch: ``kunet.kernels.torch_eager`` (conv2d + fused batch norm on a channels_last view, without
  Keras' per-layer layout copies; BN folded into the convolutions for inference);
* TensorFlow: ``kunet.kernels.tensorflow_ops`` (``FusedBatchNormV3`` in training, BN folded into the
  convolutions for inference);
* JAX, and everywhere while tracing symbolically: the Keras sublayers (XLA fuses BN + ReLU).

This module is the backend dispatch: nothing here imports torch, TensorFlow or Triton at module
import time; the ``kunet.kernels`` modules that do are imported on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import keras

_VALID = ("auto", True, False)
_global_policy: object = None  # None: not set, read KUNET_FUSED


class FusedUnavailableError(RuntimeError):
    """``fused=True`` was asked for where the fused DoubleConv cannot run."""


def _parse_policy(value, *, name: str):
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return "auto"
        if v in ("1", "true", "on", "yes"):
            return True
        if v in ("0", "false", "off", "no"):
            return False
    raise ValueError(
        f"{name} must be 'auto', True or False (env KUNET_FUSED: auto/1/0/true/false); got {value!r}"
    )


def set_fused(policy) -> None:
    """Set the global fused-DoubleConv policy: ``"auto"`` (default), ``True`` or ``False``.

    A layer's own ``fused=`` argument, when not None, takes precedence.
    """
    global _global_policy
    _global_policy = _parse_policy(policy, name="set_fused(policy)")


def get_fused():
    """The global policy in force: ``"auto"``, ``True`` or ``False``."""
    if _global_policy is not None:
        return _global_policy
    env = os.environ.get("KUNET_FUSED")
    if env is None or env.strip() == "":
        return "auto"
    return _parse_policy(env, name="KUNET_FUSED")


def validate_policy(value, name: str = "fused"):
    """Check a per-layer ``fused`` argument (None, 'auto', True or False) and normalise it."""
    return _parse_policy(value, name=name)


def interpret_mode() -> bool:
    """True when Triton's interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0", "false", "False")


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'kunet[triton]')"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return f"Triton failed to import: {exc!r}"
    return None


def _is_symbolic(x) -> bool:
    if isinstance(x, keras.KerasTensor):
        return True
    device = getattr(x, "device", None)
    return getattr(device, "type", None) == "meta"


def unavailable_reason(x, *, batch_norm: bool = True) -> str | None:
    """Why the fused path cannot run on ``x`` here, or None if it can."""
    backend = keras.backend.backend()
    if backend != "torch":
        return (
            f"the fused DoubleConv runs on the torch backend only; KERAS_BACKEND is {backend!r} "
            "(JAX and TensorFlow take their own plain path)"
        )
    if not batch_norm:
        return "the fused DoubleConv fuses Conv-BatchNorm-ReLU; this layer has batch_norm=False"
    err = _triton_import_error()
    if err is not None:
        return err
    device = getattr(getattr(x, "device", None), "type", None)
    if device == "cuda":
        return None
    if device == "cpu" and interpret_mode():
        return None
    return (
        f"the input is on {device!r}; the fused DoubleConv needs a CUDA tensor "
        "(or TRITON_INTERPRET=1 for Triton's CPU interpreter)"
    )


def use_fused(layer_policy, x, *, batch_norm: bool = True) -> bool:
    """Decide fused vs plain for one call. Raises :class:`FusedUnavailableError` for ``True``."""
    policy = layer_policy if layer_policy is not None else get_fused()
    if policy is False or _is_symbolic(x):
        return False
    reason = unavailable_reason(x, batch_norm=batch_norm)
    if reason is None:
        return True
    if policy is True:
        raise FusedUnavailableError(f"fused=True, but the fused DoubleConv cannot run: {reason}.")
    return False


def double_conv(layer, x, training: bool):
    """Run ``layer`` (a :class:`kunet.layers.DoubleConv`) through the fused Triton path."""
    from kunet.kernels import autograd as fused_ops  # lazy: torch + triton

    return fused_ops.double_conv_layer_forward(layer, x, training=training)


def use_torch_eager(layer, x) -> bool:
    """Whether ``layer`` may run through PyTorch's eager ops here (torch backend, a real tensor).

    ``layer``: a DoubleConv (checked for options the eager path implements), or None.
    """
    if keras.backend.backend() != "torch" or _is_symbolic(x):
        return False
    return layer is None or _plain_batch_norms(layer)


def _plain_batch_norms(layer) -> bool:
    """False for BatchNormalization options the backends' own DoubleConv paths do not implement
    (no center/scale, renorm, cross-replica synchronization): then the Keras sublayers run."""
    for bn in (layer.bn1, layer.bn2):
        if bn is None:
            continue
        if not bn.center or not bn.scale or getattr(bn, "renorm", False):
            return False
        if getattr(bn, "synchronized", False):
            return False
    return True


def torch_double_conv(layer, x, training: bool):
    """Run ``layer`` through PyTorch's eager ops (see :mod:`kunet.kernels.torch_eager`)."""
    from kunet.kernels import torch_eager

    return torch_eager.double_conv_forward(layer, x, training=training)


def torch_max_pool2x(x):
    """2x2 max-pool of an NHWC torch tensor in channels_last memory (no layout copies)."""
    from kunet.kernels import torch_eager

    return torch_eager.max_pool2x(x)


def torch_conv2d(layer, x):
    """``layer`` (a ``keras.layers.Conv2D``) on an NHWC torch tensor, in channels_last memory."""
    from kunet.kernels import torch_eager

    return torch_eager.conv2d(layer, x)


def torch_conv_transpose2d(layer, x):
    """``layer`` (a ``keras.layers.Conv2DTranspose``) on an NHWC torch tensor, channels_last."""
    from kunet.kernels import torch_eager

    return torch_eager.conv_transpose2d(layer, x)


def use_jax_ops(x) -> bool:
    """Whether a layer's JAX-specific formulation applies here (JAX backend, a real array)."""
    return keras.backend.backend() == "jax" and not _is_symbolic(x)


def use_tensorflow_ops(layer, x) -> bool:
    """Whether DoubleConv ``layer`` may run through TensorFlow's fused ops here (TF backend)."""
    return (
        keras.backend.backend() == "tensorflow"
        and not _is_symbolic(x)
        and _plain_batch_norms(layer)
    )


def tensorflow_double_conv(layer, x, training: bool):
    """Run ``layer`` through TensorFlow's fused ops (see :mod:`kunet.kernels.tensorflow_ops`)."""
    from kunet.kernels import tensorflow_ops

    return tensorflow_ops.double_conv_forward(layer, x, training=training)


def has_accelerator() -> bool:
    """Whether the active backend sees a GPU (what ``kunet plan`` sizes patches and epochs for)."""
    backend = keras.backend.backend()
    try:
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
        if backend == "jax":
            import jax

            return jax.default_backend() in ("gpu", "cuda", "rocm")
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # noqa: BLE001 - no accelerator is the safe answer
        return False
    return False
