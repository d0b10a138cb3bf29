"""Layers that make up a kunet UNet.

``DoubleConv`` is the UNet's workhorse (Conv3x3 -> BN -> ReLU, twice). Its variables are exactly those of
its plain ``Conv2D`` and ``BatchNormalization`` sublayers, whichever path (plain or fused Triton) runs it,
so checkpoints move freely between the two paths and between backends.

``Conv2D`` and ``Conv2DTranspose`` are Keras' layers (same arguments, variables and configs) and
``MaxPool2x`` is ``MaxPooling2D(2)``, with faster paths on the backends where Keras' own ones were
measured slow (layout copies on torch, XLA:CPU's transposed-convolution and pooling backward passes
on JAX); see ``benchmarks/``.

Which path runs is decided in one place, :mod:`kunet.dispatch`: each of these layers asks it once
per call (the answer is cached per context) and runs the implementation it names. The Keras layers
themselves are registered here as each layer type's reference implementation.
"""

from __future__ import annotations

import keras
from keras import ops

from kunet import conv_bn_math as cbm
from kunet import dispatch
from kunet._args import check_kwargs

_PACKAGE = "kunet.layers"


def _check_kwargs(layer, kwargs):
    """``TypeError`` for a keyword that neither ``layer``'s class nor ``keras.layers.Layer`` takes.

    Besides its signature, ``keras.layers.Layer`` reads the legacy ``input_shape`` / ``input_dim``
    from its ``**kwargs``; Keras 2's other legacy keywords go on to Keras, which judges them.
    """
    check_kwargs(
        layer,
        kwargs,
        keras.layers.Layer,
        also=("input_shape", "input_dim"),
        defer=("batch_size", "batch_input_shape", "weights"),
    )


