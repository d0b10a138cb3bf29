"""kunet: a Keras 3 UNet for image segmentation on TensorFlow, JAX or PyTorch.

>>> import kunet
>>> model = kunet.UNet(num_classes=1, filters=(16, 32, 64))
>>> model.fit(images, masks, epochs=10)
"""

from kunet import blocks, layers, losses, metrics
from kunet._fused import FusedUnavailableError, get_fused, set_fused
from kunet.model import UNet

__version__ = "0.1.0"

__all__ = [
    "UNet",
    "blocks",
    "layers",
    "losses",
    "metrics",
    "set_fused",
    "get_fused",
    "FusedUnavailableError",
    "__version__",
]
