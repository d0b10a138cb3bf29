"""kunet: a Keras 3 UNet for image segmentation on TensorFlow, JAX or PyTorch.

>>> import kunet
>>> model = kunet.UNet(num_classes=1, filters=(16, 32, 64))
>>> model.fit(images, masks, epochs=10)
"""

import os as _os
import sys as _sys

# Kept because kernels/ (a top-level folder) installs as kunet.kernels: in a source checkout on
# sys.path (`python -m kunet.kernels.aot` in the repository root) kunet/ has no kernels/ of its own.
_here = _os.path.dirname(__file__)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
    _os.path.join(_here, _os.pardir, "kernels", "double_conv.py")
):
    __path__.append(_os.path.dirname(_here))  # noqa: F821 (package __path__)

# TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with AVX512_VNNI, AVX512_BF16 or
# AMX; elsewhere (AVX2 machines, most AMD ones) it runs Eigen's, and kunet trains much slower
# (benchmarks/README.md). TensorFlow reads the variable when it is imported, so this only acts when
# kunet is imported before TensorFlow (``import kunet`` before ``import keras`` under the TensorFlow
# backend, the kunet CLI), and never overrides a value the user set: ``TF_ENABLE_ONEDNN_OPTS=0``
# keeps TensorFlow's Eigen kernels. Imported after TensorFlow, it is too late:
# kunet.dispatch.check_tensorflow_onednn then warns (once) where oneDNN was left off, with the fix.
_tensorflow_first = "tensorflow" in _sys.modules
if not _tensorflow_first:
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# The kunet command: Keras and its backend are imported with their start-up log lines (TensorFlow's
# C++ logging) kept out of the terminal, unless asked for (kunet/_startup.py).
from kunet import _startup  # noqa: E402

_startup.quiet_start()

from kunet import (  # noqa: E402
    augment,
    blocks,
    callbacks,
    convert,
    data,
    distribute,
    encoders,
    export,
    inference,
    io,
    layers,
    losses,
    metrics,
    outputs,
    presets,
    volumes,
)
from kunet.dispatch import FusedUnavailableError, explain, get_fused, set_fused  # noqa: E402
from kunet.model import UNet, UNetPlusPlus  # noqa: E402

if _tensorflow_first:
    from kunet.dispatch import check_tensorflow_onednn as _check_onednn

    _check_onednn()

__version__ = "0.1.0"

__all__ = [
    "UNet",
    "UNetPlusPlus",
    "augment",
    "blocks",
    "callbacks",
    "convert",
    "data",
    "distribute",
    "encoders",
    "export",
    "inference",
    "io",
    "layers",
    "losses",
    "metrics",
    "outputs",
    "presets",
    "volumes",
    "explain",
    "set_fused",
    "get_fused",
    "FusedUnavailableError",
    "__version__",
]
