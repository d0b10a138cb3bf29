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
    import pytest

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
        from kunet import dispatch

        monkeypatch.setattr(dispatch, "_global_policy", None)
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
