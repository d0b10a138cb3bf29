"""Shared test setup: one tests/ tree runs under every Keras backend (KERAS_BACKEND).

Tests marked ``@pytest.mark.tensorflow`` / ``jax`` / ``torch`` run only under that backend.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# kunet before Keras, as `import kunet` runs for users: it sets TensorFlow's oneDNN default
# (TF_ENABLE_ONEDNN_OPTS), which TensorFlow reads when Keras imports it.
import kunet  # noqa: E402

# isort: split
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKENDS = ("tensorflow", "jax", "torch")


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    for item in items:
        for other in BACKENDS:
            if other != backend and item.get_closest_marker(other):
                item.add_marker(
                    pytest.mark.skip(reason=f"{other}-only test; KERAS_BACKEND={backend}")
                )


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def binary_data():
    """Tiny learnable binary task: bright squares on noise, 32x32, 1 channel."""
    rng = np.random.default_rng(0)
    n, size = 8, 32
    masks = np.zeros((n, size, size), "float32")
    for i in range(n):
        r, c = rng.integers(4, 20, size=2)
        masks[i, r : r + 10, c : c + 10] = 1.0
    images = (0.6 * masks + 0.2 * rng.random((n, size, size))).astype("float32")[..., None]
    return images, masks


@pytest.fixture
def multiclass_data():
    """Tiny 3-class task: class 1 squares, class 2 bars, 32x32, 1 channel, int masks (N,H,W)."""
    rng = np.random.default_rng(1)
    n, size = 8, 32
    masks = np.zeros((n, size, size), "int32")
    for i in range(n):
        r, c = rng.integers(2, 18, size=2)
        masks[i, r : r + 8, c : c + 8] = 1
        masks[i, :, (c + 12) % 28 : (c + 12) % 28 + 3] = 2
    images = (masks / 2.0 + 0.2 * rng.random((n, size, size))).astype("float32")[..., None]
    return images, masks


@pytest.fixture
def make_unet():
    """Factory for tiny UNets (filters (4, 8), 1 input channel unless overridden)."""

    def make(**kwargs):
        kwargs.setdefault("filters", (4, 8))
        kwargs.setdefault("input_shape", (None, None, 1))
        return kunet.UNet(**kwargs)

    return make


# |fast path - Keras sublayers| <= atol + rtol * max|sublayers|, per compute dtype
PATH_TOLERANCES = {"float32": (2e-5, 2e-5), "float16": (2e-3, 2e-3)}


@pytest.fixture
def assert_close():
    """``assert_close(got, want, dtype="float32")``: a backend's own DoubleConv path vs the sublayers
    (arrays, or nested lists/tuples of arrays compared pairwise)."""

    def close(got, want, dtype="float32"):
        if isinstance(want, (list, tuple)):  # (outputs, gradients, moving statistics), nested
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                close(g, w, dtype)
            return
        atol, rtol = PATH_TOLERANCES[dtype]
        bound = atol + rtol * float(np.abs(want).max())
        assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)

    return close


@pytest.fixture
def assert_as_accurate():
    """``assert_as_accurate(got, keras_path, truth)``: under mixed precision a backend's own path is
    as accurate as the Keras sublayers, both measured against the same layer run in float32.

    Two float16 computations that round in different places (BN folded into a float16 kernel, say)
    differ from each other by about as much as each differs from float32: up to ~1e-2 of a gradient's
    largest value for Keras' own path. So per tensor: max|got - truth| <= 2 * max|keras - truth| plus
    2e-3 of max|truth| (about two float16 steps). A wrong formula is off by far more.
    """

    def check(got, keras_path, truth):
        if isinstance(truth, (list, tuple)):
            assert len(got) == len(keras_path) == len(truth)
            for g, k, t in zip(got, keras_path, truth, strict=True):
                check(g, k, t)
            return
        keras_err = float(np.abs(keras_path - truth).max())
        bound = 2.0 * keras_err + 2e-3 * float(np.abs(truth).max())
        err = float(np.abs(got - truth).max())
        assert err <= bound, (
            f"error vs float32 {err:.3g} > {bound:.3g} (Keras path {keras_err:.3g})"
        )

    return check


@pytest.fixture
def double_conv_twins():
    """``double_conv_twins(cin, cout, ...)``: two identical DoubleConvs with non-trivial BN
    parameters and moving statistics (one to run on a backend's own path, one on the sublayers)."""
    from kunet.layers import DoubleConv

    def twins(cin, cout, batch_norm=True, seed=0, bn_momentum=0.99):
        rng = np.random.default_rng(seed)
        a, b = (DoubleConv(cout, batch_norm=batch_norm, bn_momentum=bn_momentum) for _ in range(2))
        a.build((None, None, None, cin))
        b.build((None, None, None, cin))
        weights = []
        for w in a.get_weights():
            if w.ndim == 1:  # gamma, beta, moving mean/variance, conv bias
                w = rng.uniform(0.5, 1.5, w.shape) if w.min() >= 1 else rng.normal(0, 0.3, w.shape)
            else:
                w = rng.normal(0, 0.3, w.shape)
            weights.append(w.astype("float32"))
        a.set_weights(weights)
        b.set_weights(weights)
        return a, b

    return twins
