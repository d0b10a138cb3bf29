"""``kunet.UNet``: the UNet as a Keras functional model that trains with ``fit`` on any backend."""

from __future__ import annotations

import contextlib
import inspect

import keras

from kunet import _validation, blocks, dispatch, io
from kunet._args import check_kwargs
from kunet.callbacks import TerminateOnNonFinite
from kunet.layers import CropLike, PadToMultiple, centred_padding

SKIPS = ("plain", "nested")
# UNet's arguments that make up its configuration (get_config), besides name/trainable
_CONFIG_KEYS = (
    "num_classes", "filters", "input_shape", "batch_norm", "upsampling", "dropout",
    "output_activation", "bn_momentum", "spatial_dims", "block", "attention", "skips",
    "deep_supervision", "encoder", "encoder_weights", "freeze_encoder", "decoder_filters",
)  # fmt: skip
DEFAULT_FILTERS = (64, 128, 256, 512)


def _positive_ints(value, name, example):
    try:
        value = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints; got {value!r}") from None
    if not value:
        raise ValueError(f"{name} must name at least one stage (e.g. {example}); got ()")
    for f in value:
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"{name} must be positive ints; got {value!r}")
    return value


def _check_config(c):
    """Check and normalise the arguments of :class:`UNet` (a dict); every error names the argument
    (and, for a combination that cannot work, both)."""
    num_classes = c["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}")
    dims = c["spatial_dims"]
    if dims is not None and dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes); got {dims!r}")
    input_shape = c["input_shape"]
    if input_shape is not None:
        try:
            input_shape = tuple(input_shape)
        except TypeError:
            raise ValueError(
                f"input_shape must be (H, W, C) or (D, H, W, C); got {input_shape!r}"
            ) from None
        if len(input_shape) not in (3, 4):
            raise ValueError(
                "input_shape must be (H, W, C) for images or (D, H, W, C) for volumes (channels "
                f"last); got {input_shape!r}"
            )
        if dims is not None and len(input_shape) != dims + 1:
            raise ValueError(
                f"input_shape={input_shape!r} has {len(input_shape) - 1} spatial axes but "
                f"spatial_dims={dims}; give (None,) * {dims} + (channels,) or leave one of the two "
                "out"
            )
        dims = len(input_shape) - 1
    dims = dims or 2
    if input_shape is None:
        input_shape = (None,) * dims + (3 if dims == 2 else 1,)
    if not isinstance(input_shape[-1], int) or input_shape[-1] < 1:
        raise ValueError(
            f"input_shape must give the number of channels as a positive int; got {input_shape!r}"
        )
    for d in input_shape[:-1]:
        if d is not None and (not isinstance(d, int) or d < 1):
            raise ValueError(
                f"input_shape's spatial sizes must be None or positive; got {input_shape!r}"
            )
    c["spatial_dims"], c["input_shape"] = dims, input_shape

    if c["block"] not in blocks.BLOCKS:
        raise ValueError(f"block must be one of {blocks.BLOCKS}; got {c['block']!r}")
    if c["skips"] not in SKIPS:
        raise ValueError(f"skips must be one of {SKIPS} ('nested': UNet++); got {c['skips']!r}")
    upsampling = c["upsampling"]
    if upsampling not in blocks.UPSAMPLING_MODES:
        raise ValueError(f"upsampling must be one of {blocks.UPSAMPLING_MODES}; got {upsampling!r}")
    linear = "bilinear" if dims == 2 else "trilinear"
    if upsampling not in ("transpose", linear):
        raise ValueError(
            f"upsampling={upsampling!r} does not go with spatial_dims={dims}: use 'transpose' or "
            f"{linear!r}"
        )
    if not 0.0 <= float(c["dropout"]) < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {c['dropout']!r}")
    if c["output_activation"] not in (None, "sigmoid", "softmax", "linear"):
        raise ValueError(
            "output_activation must be None (logits, the default for training), 'sigmoid', "
            f"'softmax' or 'linear'; got {c['output_activation']!r}"
        )
    for flag in ("attention", "deep_supervision", "freeze_encoder"):
        if not isinstance(c[flag], bool):
            raise ValueError(f"{flag} must be True or False; got {c[flag]!r}")
    if c["attention"] and c["skips"] == "nested":
        raise ValueError(
            "attention=True gates the plain skips of a UNet; skips='nested' (UNet++) has none to "
            "gate: use one of the two"
        )

    if c["encoder"] is None:
        for name, default in (("encoder_weights", "imagenet"), ("decoder_filters", None)):
            if c[name] != default and c[name] is not None:
                raise ValueError(f"{name} applies to a pretrained encoder; pass encoder=... too")
        if c["freeze_encoder"]:
            raise ValueError(
                "freeze_encoder=True applies to a pretrained encoder; pass encoder=..."
            )
        c["filters"] = _positive_ints(
            DEFAULT_FILTERS if c["filters"] is None else c["filters"], "filters", DEFAULT_FILTERS
        )
        c["encoder_weights"] = None
        c["decoder_filters"] = None
    else:
        if dims != 2:
            raise ValueError(
                f"encoder={c['encoder']!r} is a 2D ImageNet network and spatial_dims={dims}: "
                "pretrained encoders take images; build a 3D UNet without encoder="
            )
        if c["skips"] == "nested":
            raise ValueError(
                f"skips='nested' (UNet++) builds its own encoder; it does not go with "
                f"encoder={c['encoder']!r}"
            )
        if c["filters"] is not None:
            raise ValueError(
                f"filters sets the stages of kunet's own encoder; with encoder={c['encoder']!r} "
                "give the decoder's as decoder_filters=..."
            )
        from kunet import encoders

        encoders.check(c["encoder"], c["encoder_weights"], input_shape)
        c["decoder_filters"] = _positive_ints(
            encoders.DECODER_FILTERS if c["decoder_filters"] is None else c["decoder_filters"],
            "decoder_filters",
            encoders.DECODER_FILTERS,
        )
        if len(c["decoder_filters"]) != len(encoders.STRIDES):
            raise ValueError(
                f"decoder_filters needs {len(encoders.STRIDES)} stages (output strides "
                f"{encoders.STRIDES}); got {c['decoder_filters']!r}"
            )
    return c


