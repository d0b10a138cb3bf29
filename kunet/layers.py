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

    Images (N, H, W, C) or volumes (N, D, H, W, C): the sublayers (``conv1``, ``bn1``, ``conv2``,
    ``bn2``; ``Conv2D`` or ``Conv3D``) are made by ``build``, for the input's rank. The fast paths
    are 2D; a volume takes the Keras sublayers (:func:`kunet.explain` says so).

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
        self.spatial_dims = 2  # set by build from the input's rank: 2 (images) or 3 (volumes)

    def build(self, input_shape):
        several = bool(input_shape) and isinstance(input_shape[0], (list, tuple))
        self._parts = len(input_shape) if several else 1
        input_shape = _concatenated_shape(input_shape)
        self.spatial_dims = len(input_shape) - 2
        conv_class = keras.layers.Conv2D if self.spatial_dims == 2 else keras.layers.Conv3D

        def conv(name):
            return conv_class(
                self.filters,
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


def conv_layer(spatial_dims, *args, **kwargs):
    """A convolution of the input's rank: :class:`Conv2D` (which has fast paths) for images,
    ``keras.layers.Conv3D`` for volumes."""
    return (Conv2D if spatial_dims == 2 else keras.layers.Conv3D)(*args, **kwargs)


@keras.saving.register_keras_serializable(_PACKAGE)
class ResidualDoubleConv(keras.layers.Layer):
    """A :class:`DoubleConv` with a shortcut: ``DoubleConv(x) + shortcut(x)``.

    The shortcut is ``x`` itself when it has ``filters`` channels, else a 1x1 convolution (+
    BatchNormalization) of it (the projection shortcut of He et al. 2016). The sum is taken after
    the DoubleConv's second ReLU, so the DoubleConv inside keeps its fast paths (fused Triton,
    torch, TensorFlow). Like DoubleConv, it takes a list of inputs (a decoder's ``[skip, up]``) as
    their channel concatenation, and images or volumes.

    Args:
        filters: output channels.
        batch_norm, bn_momentum, fused, kernel_initializer, kernel_regularizer: as :class:`DoubleConv`.

    Example:
        >>> ResidualDoubleConv(32)(keras.ops.ones((2, 64, 64, 3)))   # (2, 64, 64, 32)
    """

    def __init__(self, filters, batch_norm=True, bn_momentum=0.99, fused=None,
                 kernel_initializer="he_normal", kernel_regularizer=None, **kwargs):  # fmt: skip
        _check_kwargs(self, kwargs)
        super().__init__(**kwargs)
        self.double_conv = DoubleConv(
            filters, batch_norm=batch_norm, bn_momentum=bn_momentum, fused=fused,
            kernel_initializer=kernel_initializer, kernel_regularizer=kernel_regularizer,
            dtype=self.dtype_policy, name="double_conv",
        )  # fmt: skip
        self.filters = self.double_conv.filters
        self.batch_norm = self.double_conv.batch_norm
        self.bn_momentum = self.double_conv.bn_momentum
        self.fused = self.double_conv.fused
        self.projection = self.projection_bn = None

    def build(self, input_shape):
        shape = _concatenated_shape(input_shape, "ResidualDoubleConv")
        self.double_conv.build(input_shape)
        if shape[-1] != self.filters:
            self.projection = conv_layer(
                len(shape) - 2, self.filters, 1, use_bias=not self.batch_norm,
                kernel_initializer=self.double_conv.kernel_initializer,
                kernel_regularizer=self.double_conv.kernel_regularizer,
                dtype=self.dtype_policy, name="projection",
            )  # fmt: skip
            self.projection.build(shape)
            if self.batch_norm:
                self.projection_bn = keras.layers.BatchNormalization(
                    momentum=self.bn_momentum, dtype=self.dtype_policy, name="projection_bn"
                )
                self.projection_bn.build(shape[:-1] + (self.filters,))

    def call(self, inputs, training=None):
        y = self.double_conv(inputs, training=training)
        parts = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        shortcut = _concatenated(parts)
        if self.projection is not None:
            shortcut = self.projection(shortcut)
            if self.projection_bn is not None:
                shortcut = self.projection_bn(shortcut, training=training)
        return y + ops.cast(shortcut, y.dtype)

    def compute_output_shape(self, input_shape):
        return _concatenated_shape(input_shape, "ResidualDoubleConv")[:-1] + (self.filters,)

    def get_config(self):
        inner = self.double_conv.get_config()
        config = super().get_config()
        config.update(
            {
                k: inner[k]
                for k in (
                    "filters",
                    "batch_norm",
                    "bn_momentum",
                    "kernel_initializer",
                    "kernel_regularizer",
                )
            }  # fmt: skip
        )
        return config


@keras.saving.register_keras_serializable(_PACKAGE)
class AttentionGate(keras.layers.Layer):
    """The additive attention gate of Attention U-Net (Oktay et al. 2018) on a skip connection.

    Called on ``[skip, gate]``: ``skip * sigmoid(psi(relu(theta(skip) + phi(gate))))``, where
    ``theta``, ``phi`` (to ``inter_channels``) and ``psi`` (to one channel) are 1x1 convolutions. The
    gate is the decoder's up-sampled tensor, so it is on the skip's grid (the paper computes the
    gate on the coarser grid and resamples the coefficients: the same idea, one resampling fewer).
    The coefficients, in [0, 1] per pixel, say where the decoder looks.

    Args:
        inter_channels: channels of the intermediate map (default: half the skip's, at least 1).

    Example:
        >>> gated = AttentionGate()([skip, up])   # skip's shape
    """

    def __init__(self, inter_channels=None, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(**kwargs)
        if inter_channels is not None and (
            isinstance(inter_channels, bool) or not isinstance(inter_channels, int)
            or inter_channels < 1
        ):  # fmt: skip
            raise ValueError(
                f"AttentionGate: inter_channels must be None or a positive int; got {inter_channels!r}"
            )
        self.inter_channels = inter_channels

    def build(self, input_shape):
        if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2
                and isinstance(input_shape[0], (list, tuple))):  # fmt: skip
            raise ValueError(
                f"AttentionGate is called on [skip, gate]; got input shape {input_shape}"
            )
        skip, gate = (tuple(s) for s in input_shape)
        if len(skip) != len(gate) or len(skip) not in (4, 5) or None in (skip[-1], gate[-1]):
            raise ValueError(
                "AttentionGate needs a skip and a gate of one rank (4D images or 5D volumes) with "
                f"known channels; got shapes {skip} and {gate}"
            )
        dims = len(skip) - 2
        inter = self.inter_channels or max(1, skip[-1] // 2)
        conv = lambda filters, name, bias: conv_layer(  # noqa: E731
            dims, filters, 1, use_bias=bias, dtype=self.dtype_policy, name=name
        )
        self.theta = conv(inter, "theta", False)
        self.phi = conv(inter, "phi", True)
        self.psi = conv(1, "psi", True)
        self.theta.build(skip)
        self.phi.build(gate)
        self.psi.build(skip[:-1] + (inter,))

    def coefficients(self, inputs):
        """The attention coefficients (N, ..., 1) in [0, 1] of ``[skip, gate]``."""
        skip, gate = inputs
        return ops.sigmoid(self.psi(ops.relu(self.theta(skip) + self.phi(gate))))

    def call(self, inputs):
        return inputs[0] * self.coefficients(inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "inter_channels": self.inter_channels}


def _concatenated_shape(input_shape, layer="DoubleConv"):
    """The shape of a DoubleConv input, or of the channel concatenation of a list of inputs."""
    several = bool(input_shape) and isinstance(input_shape[0], (list, tuple))
    shapes = [tuple(s) for s in input_shape] if several else [tuple(input_shape)]
    for s in shapes:
        if len(s) not in (4, 5) or s[-1] is None or len(s) != len(shapes[0]):
            raise ValueError(
                f"{layer} needs 4D (N, H, W, C) images or 5D (N, D, H, W, C) volumes with a known "
                f"channel count (last axis), all of one rank; got input shapes {shapes}"
            )
    for s in shapes[1:]:
        if any(
            a is not None and b is not None and a != b
            for a, b in zip(s[:-1], shapes[0][:-1], strict=True)
        ):
            raise ValueError(
                f"{layer} concatenates its inputs along channels, so their other axes must "
                f"match; got input shapes {shapes}"
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
    """Zero-pad the spatial axes (H, W; or D, H, W) centred, up to the next multiple of ``multiple``.

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
        pads = centred_padding(ops.shape(inputs)[1:-1], self.multiple)
        if all(isinstance(p, int) and p == 0 for pair in pads for p in pair):
            return inputs  # known sizes that need no padding: skip the copy
        if keras.backend.backend() == "jax" and not all(
            isinstance(d, int) for d in ops.shape(inputs)[1:-1]
        ):
            return _pad_by_update(inputs, pads)
        if len(pads) == 3:
            return _pad_by_concatenation(inputs, pads)
        return ops.pad(inputs, [[0, 0], *pads, [0, 0]])

    def compute_output_shape(self, input_shape):
        def up(d):
            return None if d is None else -(-d // self.multiple) * self.multiple

        return (input_shape[0], *(up(d) for d in input_shape[1:-1]), input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple}


def centred_padding(sizes, multiple) -> list:
    """``[before, after]`` per axis of ``sizes`` (ints, or tensors for unknown sizes) that pads
    each up to the next multiple of ``multiple``, centred (the extra one after): what
    :class:`PadToMultiple` adds inside the graph, and what deep supervision pads its masks by."""
    # written as "the next multiple minus the size" so that, on a symbolic size (JAX export), the
    # padded size reads multiple * ceil(d / multiple), which the shape checker can halve depth times
    pads = [(d + multiple - 1) // multiple * multiple - d for d in sizes]
    return [[p // 2, p - p // 2] for p in pads]


def _pad_by_concatenation(x, pads):
    """``x`` zero-padded by ``pads`` (``[before, after]`` per spatial axis), as concatenations with
    zeros.

    For volumes: TensorFlow's oneDNN graph rewrite fuses a ``Pad`` into the ``Conv3D`` it feeds and
    then loses the convolution's own "same" padding (the output comes out 2 voxels short per axis),
    which a concatenation does not trigger (tests/test_family.py runs odd-sized volumes through a
    traced step)."""
    for axis, pair in enumerate(pads, start=1):
        if all(isinstance(p, int) and p == 0 for p in pair):
            continue
        shape = list(ops.shape(x))
        pieces = []
        for size in pair:
            shape[axis] = size
            pieces.append(ops.zeros(shape, dtype=x.dtype))
        x = ops.concatenate([pieces[0], x, pieces[1]], axis=axis)
    return x


def _pad_by_update(x, pads):
    """``x`` written into zeros of the padded shape at offset ``before``: padding by sizes that are
    symbolic (JAX export with dynamic H, W), which ``jnp.pad`` and ONNX's Pad need as constants."""
    shape = ops.shape(x)
    padded = [
        shape[0],
        *(d + before + after for d, (before, after) in zip(shape[1:-1], pads, strict=True)),
    ]
    zeros = ops.zeros((*padded, shape[-1]), dtype=x.dtype)
    return ops.slice_update(zeros, [0, *(before for before, _ in pads), 0], x)


@keras.saving.register_keras_serializable(_PACKAGE)
class CropLike(keras.layers.Layer):
    """Centre-crop the first input's spatial axes to those of the second (the undo of PadToMultiple)."""

    def __init__(self, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(**kwargs)

    def call(self, inputs):
        x, reference = inputs
        shape, ref = ops.shape(x), ops.shape(reference)
        sizes, wanted = shape[1:-1], ref[1:-1]
        if all(isinstance(d, int) for d in (*sizes, *wanted)) and tuple(sizes) == tuple(wanted):
            return x  # nothing was padded
        starts = [(d - r) // 2 for d, r in zip(sizes, wanted, strict=True)]
        return ops.slice(x, [0, *starts, 0], [shape[0], *wanted, shape[-1]])

    def compute_output_shape(self, input_shapes):
        x, reference = input_shapes
        return (x[0], *reference[1:-1], x[-1])


class _LinearUpSampling(keras.layers.Layer):
    """Linear 2x up-sampling of every spatial axis (half-pixel centres, edge clamped), on dynamic
    sizes: each output pixel is 3/4 of its source pixel plus 1/4 of the neighbour on its side."""

    spatial_dims: int

    def __init__(self, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(**kwargs)

    def build(self, input_shape):
        if len(input_shape) != self.spatial_dims + 2:
            raise ValueError(
                f"{type(self).__name__} takes {self.spatial_dims + 2}D inputs; got input shape "
                f"{tuple(input_shape)}"
            )

    def call(self, inputs):
        for axis in range(1, self.spatial_dims + 1):
            inputs = _upsample_axis(inputs, axis)
        return inputs

    def compute_output_shape(self, input_shape):
        return (
            input_shape[0],
            *(None if d is None else 2 * d for d in input_shape[1:-1]),
            input_shape[-1],
        )


@keras.saving.register_keras_serializable(_PACKAGE)
class BilinearUpSampling2D(_LinearUpSampling):
    """Bilinear 2x up-sampling of H and W that works on dynamic sizes.

    Numerically the same as ``keras.layers.UpSampling2D(2, interpolation="bilinear")``, which on
    TensorFlow fails in graph mode when H and W are unknown (``ops.image.resize`` tests the size in
    Python).
    """

    spatial_dims = 2


@keras.saving.register_keras_serializable(_PACKAGE)
class TrilinearUpSampling3D(_LinearUpSampling):
    """Trilinear 2x up-sampling of D, H and W (what ``BilinearUpSampling2D`` does, on volumes);
    Keras' ``UpSampling3D`` only repeats voxels."""

    spatial_dims = 3


def _upsample_axis(x, axis):
    rank = len(x.shape)

    def take(start, stop):
        index = [slice(None)] * rank
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    previous = ops.concatenate([take(None, 1), take(None, -1)], axis=axis)  # x[i-1], clamped
    following = ops.concatenate([take(1, None), take(-1, None)], axis=axis)  # x[i+1], clamped
    even = 0.75 * x + 0.25 * previous
    odd = 0.75 * x + 0.25 * following
    shape = ops.shape(x)
    new_shape = [-1, *shape[1:]]
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
    """2x2 max-pooling with stride 2 (``keras.layers.MaxPooling2D(2)``, no variables); 2x2x2 on
    volumes (``MaxPooling3D(2)``).

    Implementations (:func:`kunet.explain` says which runs): on torch a channels_last view pooled
    directly (``F.max_pool2d``, where Keras' own layer copies the tensor to NCHW and back); on JAX a
    max over a reshape (a faster backward on XLA:CPU); elsewhere Keras' ``ops.max_pool``.
    """

    dispatch_type = "MaxPool2x"

    def __init__(self, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(**kwargs)
        self.spatial_dims = 2  # set by build: 2 (images) or 3 (volumes: Keras' path only)

    def build(self, input_shape):
        self.spatial_dims = len(input_shape) - 2

    def compute_output_shape(self, input_shape):
        return (
            input_shape[0],
            *(None if d is None else d // 2 for d in input_shape[1:-1]),
            input_shape[-1],
        )


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
        return block_transpose_reason(self)


@keras.saving.register_keras_serializable(_PACKAGE)
class Conv3DTranspose(_Dispatched, keras.layers.Conv3DTranspose):
    """``keras.layers.Conv3DTranspose`` (same arguments, variables and config) for volumes.

    A kernel equal to its strides with ``"valid"`` padding (the 3D U-Net's 2x2x2 up-convolution) runs
    on JAX as a matrix product and a depth-to-space reshape
    (:func:`kunet.conv_bn_math.block_transpose`), as the 2D one does (XLA:CPU's transposed
    convolution is slower: benchmarks/README.md). Elsewhere it is Keras' layer.
    """

    dispatch_type = "Conv3DTranspose"
    spatial_dims = 3

    def __init__(self, *args, **kwargs):
        _check_kwargs(self, kwargs)
        super().__init__(*args, **kwargs)

    def block_transpose_reason(self) -> str | None:
        """Why this is not the block form (kernel == strides, "valid") the fast paths take, or None."""
        return block_transpose_reason(self)


def block_transpose_reason(layer) -> str | None:
    """Why the transposed convolution ``layer`` is not the block form (kernel == strides,
    "valid") that :func:`kunet.conv_bn_math.block_transpose` computes, or None."""
    if tuple(layer.kernel_size) != tuple(layer.strides):
        return f"kernel_size {tuple(layer.kernel_size)} != strides {tuple(layer.strides)}"
    if layer.padding != "valid":
        return f"padding={layer.padding!r}"
    if layer.output_padding is not None:
        return f"output_padding={layer.output_padding}"
    return plain_conv_reason(layer)


# ---------------------------------------------------------------------------------- references
def activated(layer, y):
    """``y`` through ``layer``'s activation, as Keras' convolution layers end their ``call``."""
    return y if layer.activation is None else layer.activation(y)


@dispatch.register(
    "DoubleConv", dispatch.REFERENCE, rank=100, description="Keras sublayers", spatial_dims=(2, 3)
)
def _double_conv_reference(steps, parts, training, sublayers):
    return sublayers(parts, training)


@dispatch.register(
    "MaxPool2x", dispatch.REFERENCE, rank=100, description="ops.max_pool", spatial_dims=(2, 3)
)
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


@dispatch.register(
    "Conv3DTranspose",
    dispatch.REFERENCE,
    rank=100,
    description="keras.layers.Conv3DTranspose",
    spatial_dims=(3,),
)
def _conv3d_transpose_reference(layer, x):
    return keras.layers.Conv3DTranspose.call(layer, x)
