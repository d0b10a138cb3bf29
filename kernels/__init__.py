"""The fused Triton DoubleConv (installed as ``kunet.kernels``; imported lazily by ``kunet._fused``).

- :mod:`kunet.kernels.double_conv`: the ``@triton.jit`` kernels and their launch helpers;
- :mod:`kunet.kernels.autograd`: the ``torch.autograd.Function`` s and the layer entry point;
- :mod:`kunet.kernels.aot`: ``python -m kunet.kernels.aot``, compile for sm_80/sm_90 and report;
- :mod:`kunet.kernels.memory`: bytes saved for backward, fused vs plain.

Importing this package imports nothing (no torch, no triton).
"""