def _build(c):
    """The functional graph of a :class:`UNet` with (checked) arguments ``c``: ``(inputs, outputs,
    supervision)``, where ``outputs`` is the main output followed by the deep-supervision outputs and
    ``supervision`` lists, per deep-supervision output, ``(downsampling factor, loss weight)``."""
    conv = {"batch_norm": c["batch_norm"], "bn_momentum": c["bn_momentum"], "fused": c["fused"],
            "block": c["block"]}  # fmt: skip
    head = dict(activation=c["output_activation"])
    inputs = keras.Input(shape=c["input_shape"], name="image")
    if c["encoder"] is not None:
        from kunet import encoders

        features, multiple = encoders.features(
            inputs, c["encoder"], c["encoder_weights"], c["freeze_encoder"]
        )
        x = features[max(features)]
        stages = []
        for stride, f in zip(encoders.STRIDES, c["decoder_filters"], strict=True):
            x = blocks.decoder_block(
                x, features.get(stride), f, upsampling=c["upsampling"],
                attention=c["attention"], name=f"decoder_s{stride}", **conv,
            )  # fmt: skip
            stages.append(x)
        stages = stages[::-1]  # full resolution first
    else:
        filters = c["filters"]
        multiple = 2 ** len(filters)
        x = PadToMultiple(multiple, name="pad")(inputs)
        skips = []
        for i, f in enumerate(filters):
            skip, x = blocks.encoder_block(x, f, name=f"encoder{i + 1}", **conv)
            skips.append(skip)
        x = blocks.bottleneck(x, 2 * filters[-1], dropout=c["dropout"], **conv)
        if c["skips"] == "nested":
            top = blocks.nested_decoder(skips + [x], filters, upsampling=c["upsampling"], **conv)
            main = blocks.segmentation_head(CropLike(name="crop")([top[-1], inputs]),
                                            c["num_classes"], **head)  # fmt: skip
            if not c["deep_supervision"]:
                return inputs, [main], []
            aux = [
                blocks.segmentation_head(
                    CropLike(name=f"crop{j}")([t, inputs]),
                    c["num_classes"],
                    name=f"head{j}",
                    **head,
                )  # fmt: skip
                for j, t in enumerate(top[:-1], start=1)
            ]
            return inputs, [main, *aux], [(1, 1.0)] * len(aux)
        stages = [None] * len(filters)
        for i in reversed(range(len(filters))):
            x = blocks.decoder_block(
                x, skips[i], filters[i], upsampling=c["upsampling"], attention=c["attention"],
                name=f"decoder{i + 1}", **conv,
            )  # fmt: skip
            stages[i] = x
    main = blocks.segmentation_head(CropLike(name="crop")([stages[0], inputs]), c["num_classes"],
                                    **head)  # fmt: skip
    if not c["deep_supervision"]:
        return inputs, [main], []
    # nnU-Net's deep supervision: a head on every lower-resolution decoder stage, its loss weighted
    # 1/2**i against masks down-sampled to its grid (the padded input's, every 2**i-th pixel)
    aux = [
        blocks.segmentation_head(stage, c["num_classes"], name=f"head_down{2**i}", **head)
        for i, stage in enumerate(stages[1:], start=1)
    ]
    return inputs, [main, *aux], [(2**i, 0.5**i) for i in range(1, len(stages))]


POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def _dtype_policy(value):
    """The policy name of ``UNet(dtype_policy=...)`` (None: the global policy's), checked."""
    if value is None:
        return keras.config.dtype_policy().name
    name = getattr(value, "name", value)
    if name in ("bfloat16", "float16"):
        raise ValueError(
            f"dtype_policy={name!r} would keep the variables (and BatchNormalization statistics) in "
            f"16 bits; use 'mixed_{name}' (16-bit compute, float32 variables)"
        )
    if name not in POLICIES:
        raise ValueError(
            f"dtype_policy must be one of {', '.join(POLICIES)} or None; got {value!r}"
        )
    return name


@contextlib.contextmanager
def _global_policy(name):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable("kunet")
class UNet(keras.Model):
    """The UNet of Ronneberger et al. (2015) with batch normalization, and its family, for 2D images
    and 3D volumes.

    Encoder stage = convolution block + 2x max-pool; bottleneck = block with twice the last filters;
    decoder stage = up-sampling + concatenation of the skip + block; 1x1 convolution head. Any size
    works: the input is zero-padded (centred) to a multiple of :attr:`size_multiple` inside the graph
    and the output cropped back, so the output always has the input's spatial size.

    The family, by argument (combine them freely, except where an error says why not;
    :func:`kunet.presets.names` lists named configurations, :meth:`from_preset` builds one):

    * ``spatial_dims=3`` (or a 4-axis ``input_shape``): the 3D U-Net (Cicek et al. 2016) for volumes
      (N, D, H, W, C): the same blocks with Conv3D, 2x2x2 pooling, Conv3DTranspose or trilinear
      up-sampling.
    * ``block="residual"``: each block adds a shortcut (:class:`kunet.layers.ResidualDoubleConv`).
    * ``attention=True``: Attention U-Net (Oktay et al. 2018), each skip gated by an
      :class:`kunet.layers.AttentionGate`.
    * ``skips="nested"``: UNet++ (Zhou et al. 2018), nested dense skip pathways.
    * ``deep_supervision=True``: extra heads on the lower decoder stages (UNet++: on every top-row
      node), trained against down-sampled masks with weights 1/2**i (nnU-Net); used in training
      only: ``predict``, ``evaluate``, saving and export see the one full-resolution output.
    * ``encoder="resnet50"`` (see :mod:`kunet.encoders`): a ``keras.applications`` network as the
      encoder, ImageNet weights by default, its preprocessing inside the model (images in 0..255).

    The model is compiled with defaults at construction, so ``UNet(...).fit(data)`` trains at once:
    Adam(1e-3); ``num_classes=1``: binary cross-entropy (from logits) + Dice with float masks of shape
    (N, *spatial) or (N, *spatial, 1) in {0, 1}; ``num_classes >= 2``: sparse categorical
    cross-entropy (from logits) + Dice with integer masks; metrics :class:`kunet.metrics.Dice` and
    :class:`kunet.metrics.IoU` (mean over foreground classes). Calling ``compile(...)`` yourself
    replaces them; any of ``optimizer``, ``loss``, ``metrics`` you leave out keeps its default.

    Args:
        num_classes: output channels. 1 = binary segmentation (one logit per pixel); >= 2 = one logit
            per class, class 0 being the background.
        filters: filters of each encoder stage; ``len(filters)`` is the depth. The bottleneck has
            ``2 * filters[-1]``. Default: the paper's (64, 128, 256, 512).
        input_shape: ``(H, W, C)`` or ``(D, H, W, C)``; sizes may be None (any size). Default
            ``(None, None, 3)``, and ``(None, None, None, 1)`` for ``spatial_dims=3``.
        batch_norm: BatchNormalization after every 3x3 convolution (default True).
        upsampling: ``"transpose"`` (2x stride-2 transposed conv), ``"bilinear"`` (images) or
            ``"trilinear"`` (volumes): linear resize + 2x conv.
        dropout: dropout rate after the bottleneck (default 0.0: none).
        output_activation: None (logits; what the default losses expect), ``"sigmoid"`` or
            ``"softmax"`` (probabilities; compile with matching losses yourself).
        bn_momentum: BatchNormalization momentum (default 0.99, Keras'); 0.9 suits short runs on
            small data.
        fused: fused Triton DoubleConv policy for every DoubleConv, see :func:`kunet.set_fused`.
            Not saved in the config (an execution choice, not part of the model).
        spatial_dims: 2 (images) or 3 (volumes); default: from ``input_shape``, else 2.
        block: ``"double_conv"`` (default) or ``"residual"``.
        attention: gate the skips (Attention U-Net).
        skips: ``"plain"`` (default) or ``"nested"`` (UNet++).
        deep_supervision: train with deep supervision (see above).
        encoder: name of a pretrained encoder (:data:`kunet.encoders.ENCODERS`), or None.
        encoder_weights: ``"imagenet"`` (default; Keras downloads them once), None (random), or the
            path of a weights file of that network (offline).
        freeze_encoder: keep the encoder's weights (and its BatchNormalization statistics) fixed.
        decoder_filters: with an encoder, the filters of the five decoder stages (output strides 16
            to 1); default (256, 128, 64, 32, 16).
        dtype_policy: ``"mixed_bfloat16"`` or ``"mixed_float16"`` (mixed precision: layers compute
            in 16 bits, variables stay float32), ``"float32"``, or None (default: Keras' global
            policy, ``keras.config.set_dtype_policy``). The head computes in float32, so logits,
            losses and metrics are float32; under ``"mixed_float16"`` ``compile`` wraps the
            optimizer in Keras' ``LossScaleOptimizer``. Saved in the config: the model loads with
            the policy it was built with, whatever the global policy where it is loaded.
        name: model name.

    Example:
        >>> model = kunet.UNet(num_classes=1, filters=(16, 32, 64))
        >>> model.fit(images, masks, epochs=10)          # images (N,H,W,3), masks (N,H,W) in {0,1}
        >>> probs = keras.ops.sigmoid(model.predict(images))
        >>> volumes = kunet.UNet(num_classes=3, spatial_dims=3, filters=(16, 32, 64))
    """

    def __init__(
        self,
        num_classes=1,
        filters=None,
        input_shape=None,
        batch_norm=True,
        upsampling="transpose",
        dropout=0.0,
        output_activation=None,
        bn_momentum=0.99,
        fused=None,
        spatial_dims=None,
        block="double_conv",
        attention=False,
        skips="plain",
        deep_supervision=False,
        encoder=None,
        encoder_weights="imagenet",
        freeze_encoder=False,
        decoder_filters=None,
        dtype_policy=None,
        name="unet",
        **kwargs,
    ):
        # the functional keras.Model reads `trainable` from its **kwargs and drops any other keyword
        check_kwargs(self, kwargs, UNet, also=("trainable",))
        c = _check_config(
            {k: v for k, v in locals().items() if k in _CONFIG_KEYS} | {"fused": None}
        )
        c["fused"] = dispatch.validate_policy(fused, name="UNet(fused=...)")
        policy = _dtype_policy(dtype_policy)
        with _global_policy(policy):  # every layer of the graph computes in the policy
            inputs, outputs, supervision = _build(c)
            super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        self.num_classes = num_classes
        self.filters = c["filters"]
        self.unet_input_shape = c["input_shape"]
        self.batch_norm = bool(batch_norm)
        self.upsampling = upsampling
        self.dropout = float(dropout)
        self.output_activation = output_activation
        self.bn_momentum = float(bn_momentum)
        self.fused = c["fused"]
        self.spatial_dims = c["spatial_dims"]
        self.block = block
        self.attention = attention
        self.skips = skips
        self.deep_supervision = deep_supervision
        self.encoder = encoder
        self.encoder_weights = c["encoder_weights"]
        self.freeze_encoder = freeze_encoder
        self.decoder_filters = c["decoder_filters"]
        # the multiple the input's sides are padded to inside the graph
        self.size_multiple = 32 if encoder is not None else 2 ** len(self.filters)
        self.__dict__["_supervision"] = tuple(supervision)
        self.compile()

    @classmethod
    def from_preset(cls, name, **overrides):
        """The UNet of the named configuration (:func:`kunet.presets.names`), with ``overrides``
        (any :class:`UNet` argument) replacing its values: ``UNet.from_preset("unet3d",
        num_classes=3)``. An unknown name raises ValueError listing the valid ones."""
        from kunet import presets

        return cls(**presets.config(name, **overrides))

    def pruned(self, depth):
        """A deep-supervised UNet++ pruned for inference (Zhou et al. 2018, section 3.3): the
        Keras model from the input to the head on top-row node X(0, ``depth``), which runs only
        the nodes that one reads (depth 1 is the shallowest, ``len(filters)`` the whole model).
        Shares this model's layers and weights."""
        if self.skips != "nested" or not self.deep_supervision:
            raise ValueError(
                "pruned() needs a UNet++ trained with a head on every top-row node: "
                f"skips='nested' and deep_supervision=True; this one has skips={self.skips!r}, "
                f"deep_supervision={self.deep_supervision}"
            )
        depth_max = len(self.filters)
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= depth_max:
            raise ValueError(f"depth must be an int in [1, {depth_max}]; got {depth!r}")
        output = self.outputs[0] if depth == depth_max else self.outputs[depth]
        return keras.Model(self.inputs, output, name=f"{self.name}_pruned{depth}")

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None,
               overwrite=False, verify=False, **kwargs):  # fmt: skip
        """Keras' ``export``, made to work for every kunet model on every backend
        (:mod:`kunet.export`): ``format="onnx"`` or ``"tf_saved_model"`` with dynamic batch and
        spatial sizes, the plain graph traced, a just-loaded model accepted, the file written whole
        or not at all (an existing one replaced only with ``overwrite=True``), and with
        ``verify=True`` checked against :meth:`predict` at two input sizes. Other formats, or an
        ``input_signature`` / exporter keywords, go to Keras' own ``export`` (on the plain path)."""
        from kunet import export as kexport

        if (
            format in ("onnx", "tf_saved_model", "saved_model")
            and input_signature is None
            and (not kwargs)
        ):
            return kexport.export(self, filepath, format, overwrite=overwrite, verify=verify,
                                  verbose=verbose is not False)  # fmt: skip
        with dispatch.plain():
            kexport._called(self)
            return super().export(filepath, format=format, verbose=verbose,
                                  input_signature=input_signature, **kwargs)  # fmt: skip

    # ------------------------------------------------------------------ configuration
    dispatch_type = "UNet"
    dispatch_types = ("UNet", "UNet inputs")
    _supervision = ()  # per deep-supervision output: (down-sampling factor, loss weight)

    def call(self, inputs, training=None, mask=None, **kwargs):
        """The functional graph; on torch, inference replays it without Keras' per-layer
        ``__call__`` (:class:`kunet._eager.EagerPlan`: same layers, same result, less Python).

        A deep-supervised model returns ``[main, *auxiliary]`` in training and the main output
        otherwise."""
        if mask is None and not kwargs and keras.ops.is_tensor(inputs):
            impl = dispatch.choose(self, self.dispatch_context(inputs, training))
            outputs = impl.forward(self, inputs, training)
        else:
            outputs = super().call(inputs, training=training, mask=mask, **kwargs)
        return self._outputs_for(outputs, training)

    def _outputs_for(self, outputs, training):
        if not self._supervision or training or not isinstance(outputs, (list, tuple)):
            return outputs
        return outputs[0]

    def compute_output_spec(self, inputs, training=None, mask=None):
        return self._outputs_for(super().compute_output_spec(inputs, training, mask), training)

    @property
    def output_shape(self):
        """The shape of the (main) output."""
        return tuple(self.outputs[0].shape)

    def dispatch_context(self, x, training=False, parts=None):
        return dispatch.context(self, x, training)

    @property
    def implementation(self) -> dict:
        """The implementation of the model's own call at its latest call, per mode (``"torch"``:
        the inference replay); :func:`kunet.explain` lists every layer's."""
        return dispatch.implementation(self)

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable,
                  "dtype_policy": self.dtype_policy.name}  # fmt: skip
        for key in _CONFIG_KEYS:
            value = getattr(self, "unet_input_shape" if key == "input_shape" else key)
            config[key] = list(value) if isinstance(value, tuple) else value
        return config

    @classmethod
    def from_config(cls, config):
        """Rebuild from :meth:`get_config`. A pretrained encoder is built without downloading its
        weights: a loaded model's weights come from the file (configs of kunet 0.1.0, which had no
        family arguments, build the same 2D UNet as then)."""
        config = dict(config)
        for key in ("filters", "input_shape", "decoder_filters"):
            if config.get(key) is not None:
                config[key] = tuple(config[key])
        if config.get("encoder") is not None:
            config["encoder_weights"] = None
        return cls(**config)

    # ------------------------------------------------------------------ training defaults
    def default_loss(self):
        """The loss ``compile()`` uses when none is given: cross-entropy + Dice, from logits."""
        from kunet.losses import CEDice

        return CEDice(from_logits=self.output_activation is None)

    def default_metrics(self):
        """The metrics ``compile()`` uses when none are given: Dice and IoU (foreground mean)."""
        from kunet.metrics import Dice, IoU

        from_logits = self.output_activation is None
        return [
            Dice(num_classes=self.num_classes, from_logits=from_logits),
            IoU(num_classes=self.num_classes, from_logits=from_logits),
        ]

    def compile(self, optimizer=None, loss=None, metrics=None, **kwargs):
        """``keras.Model.compile`` with kunet's defaults for what is left out (None).

        Defaults: ``optimizer=keras.optimizers.Adam(1e-3)``, ``loss=self.default_loss()``,
        ``metrics=self.default_metrics()``. Pass ``metrics=[]`` for no metrics.
        """
        if optimizer is None:
            optimizer = keras.optimizers.Adam(1e-3)
        if loss is None:
            loss = self.default_loss()
        if metrics is None:
            metrics = self.default_metrics()
        # Keras records the *resolved* jit_compile (False under torch); keep what was asked for so
        # a model saved under one backend does not lose XLA compilation when loaded under another.
        self._requested_jit_compile = kwargs.get("jit_compile", "auto")
        if self._supervision:
            if isinstance(loss, (list, tuple, dict)):
                raise ValueError(
                    "a deep_supervision model takes one loss (applied to every output, against "
                    f"masks down-sampled to each); got loss={loss!r}"
                )
            self.__dict__["_supervision_loss"] = keras.losses.get(loss)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def get_compile_config(self):
        """Compile config with backend-neutral optimizer references.

        Keras records the torch backend's optimizer under ``keras.src.backend.torch...``; loading
        that under TensorFlow or JAX would import Keras' torch backend (and abort a TensorFlow
        process). The public ``keras.optimizers`` name resolves to the right class on every backend.
        Likewise ``jit_compile`` is saved as requested ("auto" by default), not as this backend
        resolved it.
        """
        config = super().get_compile_config()
        if config and isinstance(config.get("optimizer"), dict):
            config["optimizer"] = _portable_optimizer_config(config["optimizer"])
        if config and "jit_compile" in config:
            config["jit_compile"] = getattr(self, "_requested_jit_compile", "auto")
        if config:  # whether the file holds the optimizer's state (it does once it has trained)
            config["optimizer_built"] = bool(getattr(self.optimizer, "built", False))
        return config

    def compile_from_config(self, config):
        """Re-compile from a saved compile config (what ``keras.models.load_model`` calls). The
        optimizer is built (so its saved state loads) only where it had been built when saved: a
        model saved before training has no optimizer state to load."""
        config = dict(config)
        built = config.pop("optimizer_built", True)  # files from before the flag: as then
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built and built:
            self.optimizer.build(self.trainable_variables)  # so saved optimizer state loads

    # ------------------------------------------------------------------ input checks
    def _check(self, x, y=None, where="x", nan_policy="error"):
        return _validation.check_data(
            x,
            y,
            channels=self.unet_input_shape[-1],
            num_classes=self.num_classes,
            input_shape=self.unet_input_shape,
            spatial_dims=self.spatial_dims,
            where=where,
            nan_policy=nan_policy,
        )

    def _guard_inputs(self, nan_policy):
        """Whether the training and evaluation steps check their images for NaN/inf (they do
        unless ``nan_policy="ignore"``); re-traces the steps when that changes."""
        guard = io.check_nan_policy(nan_policy) != "ignore"
        if getattr(self, "_input_guard", True) != guard:
            self.train_function = self.test_function = None
        self._input_guard = guard

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Keras' loss, made NaN when the batch's images hold NaN/inf (on every backend, whatever
        its kernels do with NaN), so that :class:`kunet.callbacks.TerminateOnNonFinite` stops
        training at that batch. Off under ``nan_policy="ignore"``.

        A deep-supervised model adds, per auxiliary output, its weight times the loss against the
        masks down-sampled to its grid: ``loss(main) + sum_i 2**-i * loss(aux_i)`` (UNet++: weight 1
        per extra full-resolution output)."""
        auxiliary = ()
        if self._supervision and isinstance(y_pred, (list, tuple)):
            y_pred, auxiliary = y_pred[0], y_pred[1:]
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if loss is not None and auxiliary:
            loss_fn = self.__dict__.get("_supervision_loss")
            for out, (factor, weight) in zip(auxiliary, self._supervision, strict=True):
                target = self._downsampled_masks(y, factor)
                extra = loss_fn(target, out, sample_weight=sample_weight)
                loss = loss + keras.ops.cast(weight * extra, loss.dtype)
        if loss is not None and getattr(self, "_input_guard", True) and keras.ops.is_tensor(x):
            finite = keras.ops.all(keras.ops.isfinite(x))
            loss = keras.ops.where(finite, loss, keras.ops.cast(float("nan"), loss.dtype))
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Keras' metrics, on the main output only (a deep-supervised model's first)."""
        if self._supervision and isinstance(y_pred, (list, tuple)):
            y_pred = y_pred[0]
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _downsampled_masks(self, y, factor):
        """Masks ``y`` (N, *spatial[, 1]) on the grid of an output ``factor`` times coarser than
        the padded input: padded (centred, background) like the image in the graph, then every
        ``factor``-th pixel, from the middle of each ``factor``-wide block."""
        if factor == 1:
            return y
        y = keras.ops.convert_to_tensor(y)
        shape = keras.ops.shape(y)
        dims = self.spatial_dims
        pads = centred_padding(shape[1 : dims + 1], self.size_multiple)
        y = keras.ops.pad(y, [[0, 0], *pads] + [[0, 0]] * (len(shape) - dims - 1))
        index = (slice(None),) + (slice(factor // 2, None, factor),) * dims
        return y[index]

    def fit(self, x=None, y=None, *args, nan_policy="error", **kwargs):
        """Keras' ``fit``, after checking the data (shapes, channels, mask values, NaN/inf).

        ``nan_policy``: images holding NaN/inf raise ValueError naming the first such index
        ('error', default), have them replaced by 0 ('zero') or are passed on ('ignore'). Arrays are
        checked whole, datasets on their first batch; later batches holding NaN/inf stop training at
        that batch (:class:`kunet.callbacks.TerminateOnNonFinite`, added unless you pass it or
        ``keras.callbacks.TerminateOnNaN`` yourself).
        """
        x = self._check(x, y, nan_policy=nan_policy)
        validation_data = kwargs.get("validation_data")
        if validation_data is not None:
            if isinstance(validation_data, (tuple, list)) and len(validation_data) >= 2:
                vx = self._check(
                    validation_data[0],
                    validation_data[1],
                    where="validation_data",
                    nan_policy=nan_policy,
                )
                kwargs["validation_data"] = (vx, *validation_data[1:])
            else:
                self._check(validation_data, where="validation_data", nan_policy=nan_policy)
        callbacks = kwargs.get("callbacks")
        if callbacks is None or isinstance(callbacks, (list, tuple)):
            callbacks = list(callbacks or [])
            guards = (keras.callbacks.TerminateOnNaN, TerminateOnNonFinite)
            if not any(isinstance(c, guards) for c in callbacks):
                callbacks.insert(0, TerminateOnNonFinite())
            kwargs["callbacks"] = callbacks
        self._guard_inputs(nan_policy)
        return self._run("fit", x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, nan_policy="error", **kwargs):
        """Keras' ``evaluate`` after the checks of :meth:`fit` (same ``nan_policy``)."""
        if kwargs.get("_use_cached_eval_dataset"):  # fit's own validation pass: checked by fit
            return self._run("evaluate", x, y, *args, **kwargs)
        x = self._check(x, y, nan_policy=nan_policy)
        self._guard_inputs(nan_policy)
        return self._run("evaluate", x, y, *args, **kwargs)

    def predict(self, x, *args, nan_policy="error", **kwargs):
        """Keras' ``predict`` after the checks of :meth:`fit` (same ``nan_policy``)."""
        x = self._check(x, nan_policy=nan_policy)
        return self._run("predict", x, *args, **kwargs)

    def _run(self, method, *args, **kwargs):
        """Keras' ``fit`` / ``evaluate`` / ``predict``, its inputs fed as the ``UNet inputs``
        implementation decides (on TensorFlow, NumPy arrays through a tf.data pipeline without
        autotuning threads: :mod:`kunet.backends.tensorflow_data`)."""
        run = getattr(super(), method)
        impl = dispatch.choose(self, self.dispatch_context(None, method == "fit"), "UNet inputs")
        if impl.name != dispatch.REFERENCE:
            bound = inspect.signature(run).bind(*args, **kwargs)
            if impl.forward(self, method, bound.arguments):
                return run(*bound.args, **bound.kwargs)
        return run(*args, **kwargs)


def UNetPlusPlus(num_classes=1, filters=(32, 64, 128, 256), deep_supervision=True, **kwargs):
    """UNet++ (Zhou et al. 2018): ``UNet(skips="nested", ...)``, deep-supervised by default (every
    top-row node gets a head in training; ``predict`` reads the last), so that
    :meth:`UNet.pruned` can cut it for faster inference."""
    return UNet(num_classes=num_classes, filters=filters, skips="nested",
                deep_supervision=deep_supervision, **kwargs)  # fmt: skip


@dispatch.register(
    "UNet", dispatch.REFERENCE, rank=100, description="Keras' functional call", spatial_dims=(2, 3)
)
def _unet_reference(model, inputs, training):
    return super(UNet, model).call(inputs, training=training)


@dispatch.register(
    "UNet inputs",
    dispatch.REFERENCE,
    rank=100,
    description="Keras' own data adapters",
    spatial_dims=(2, 3),
)
def _inputs_reference(model, method, arguments):
    return False


def _portable_optimizer_config(config):
    module = config.get("module") or ""
    if module.startswith("keras.src.backend.") and hasattr(
        keras.optimizers, config.get("class_name", "")
    ):
        config = dict(config)
        config["module"] = "keras.optimizers"
        config["registered_name"] = None
    return config