@keras.saving.register_keras_serializable(_PACKAGE)
class DoubleConv(keras.layers.Layer):
    """Conv3x3 -> BatchNorm -> ReLU, twice (the UNet "double convolution").

    The convolutions have no bias when batch normalization follows them (the BN shift replaces it).

    Called on a list of tensors (a decoder's ``[skip, upsampled]``), it convolves their concatenation
    along channels, computed without the concatenation where that is faster: the first convolution's
    kernel is split by input channels and the per-part convolutions are summed (the same sum of
    products), which saves the copy into the concatenated tensor and, in training, the slicing of its
    gradient (benchmarks/README.md). The variables are those of a single-tensor input with the total
    number of channels.

    Args:
        filters: output channels of both convolutions.
        batch_norm: put a ``BatchNormalization`` after each convolution (default True).
        bn_momentum: momentum of the BatchNormalization moving statistics (Keras' default 0.99;
            0.9 suits short runs on small data, where 0.99 leaves the inference statistics lagging).
        fused: ``None`` (follow :func:`kunet.set_fused`, default ``"auto"``), ``True`` (require the
            fused Triton kernel; raise if it cannot run) or ``False`` (always plain layers).
            ``fused`` is an execution choice, not part of the model, so it is not saved in the config:
            a model saved from a fused run loads anywhere and follows the loading process's policy.
        kernel_initializer: initializer of both convolution kernels (default ``"he_normal"``).
        kernel_regularizer: optional regularizer of both convolution kernels.
        **kwargs: standard ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).

    Example:
        >>> layer = DoubleConv(32)
        >>> y = layer(keras.ops.ones((2, 64, 64, 3)))   # (2, 64, 64, 32)
        >>> DoubleConv(16)([skip, up])   # == DoubleConv(16)(concatenate([skip, up], axis=-1))
    """

    dispatch_type = "DoubleConv"

    def __init__(
        self,
        filters,
        batch_norm=True,
        bn_momentum=0.99,
        fused=None,
        kernel_initializer="he_normal",
        kernel_regularizer=None,
        **kwargs,
    ):
        _check_kwargs(self, kwargs)
        super().__init__(**kwargs)
        if not isinstance(filters, int) or isinstance(filters, bool) or filters < 1:
            raise ValueError(f"DoubleConv: filters must be a positive int; got {filters!r}")
        self.filters = filters
        self.batch_norm = bool(batch_norm)
        if not 0.0 <= float(bn_momentum) < 1.0:
            raise ValueError(f"DoubleConv: bn_momentum must be in [0, 1); got {bn_momentum!r}")
        self.bn_momentum = float(bn_momentum)
        self.fused = dispatch.validate_policy(fused, name="DoubleConv(fused=...)")
        self._parts = 1
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

        def conv(name):
            return keras.layers.Conv2D(
                filters,
                3,
                padding="same",
                use_bias=not self.batch_norm,
                kernel_initializer=self.kernel_initializer,
                kernel_regularizer=self.kernel_regularizer,
                dtype=self.dtype_policy,
                name=name,
            )

        self.conv1 = conv("conv1")
        self.conv2 = conv("conv2")
        if self.batch_norm:
            self.bn1, self.bn2 = (
                keras.layers.BatchNormalization(
                    momentum=self.bn_momentum, dtype=self.dtype_policy, name=name
                )
                for name in ("bn1", "bn2")
            )
        else:
            self.bn1 = self.bn2 = None
        # plain references, kept out of Keras' tracking: on torch an nn.Module attribute lookup
        # costs about a microsecond, and these are read on every call
        self.__dict__["_pairs"] = ((self.conv1, self.bn1), (self.conv2, self.bn2))
        self.__dict__["_bns"] = tuple(bn for bn in (self.bn1, self.bn2) if bn is not None)

    def build(self, input_shape):
        several = bool(input_shape) and isinstance(input_shape[0], (list, tuple))
        self._parts = len(input_shape) if several else 1
        input_shape = _concatenated_shape(input_shape)
        mid_shape = input_shape[:-1] + (self.filters,)
        self.conv1.build(input_shape)
        self.conv2.build(mid_shape)
        if self.batch_norm:
            self.bn1.build(mid_shape)
            self.bn2.build(mid_shape)

    def call(self, inputs, training=None):
        parts = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        training = bool(training)
        impl = dispatch.choose(self, self.dispatch_context(parts[0], training, len(parts)))
        return impl.forward(self._steps(training), parts, training, self.call_sublayers)

    @property
    def implementation(self) -> dict:
        """The implementation this layer ran at its latest call, per mode, e.g. ``{"training":
        "torch", "inference": "torch"}`` (:func:`kunet.dispatch.implementation`)."""
        return dispatch.implementation(self)

    def dispatch_context(self, x, training, parts=None):
        """The :class:`kunet.dispatch.Context` of a call on ``x`` (the first input)."""
        frozen = tuple(not bn.trainable for bn in self._bns)
        parts = parts or self._parts
        return dispatch.context(self, x, training, parts=parts, frozen=frozen, fused=True)

    def _steps(self, training):
        """The two convolutions and their BatchNormalizations as variables and numbers
        (:class:`kunet.conv_bn_math.ConvBN`), what the implementations read; built once per state
        (the variables themselves stay the same objects)."""
        key = (training,) + tuple((bn.trainable, bn.momentum, bn.epsilon) for bn in self._bns)
        cache = self.__dict__.setdefault("_steps_cache", {})
        steps = cache.get(key)
        if steps is None:
            steps = cache[key] = tuple(
                cbm.ConvBN(
                    conv.kernel, conv.bias if conv.use_bias else None, _bn_params(bn, training)
                )
                for conv, bn in self._pairs
            )
        return steps

    def call_sublayers(self, inputs, training=None, first_conv=None):
        """The reference path: the Keras ``Conv2D`` / ``BatchNormalization`` sublayers in turn.

        A list of inputs is concatenated along channels, unless ``first_conv(conv, parts)`` computes
        the first convolution of the parts (e.g. part by part: ``kunet.backends.jax_ops``).
        """
        parts = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]

        def bn_relu(bn, x):
            return ops.relu(x if bn is None else bn(x, training=training))

        if first_conv is not None:
            x = first_conv(self.conv1, parts)
        else:
            x = self.conv1(_concatenated(parts))
        x = bn_relu(self.bn1, x)
        return bn_relu(self.bn2, self.conv2(x))

    def compute_output_shape(self, input_shape):
        return _concatenated_shape(input_shape)[:-1] + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "batch_norm": self.batch_norm,
                "bn_momentum": self.bn_momentum,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            }
        )
        return config


def _concatenated_shape(input_shape):
    """The shape of a DoubleConv input, or of the channel concatenation of a list of inputs."""
    several = bool(input_shape) and isinstance(input_shape[0], (list, tuple))
    shapes = [tuple(s) for s in input_shape] if several else [tuple(input_shape)]
    for s in shapes:
        if len(s) != 4 or s[-1] is None:
            raise ValueError(
                "DoubleConv needs 4D (N, H, W, C) inputs with a known channel count (last axis); "
                f"got input shape {s}"
            )
    for s in shapes[1:]:
        if any(
            a is not None and b is not None and a != b
            for a, b in zip(s[:3], shapes[0][:3], strict=True)
        ):
            raise ValueError(
                "DoubleConv concatenates its inputs along channels, so their N, H and W must match; "
                f"got input shapes {shapes}"
            )
    return shapes[0][:-1] + (sum(s[-1] for s in shapes),)


def _concatenated(parts):
    """The channel concatenation of ``parts`` (the tensor itself when there is one)."""
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)


