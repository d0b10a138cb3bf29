"""Pretrained encoders for :class:`kunet.UNet`: ``keras.applications`` networks, tapped at every
output stride for the decoder's skips.

``kunet.UNet(encoder="resnet50")`` builds the network from ``keras.applications`` (part of Keras: no
new dependency, every backend), with ImageNet weights by default, applies the network's own input
preprocessing inside the model, and builds the decoder from kunet's blocks on its features at output
strides 2, 4, 8 and 16 (and 1 where the network has full-resolution features: VGG) below the
deepest, stride 32. MobileNetV3 is not offered: its layers are named by a global counter, so a tap
cannot be named. Images go in as RGB in 0..255, like the ``keras.applications`` networks take
them; the padding to a multiple of 32 happens after the preprocessing (so it is zero in the
network's own input scale).

The taps are the last layer at each stride (the features just before the next down-sampling),
listed per network in :data:`ENCODERS` (ConvNeXt has no stride-2 features: its decoder's stride-2
stage has no skip); ``tests/test_family.py`` checks that each tap is at its stride.
"""

from __future__ import annotations

import os

import keras
from keras import ops

STRIDES = (16, 8, 4, 2, 1)  # the decoder's stages, deepest first (the encoder's last is stride 32)
DECODER_FILTERS = (256, 128, 64, 32, 16)


def _taps(*names, full=None):
    """{output stride: layer name} for the names at strides 2, 4, 8, 16, 32 (None: no such layer)
    and, where the network has full-resolution features, ``full`` at stride 1."""
    taps = {s: n for s, n in zip((2, 4, 8, 16, 32), names, strict=True) if n is not None}
    return {**taps, 1: full} if full else taps


def _resnet(conv3, conv4):
    return _taps("conv1_relu", "conv2_block3_out", f"conv3_block{conv3}_out",
                 f"conv4_block{conv4}_out", "conv5_block3_out")  # fmt: skip


def _resnet_v2(conv3, conv4):
    return _taps("conv1_conv", "conv2_block3_1_relu", f"conv3_block{conv3}_1_relu",
                 f"conv4_block{conv4}_1_relu", "post_relu")  # fmt: skip


def _efficientnet_v2(s2, s4):
    return _taps(s2, s4, "block4a_expand_activation", "block6a_expand_activation",
                 "top_activation")  # fmt: skip


def _convnext(name, stage2_blocks):
    return _taps(None, *(f"{name}_stage_{i}_block_{b - 1}_identity"
                         for i, b in enumerate((3, 3, stage2_blocks, 3))))  # fmt: skip


_DENSENET = _taps("conv1_relu", "pool2_conv", "pool3_conv", "pool4_conv", "relu")
_EFFICIENTNET = _taps("block2a_expand_activation", "block3a_expand_activation",
                      "block4a_expand_activation", "block6a_expand_activation", "top_activation")  # fmt: skip

# name -> (keras.applications attribute, input preprocessing, {output stride: tapped layer}).
# "none": the network preprocesses its input itself (EfficientNet, EfficientNetV2, ConvNeXt).
ENCODERS: dict[str, tuple] = {
    "resnet50": ("ResNet50", "caffe", _resnet(4, 6)),
    "resnet101": ("ResNet101", "caffe", _resnet(4, 23)),
    "resnet152": ("ResNet152", "caffe", _resnet(8, 36)),
    "resnet50v2": ("ResNet50V2", "tf", _resnet_v2(4, 6)),
    "resnet101v2": ("ResNet101V2", "tf", _resnet_v2(4, 23)),
    "resnet152v2": ("ResNet152V2", "tf", _resnet_v2(8, 36)),
    "vgg16": (
        "VGG16",
        "caffe",
        _taps(
            "block2_conv2",
            "block3_conv3",
            "block4_conv3",
            "block5_conv3",
            "block5_pool",
            full="block1_conv2",
        ),
    ),  # fmt: skip
    "vgg19": (
        "VGG19",
        "caffe",
        _taps(
            "block2_conv2",
            "block3_conv4",
            "block4_conv4",
            "block5_conv4",
            "block5_pool",
            full="block1_conv2",
        ),
    ),  # fmt: skip
    "densenet121": ("DenseNet121", "torch", _DENSENET),
    "densenet169": ("DenseNet169", "torch", _DENSENET),
    "densenet201": ("DenseNet201", "torch", _DENSENET),
    "mobilenetv2": (
        "MobileNetV2",
        "tf",
        _taps(
            "block_1_expand_relu",
            "block_3_expand_relu",
            "block_6_expand_relu",
            "block_13_expand_relu",
            "out_relu",
        ),
    ),  # fmt: skip
    **{f"efficientnetb{i}": (f"EfficientNetB{i}", "none", _EFFICIENTNET) for i in range(8)},
    "efficientnetv2b0": (
        "EfficientNetV2B0",
        "none",
        _efficientnet_v2("block1a_project_activation", "block2b_add"),
    ),
    "efficientnetv2s": ("EfficientNetV2S", "none", _efficientnet_v2("block1b_add", "block2d_add")),
    "efficientnetv2m": ("EfficientNetV2M", "none", _efficientnet_v2("block1c_add", "block2e_add")),
    "convnext_tiny": ("ConvNeXtTiny", "none", _convnext("convnext_tiny", 9)),
    "convnext_small": ("ConvNeXtSmall", "none", _convnext("convnext_small", 27)),
    "convnext_base": ("ConvNeXtBase", "none", _convnext("convnext_base", 27)),
    "convnext_large": ("ConvNeXtLarge", "none", _convnext("convnext_large", 27)),
}

