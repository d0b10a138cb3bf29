"""kunet: a Keras 3 UNet for image segmentation on TensorFlow, JAX or PyTorch.

>>> import kunet
>>> model = kunet.UNet(num_classes=1, filters=(16, 32, 64))
>>> model.fit(images, masks, epochs=10)
"""

import os as _os
import sys as _sys

# kernels/ is installed as kunet.kernels (pyproject package-dir). When kunet is imported straight
# from a source checkout (e.g. `python -m kunet.kernels.aot` run in the repository root, where the
# checkout shadows the installed package), let the checkout's kernels/ answer to that name as well.
_here = _os.path.dirname(__file__)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
    _os.path.join(_here, _os.pardir, "kernels", "double_conv.py")
):
    __path__.append(_os.path.dirname(_here))  # noqa: F821 (package __path__)

# TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs with AVX512_VNNI, AVX512_BF16 or
# AMX; elsewhere (AVX2 machines, most AMD ones) it runs Eigen's, and kunet trained at 0.72x the PyTorch
# reference instead of 1.15x on a 2-core AVX2 EPYC (benchmarks/README.md). TensorFlow reads the variable
# when it is imported, so this only acts when kunet is imported before TensorFlow (``import kunet``
# before ``import keras`` under the TensorFlow backend, the kunet CLI), and never overrides a value the
# user set: ``TF_ENABLE_ONEDNN_OPTS=0`` keeps TensorFlow's Eigen kernels.
if "tensorflow" not in _sys.modules:
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from kunet import (  # noqa: E402
    augment,
    blocks,
    callbacks,
    data,
    inference,
    io,
    layers,
    losses,
    metrics,
    outputs,
)
from kunet._fused import FusedUnavailableError, get_fused, set_fused  # noqa: E402
from kunet.model import UNet  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "UNet",
    "augment",
    "blocks",
    "callbacks",
    "data",
    "inference",
    "io",
    "layers",
    "losses",
    "metrics",
    "outputs",
    "set_fused",
    "get_fused",
    "FusedUnavailableError",
    "__version__",
]