def _bn_params(bn, training):
    if bn is None:
        return None
    return cbm.BatchNormParams(
        bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance, float(bn.momentum),
        float(bn.epsilon), batch_statistics=training and bn.trainable,
    )  # fmt: skip


def unusual_batch_norm(layer) -> str | None:
    """Why ``layer``'s (a DoubleConv) BatchNormalizations are not the kind the fast paths implement
    (without center/scale, with renorm, synchronized across replicas), or None."""
    for bn in (layer.bn1, layer.bn2):
        if bn is None:
            continue
        for option, unusual in (("center", not bn.center), ("scale", not bn.scale),
                                ("renorm", getattr(bn, "renorm", False)),
                                ("synchronized", getattr(bn, "synchronized", False))):  # fmt: skip
            if unusual:
                return f"BatchNormalization {option}={getattr(bn, option)!r}"
    return None


def plain_conv_reason(layer) -> str | None:
    """Why the convolution ``layer``'s options are not those the fast paths implement, or None."""
    if layer.data_format != "channels_last":
        return f"data_format={layer.data_format!r}"
    if getattr(layer, "groups", 1) != 1:
        return f"groups={layer.groups}"
    if any(d != 1 for d in layer.dilation_rate):
        return f"dilation_rate={tuple(layer.dilation_rate)}"
    if getattr(layer, "lora_enabled", False):
        return "LoRA enabled"
    if getattr(layer, "quantization_mode", None) is not None:
        return f"quantized ({layer.quantization_mode})"
    return None


@keras.saving.register_keras_serializable(_PACKAGE)
class PadToMultiple(keras.layers.Layer):
    """Zero-pad H and W (centred) up to the next multiple of ``multiple``.

    Works on dynamic (``None``) spatial sizes: the padding is computed in the graph with ``keras.ops``.
    Pair it with :class:`CropLike` to bring the output back to the input's size.
    """

    def __init__(self, multiple, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(**kwargs)
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"PadToMultiple: multiple must be a positive int; got {multiple!r}")
        self.multiple = multiple

    def call(self, inputs):
        if self.multiple == 1:
            return inputs
        shape = ops.shape(inputs)
        pad_h = (self.multiple - shape[1] % self.multiple) % self.multiple
        pad_w = (self.multiple - shape[2] % self.multiple) % self.multiple
        if isinstance(pad_h, int) and isinstance(pad_w, int) and pad_h == pad_w == 0:
            return inputs  # known sizes that need no padding: skip the copy
        top, left = pad_h // 2, pad_w // 2
        return ops.pad(inputs, [[0, 0], [top, pad_h - top], [left, pad_w - left], [0, 0]])

    def compute_output_shape(self, input_shape):
        def up(d):
            return None if d is None else -(-d // self.multiple) * self.multiple

        return (input_shape[0], up(input_shape[1]), up(input_shape[2]), input_shape[3])

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple}