_MEAN = {"caffe": (103.939, 116.779, 123.68), "torch": (0.485, 0.456, 0.406)}
_STD = {"torch": (0.229, 0.224, 0.225)}


def names() -> list[str]:
    """The encoder names ``UNet(encoder=...)`` takes."""
    return list(ENCODERS)


def check(encoder, weights, input_shape) -> None:
    """ValueError, naming the argument, for an unknown encoder, weights that are neither
    "imagenet", None nor an existing file, or a non-RGB ``input_shape``."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; the encoders are: {', '.join(ENCODERS)}")
    if weights not in ("imagenet", None) and not (
        isinstance(weights, (str, os.PathLike)) and os.path.isfile(weights)
    ):
        raise ValueError(
            f"encoder_weights must be 'imagenet', None or the path of a weights file of "
            f"{encoder}; got {weights!r} (no such file)"
        )
    if input_shape[-1] != 3:
        raise ValueError(
            f"encoder={encoder!r} takes RGB images: input_shape must end in 3 channels; got "
            f"input_shape={tuple(input_shape)} (repeat a grey channel: kunet.io.to_channels(x, 3))"
        )


@keras.saving.register_keras_serializable("kunet.encoders")
class ImageNetPreprocessing(keras.layers.Layer):
    """The input preprocessing of a ``keras.applications`` network, inside the model, on RGB images
    in 0..255: ``"caffe"`` (BGR, ImageNet mean subtracted: ResNet, VGG), ``"tf"`` (to [-1, 1]:
    ResNetV2, MobileNetV2), ``"torch"`` (to [0, 1], ImageNet mean and std: DenseNet)."""

    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "torch"):
            raise ValueError(f"mode must be 'caffe', 'tf' or 'torch'; got {mode!r}")
        self.mode = mode

    def call(self, x):
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_MEAN["caffe"], dtype=x.dtype)
        mean = ops.convert_to_tensor(_MEAN["torch"], dtype=x.dtype)
        return (x / 255.0 - mean) / ops.convert_to_tensor(_STD["torch"], dtype=x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def backbone(encoder, weights=None):
    """The ``keras.applications`` network ``encoder`` without its top, any input size."""
    attribute, _, _ = ENCODERS[encoder]
    return getattr(keras.applications, attribute)(
        include_top=False, weights=weights, input_shape=(None, None, 3)
    )


def features(inputs, encoder, weights="imagenet", freeze=False):
    """The encoder's features of ``inputs`` (RGB images in 0..255, any size): ``({stride: tensor},
    32)``, strides 2 to 32 (and 1 for VGG), the input padded to a multiple of 32 first."""
    from kunet.layers import PadToMultiple

    _, mode, taps = ENCODERS[encoder]
    x = inputs if mode == "none" else ImageNetPreprocessing(mode, name="preprocessing")(inputs)
    x = PadToMultiple(32, name="pad")(x)
    network = backbone(encoder, weights)
    strides = sorted(taps)
    extractor = keras.Model(
        network.input, [network.get_layer(taps[s]).output for s in strides], name="encoder"
    )
    extractor.trainable = not freeze
    outputs = extractor(x)
    return dict(zip(strides, outputs, strict=True)), 32
