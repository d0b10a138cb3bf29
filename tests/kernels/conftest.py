"""Parity tests of the fused Triton DoubleConv, on CPU through Triton's interpreter.

Run by the ``kernels`` nox session: ``KERAS_BACKEND=torch TRITON_INTERPRET=1 pytest tests/kernels``.
Both variables must come from the environment: tests/conftest.py imports Keras before this file, and
Keras' torch backend imports triton, whose ``@triton.jit`` (also inside ``triton.language``) picks
the interpreter when it is imported.  Under another backend, without torch/triton, or without
``TRITON_INTERPRET=1``, nothing in this directory is collected and the run header says why (the plain
``tests`` sessions collect tests/ under TensorFlow, JAX and torch).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import keras


def _unavailable() -> str | None:
    if keras.backend.backend() != "torch":
        return f"KERAS_BACKEND is {keras.backend.backend()!r}; the fused kernels run on torch"
    for module in ("torch", "triton"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'kunet[triton]')"
    if os.environ.get("TRITON_INTERPRET", "0").strip() in ("", "0", "false", "False"):
        if "triton.language" in sys.modules:
            return (
                "TRITON_INTERPRET=1 is not set; it must be in the environment before Keras' torch "
                "backend imports triton (run: KERAS_BACKEND=torch TRITON_INTERPRET=1 pytest "
                "tests/kernels)"
            )
        os.environ["TRITON_INTERPRET"] = "1"  # triton not imported yet: not too late
    return None


SKIP_REASON = _unavailable()
# test modules import torch at top level: do not even import them when the kernels cannot run
collect_ignore_glob = ["test_*.py"] if SKIP_REASON else []


def pytest_report_header(config):
    if SKIP_REASON:
        return f"tests/kernels not collected: {SKIP_REASON}"
    return f"tests/kernels: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"


if SKIP_REASON is None:
    import numpy as np
    import pytest

    # Tolerances, per activation dtype: |fused - plain| <= atol + rtol * max|plain|, per tensor.
    # fp32: products are exact fp32 in the interpreter (input_precision="ieee"); only summation
    # order differs.  fp16: y1/y2 and the conv operands are rounded to fp16 in both paths, at
    # different points (e.g. the fused statistics come from the fp32 accumulator).
    TOLERANCES = {
        "float32": {"atol": 1e-5, "rtol": 2e-5},
        "float16": {"atol": 1e-2, "rtol": 1e-2},
    }

    def _assert_close(actual, expected, dtype, what):
        actual = np.asarray(keras.ops.convert_to_numpy(actual), dtype="float64")
        expected = np.asarray(keras.ops.convert_to_numpy(expected), dtype="float64")
        assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
        tol = TOLERANCES[dtype]
        err = np.max(np.abs(actual - expected)) if actual.size else 0.0
        bound = tol["atol"] + tol["rtol"] * np.max(np.abs(expected))
        assert err <= bound, f"{what}: max |fused - plain| = {err:.3g} > {bound:.3g} ({dtype})"

    @pytest.fixture
    def assert_close():
        """``assert_close(fused, plain, dtype_name, what)`` with the table above."""
        return _assert_close

    @pytest.fixture
    def kernel_calls(monkeypatch):
        """Counts launches of the fused kernels (to prove a test ran the fused path)."""
        from kunet.kernels import double_conv as K

        calls = {"conv3x3": 0, "wgrad": 0}

        def counting(name, fn):
            def wrapped(*args, **kwargs):
                calls[name] += 1
                return fn(*args, **kwargs)

            return wrapped

        monkeypatch.setattr(K, "conv3x3", counting("conv3x3", K.conv3x3))
        monkeypatch.setattr(K, "conv3x3_wgrad", counting("wgrad", K.conv3x3_wgrad))
        return calls

    @pytest.fixture(autouse=True)
    def _fresh_policy(monkeypatch):
        """Each test starts with no global policy set (set_fused never called)."""
        from kunet import _fused

        monkeypatch.setattr(_fused, "_global_policy", None)
        monkeypatch.delenv("KUNET_FUSED", raising=False)

    # The interpreter runs each Triton program in numpy, one after the other: larger row tiles mean
    # fewer programs and ~6x less time for the UNet and memory tests.  The layer parity tests use the
    # GPU tiles (double_conv.CONFIGS); these tests also check the kernels with a second tiling.
    INTERPRETER_TILES = {"conv3x3": {"BM": 256}, "wgrad": {"BM": 256}, "elementwise": {"BM": 256}}

    @pytest.fixture(scope="module")
    def interpreter_tiles():
        from kunet.kernels import double_conv as K

        with pytest.MonkeyPatch.context() as mp:
            for kernel, values in INTERPRETER_TILES.items():
                mp.setitem(K.CONFIGS, kernel, {**K.CONFIGS[kernel], **values})
            yield
