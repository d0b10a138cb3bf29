"""The fused DoubleConv keeps at most half the bytes of the plain one alive for backward.

Fused: x, raw y1, raw y2 and per-channel vectors.  Plain (Keras Conv2D/BatchNormalization/ReLU on
torch): the conv inputs, BN's fp32 intermediates and the ReLU outputs.  The torch backend's default
plain path (torch conv2d + fused batch norm, kunet.backends.torch_ops) sits in between.  Counted with
saved_tensors_hooks (benchmarks/saved_memory.py, the measuring tool) at a UNet-like shape.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_TOOL = Path(__file__).resolve().parents[2] / "benchmarks" / "saved_memory.py"
_spec = importlib.util.spec_from_file_location("saved_memory", _TOOL)
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)

SHAPE = dict(n=2, h=64, w=64, c_in=32, c_out=64)


@pytest.mark.parametrize("dtype", [None, "mixed_float16"], ids=["float32", "mixed_float16"])
def test_fused_saves_at_most_half_of_plain(dtype, interpreter_tiles):
    figures = memory.compare(**SHAPE, dtype=dtype)
    assert figures["ratio"] <= 0.5, figures
    # also below the torch backend's own eager plain path (which already drops BN's intermediates)
    assert figures["fused"] < figures["eager"] < figures["plain"], figures
    # exactly x, y1 and y2 (compute dtype) plus per-channel fp32 vectors and, under mixed precision,
    # the compute-dtype copies of the two kernels that Keras' autocast hands to the layer
    act = figures["activation_bytes"]
    cin, cout = SHAPE["c_in"], SHAPE["c_out"]
    x_bytes = act * cin // cout
    extra = figures["fused"] - (x_bytes + 2 * act)
    kernel_copies = 9 * (cin + cout) * cout * 2 if dtype else 0
    assert 0 <= extra <= kernel_copies + 16 * cout * 4, figures
