"""Named configurations of the UNet family: variants as data, not subclasses.

>>> kunet.presets.names()
>>> model = kunet.UNet.from_preset("attention-unet", num_classes=3)

Each preset is a dict of :class:`kunet.UNet` arguments; ``from_preset(name, **overrides)`` builds it
with your arguments replacing the preset's. ``kunet train --model NAME`` takes the same names.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "unet": {
        "description": "the UNet of Ronneberger et al. 2015, with batch normalization",
        "config": {"filters": (64, 128, 256, 512)},
    },
    "unet-small": {
        "description": "a quarter of the filters: CPU training, small data, quick experiments",
        "config": {"filters": (16, 32, 64, 128)},
    },
    "unet-deep-supervision": {
        "description": "UNet trained with deep supervision on every lower decoder stage (nnU-Net)",
        "config": {"filters": (32, 64, 128, 256), "deep_supervision": True},
    },
    "residual-unet": {
        "description": "UNet whose blocks add a shortcut (ResUNet)",
        "config": {"filters": (32, 64, 128, 256), "block": "residual"},
    },
    "attention-unet": {
        "description": "Attention U-Net (Oktay et al. 2018): gated skip connections",
        "config": {"filters": (32, 64, 128, 256), "attention": True},
    },
    "unet++": {
        "description": "UNet++ (Zhou et al. 2018): nested dense skips, deep supervision",
        "config": {"filters": (32, 64, 128, 256), "skips": "nested", "deep_supervision": True},
    },
    "unet3d": {
        "description": "3D U-Net (Cicek et al. 2016) for volumes (CT, MRI, microscopy stacks)",
        "config": {"spatial_dims": 3, "filters": (32, 64, 128, 256)},
    },
    "unet3d-small": {
        "description": "3D U-Net with few filters: CPU training on small volumes",
        "config": {"spatial_dims": 3, "filters": (8, 16, 32)},
    },
    "residual-unet3d": {
        "description": "3D U-Net with residual blocks and deep supervision (nnU-Net-like)",
        "config": {
            "spatial_dims": 3,
            "filters": (32, 64, 128, 256),
            "block": "residual",
            "deep_supervision": True,
        },  # fmt: skip
    },
    "resnet50-unet": {
        "description": "UNet decoder on an ImageNet ResNet50 encoder (keras.applications)",
        "config": {"encoder": "resnet50", "encoder_weights": "imagenet"},
    },
    "efficientnetb0-unet": {
        "description": "UNet decoder on an ImageNet EfficientNetB0 encoder: small and accurate",
        "config": {"encoder": "efficientnetb0", "encoder_weights": "imagenet"},
    },
    "convnext-tiny-unet": {
        "description": "UNet decoder on an ImageNet ConvNeXt-Tiny encoder",
        "config": {"encoder": "convnext_tiny", "encoder_weights": "imagenet"},
    },
}


def names() -> list[str]:
    """The preset names, in the order of :data:`PRESETS`."""
    return list(PRESETS)


def describe() -> str:
    """One line per preset: its name and what it is for."""
    width = max(map(len, PRESETS))
    return "\n".join(f"{n.ljust(width)}  {p['description']}" for n, p in PRESETS.items())


def config(name, **overrides) -> dict:
    """The :class:`kunet.UNet` arguments of preset ``name`` with ``overrides`` applied. An unknown
    name raises ValueError listing the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are: {', '.join(PRESETS)}")
    return {**PRESETS[name]["config"], **overrides}