@keras.saving.register_keras_serializable(_PACKAGE)
class CropLike(keras.layers.Layer):
    """Centre-crop the first input's H and W to those of the second (the undo of PadToMultiple)."""

    def __init__(self, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(**kwargs)

    def call(self, inputs):
        x, reference = inputs
        shape, ref = ops.shape(x), ops.shape(reference)
        if all(isinstance(d, int) for d in (*shape[1:3], *ref[1:3])) and shape[1:3] == ref[1:3]:
            return x  # nothing was padded
        top = (shape[1] - ref[1]) // 2
        left = (shape[2] - ref[2]) // 2
        return ops.slice(x, [0, top, left, 0], [shape[0], ref[1], ref[2], shape[3]])

    def compute_output_shape(self, input_shapes):
        x, reference = input_shapes
        return (x[0], reference[1], reference[2], x[3])


@keras.saving.register_keras_serializable(_PACKAGE)
class BilinearUpSampling2D(keras.layers.Layer):
    """Bilinear 2x up-sampling (half-pixel centres, edge clamped) that works on dynamic H and W.

    Numerically the same as ``keras.layers.UpSampling2D(2, interpolation="bilinear")``, which on
    TensorFlow fails in graph mode when H and W are unknown (``ops.image.resize`` tests the size in
    Python). Each output pixel is 3/4 of its source pixel plus 1/4 of the neighbour on its side.
    """

    def __init__(self, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(**kwargs)

    def call(self, inputs):
        return _upsample_axis(_upsample_axis(inputs, 1), 2)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        return (n, None if h is None else 2 * h, None if w is None else 2 * w, c)


def _upsample_axis(x, axis):
    def take(start, stop):
        index = [slice(None)] * 4
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    previous = ops.concatenate([take(None, 1), take(None, -1)], axis=axis)  # x[i-1], clamped
    following = ops.concatenate([take(1, None), take(-1, None)], axis=axis)  # x[i+1], clamped
    even = 0.75 * x + 0.25 * previous
    odd = 0.75 * x + 0.25 * following
    shape = ops.shape(x)
    new_shape = [-1, shape[1], shape[2], shape[3]]
    new_shape[axis] = shape[axis] * 2
    return ops.reshape(ops.stack([even, odd], axis=axis + 1), new_shape)


class _Dispatched:
    """Mixin of a layer with fast paths: ``call`` runs what :mod:`kunet.dispatch` chooses."""

    dispatch_type: str

    def dispatch_context(self, x, training=None, parts=None):
        return dispatch.context(self, x)  # no training mode

    @property
    def implementation(self) -> dict:
        """The implementation this layer ran at its latest call, per mode, e.g. ``{"training":
        "torch", "inference": "torch"}`` (:func:`kunet.dispatch.implementation`)."""
        return dispatch.implementation(self)

    def call(self, inputs):
        return dispatch.choose(self, self.dispatch_context(inputs)).forward(self, inputs)


@keras.saving.register_keras_serializable(_PACKAGE)
class MaxPool2x(_Dispatched, keras.layers.Layer):
    """2x2 max-pooling with stride 2 (``keras.layers.MaxPooling2D(2)``, no variables).

    Implementations (:func:`kunet.explain` says which runs): on torch a channels_last view pooled
    directly (``F.max_pool2d``, where Keras' own layer copies the tensor to NCHW and back); on JAX a
    max over a reshape (a faster backward on XLA:CPU); elsewhere Keras' ``ops.max_pool``.
    """

    dispatch_type = "MaxPool2x"

    def __init__(self, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(**kwargs)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        return (n, None if h is None else h // 2, None if w is None else w // 2, c)


@keras.saving.register_keras_serializable(_PACKAGE)
class Conv2D(_Dispatched, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` (same arguments, variables and config) that avoids layout copies on torch.

    On the torch backend, stride 1 with ``"valid"`` padding or an odd kernel with ``"same"`` runs as
    ``F.conv2d`` on a channels_last view of the NHWC tensor, where Keras' own layer copies the tensor
    to NCHW and back. Everywhere else (and for other options) it is Keras' layer.
    """

    dispatch_type = "Conv2D"

    def __init__(self, *args, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(*args, **kwargs)


@keras.saving.register_keras_serializable(_PACKAGE)
class Conv2DTranspose(_Dispatched, keras.layers.Conv2DTranspose):
    """``keras.layers.Conv2DTranspose`` (same arguments, variables and config), faster where measured.

    A kernel equal to its strides (the UNet's 2x2 stride-2 up-convolution) with ``"valid"`` padding
    maps every input pixel to its own output block, so it is a matrix product and a depth-to-space
    reshape: on torch ``F.conv_transpose2d`` on a channels_last view (Keras' own layer copies the
    tensor to NCHW and back), on JAX that matrix product (``ops.einsum``; XLA:CPU's transposed
    convolution has a slow backward pass). Anything else, and TensorFlow, is Keras' layer.
    """

    dispatch_type = "Conv2DTranspose"

    def __init__(self, *args, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(*args, **kwargs)

    def block_transpose_reason(self) -> str | None:
        """Why this is not the block form (kernel == strides, "valid") the fast paths take, or None."""
        if tuple(self.kernel_size) != tuple(self.strides):
            return f"kernel_size {tuple(self.kernel_size)} != strides {tuple(self.strides)}"
        if self.padding != "valid":
            return f"padding={self.padding!r}"
        if self.output_padding is not None:
            return f"output_padding={self.output_padding}"
        return plain_conv_reason(self)


# ---------------------------------------------------------------------------------- references
def activated(layer, y):
    """``y`` through ``layer``'s activation, as Keras' convolution layers end their ``call``."""
    return y if layer.activation is None else layer.activation(y)


@dispatch.register("DoubleConv", dispatch.REFERENCE, rank=100, description="Keras sublayers")
def _double_conv_reference(steps, parts, training, sublayers):
    return sublayers(parts, training)


@dispatch.register("MaxPool2x", dispatch.REFERENCE, rank=100, description="ops.max_pool")
def _max_pool_reference(layer, x):
    return ops.max_pool(x, pool_size=2, strides=2, padding="valid")


@dispatch.register("Conv2D", dispatch.REFERENCE, rank=100, description="keras.layers.Conv2D")
def _conv2d_reference(layer, x):
    return keras.layers.Conv2D.call(layer, x)


@dispatch.register(
    "Conv2DTranspose", dispatch.REFERENCE, rank=100, description="keras.layers.Conv2DTranspose"
)
def _conv_transpose_reference(layer, x):
    return keras.layers.Conv2DTranspose.call(layer, x)
