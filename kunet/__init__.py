"""kunet: a Keras 3 UNet for image segmentation on TensorFlow, JAX or PyTorch.

>>> import kunet
>>> model = kunet.UNet(num_classes=1, filters=(16, 32, 64))
>>> model.fit(images, masks, epochs=10)
"""

import os as _os

# kernels/ is installed as kunet.kernels (pyproject package-dir). When kunet is imported straight
# from a source checkout (e.g. `python -m kunet.kernels.aot` run in the repository root, where the
# checkout shadows the installed package), let the checkout's kernels/ answer to that name as well.
_here = _os.path.dirname(__file__)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
    _os.path.join(_here, _os.pardir, "kernels", "double_conv.py")
):
    __path__.append(_os.path.dirname(_here))  # noqa: F821 (package __path__)

from kunet import augment, blocks, data, inference, io, layers, losses, metrics  # noqa: E402
from kunet._fused import FusedUnavailableError, get_fused, set_fused  # noqa: E402
from kunet.model import UNet  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "UNet",
    "augment",
    "blocks",
    "data",
    "inference",
    "io",
    "layers",
    "losses",
    "metrics",
    "set_fused",
    "get_fused",
    "FusedUnavailableError",
    "__version__",
]
