"""The fused Triton DoubleConv kernels (installed as ``kunet.kernels``): tensors in, tensors out.

- :mod:`kunet.kernels.double_conv`: the ``@triton.jit`` kernels and their launch helpers;
- :mod:`kunet.kernels.autograd`: the ``torch.autograd.Function`` s around them;
- :mod:`kunet.kernels.aot`: ``python -m kunet.kernels.aot``, compile for sm_80/sm_90 and report.

Nothing here knows Keras: :mod:`kunet.backends.triton` hands the layer's tensors to these functions.

Importing this package imports nothing (no torch, no triton).
"""
