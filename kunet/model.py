"""``kunet.UNet``: the UNet as a Keras functional model that trains with ``fit`` on any backend."""

from __future__ import annotations

import inspect

import keras

from kunet import _validation, blocks, dispatch, io
from kunet._args import check_kwargs
from kunet.callbacks import TerminateOnNonFinite
from kunet.layers import CropLike, PadToMultiple


def _check_config(num_classes, filters, input_shape, upsampling, dropout, output_activation):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}")
    try:
        filters = tuple(filters)
    except TypeError:
        raise ValueError(f"filters must be a sequence of positive ints; got {filters!r}") from None
    if not filters:
        raise ValueError("filters must name at least one stage (e.g. (64, 128, 256, 512)); got ()")
    for f in filters:
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            raise ValueError(f"filters must be positive ints; got {filters!r}")
    try:
        input_shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be (H, W, C); got {input_shape!r}") from None
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C) (channels last); got {input_shape!r}")
    if not isinstance(input_shape[-1], int) or input_shape[-1] < 1:
        raise ValueError(
            f"input_shape must give the number of channels as a positive int; got {input_shape!r}"
        )
    for d in input_shape[:2]:
        if d is not None and (not isinstance(d, int) or d < 1):
            raise ValueError(f"input_shape's H and W must be None or positive; got {input_shape!r}")
    if upsampling not in blocks.UPSAMPLING_MODES:
        raise ValueError(f"upsampling must be one of {blocks.UPSAMPLING_MODES}; got {upsampling!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    if output_activation not in (None, "sigmoid", "softmax", "linear"):
        raise ValueError(
            "output_activation must be None (logits, the default for training), 'sigmoid', "
            f"'softmax' or 'linear'; got {output_activation!r}"
        )
    return filters, input_shape


@keras.saving.register_keras_serializable("kunet")
class UNet(keras.Model):
    """The UNet of Ronneberger et al. (2015) with batch normalization, for 2D segmentation.

    Encoder stage = DoubleConv + 2x2 max-pool; bottleneck = DoubleConv with twice the last filters;
    decoder stage = up-sampling + concatenation of the skip + DoubleConv; 1x1 convolution head.
    Any H and W work: the input is zero-padded (centred) to a multiple of ``2**len(filters)`` inside
    the graph and the output cropped back, so the output always has the input's spatial size.

    The model is compiled with defaults at construction, so ``UNet(...).fit(data)`` trains at once:
    Adam(1e-3); ``num_classes=1``: binary cross-entropy (from logits) + Dice with float masks of shape
    (N, H, W) or (N, H, W, 1) in {0, 1}; ``num_classes >= 2``: sparse categorical cross-entropy (from
    logits) + Dice with integer masks (N, H, W) or (N, H, W, 1); metrics :class:`kunet.metrics.Dice`
    and :class:`kunet.metrics.IoU` (mean over foreground classes). Calling ``compile(...)`` yourself
    replaces them; any of ``optimizer``, ``loss``, ``metrics`` you leave out keeps its default.

    Args:
        num_classes: output channels. 1 = binary segmentation (one logit per pixel); >= 2 = one logit
            per class, class 0 being the background.
        filters: filters of each encoder stage; ``len(filters)`` is the depth. The bottleneck has
            ``2 * filters[-1]``. Default: the paper's (64, 128, 256, 512).
        input_shape: ``(H, W, C)``; H and W may be None (any size). Default ``(None, None, 3)``.
        batch_norm: BatchNormalization after every 3x3 convolution (default True).
        upsampling: ``"transpose"`` (2x2 stride-2 transposed conv) or ``"bilinear"`` (bilinear resize
            + 2x2 conv).
        dropout: dropout rate after the bottleneck (default 0.0: none).
        output_activation: None (logits; what the default losses expect), ``"sigmoid"`` or
            ``"softmax"`` (probabilities; compile with matching losses yourself).
        bn_momentum: BatchNormalization momentum (default 0.99, Keras'); 0.9 suits short runs on
            small data.
        fused: fused Triton DoubleConv policy for every DoubleConv, see :func:`kunet.set_fused`.
            Not saved in the config (an execution choice, not part of the model).
        name: model name.

    Example:
        >>> model = kunet.UNet(num_classes=1, filters=(16, 32, 64))
        >>> model.fit(images, masks, epochs=10)          # images (N,H,W,3), masks (N,H,W) in {0,1}
        >>> probs = keras.ops.sigmoid(model.predict(images))
    """

    def __init__(
        self,
        num_classes=1,
        filters=(64, 128, 256, 512),
        input_shape=(None, None, 3),
        batch_norm=True,
        upsampling="transpose",
        dropout=0.0,
        output_activation=None,
        bn_momentum=0.99,
        fused=None,
        name="unet",
        **kwargs,
    ):
        # the functional keras.Model reads `trainable` from its **kwargs and drops any other keyword
        check_kwargs(self, kwargs, UNet, also=("trainable",))
        filters, input_shape = _check_config(
            num_classes, filters, input_shape, upsampling, dropout, output_activation
        )
        fused = dispatch.validate_policy(fused, name="UNet(fused=...)")
        common = {"batch_norm": batch_norm, "bn_momentum": bn_momentum, "fused": fused}

        inputs = keras.Input(shape=input_shape, name="image")
        x = PadToMultiple(2 ** len(filters), name="pad")(inputs)
        skips = []
        for i, f in enumerate(filters):
            skip, x = blocks.encoder_block(x, f, name=f"encoder{i + 1}", **common)
            skips.append(skip)
        x = blocks.bottleneck(x, 2 * filters[-1], dropout=dropout, **common)
        for i in reversed(range(len(filters))):
            x = blocks.decoder_block(
                x, skips[i], filters[i], upsampling=upsampling, name=f"decoder{i + 1}", **common
            )
        x = CropLike(name="crop")([x, inputs])
        outputs = blocks.segmentation_head(x, num_classes, activation=output_activation)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        self.num_classes = num_classes
        self.filters = filters
        self.unet_input_shape = input_shape
        self.batch_norm = bool(batch_norm)
        self.upsampling = upsampling
        self.dropout = float(dropout)
        self.output_activation = output_activation
        self.bn_momentum = float(bn_momentum)
        self.fused = fused
        self.compile()

    # ------------------------------------------------------------------ configuration
    dispatch_type = "UNet"
    dispatch_types = ("UNet", "UNet inputs")

    def call(self, inputs, training=None, mask=None, **kwargs):
        """The functional graph; on torch, inference replays it without Keras' per-layer
        ``__call__`` (:class:`kunet._eager.EagerPlan`: same layers, same result, less Python)."""
        if mask is None and not kwargs and keras.ops.is_tensor(inputs):
            impl = dispatch.choose(self, self.dispatch_context(inputs, training))
            return impl.forward(self, inputs, training)
        return super().call(inputs, training=training, mask=mask, **kwargs)

    def dispatch_context(self, x, training=False, parts=None):
        return dispatch.context(self, x, training)

    @property
    def implementation(self) -> dict:
        """The implementation of the model's own call at its latest call, per mode (``"torch"``:
        the inference replay); :func:`kunet.explain` lists every layer's."""
        return dispatch.implementation(self)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "filters": list(self.filters),
            "input_shape": list(self.unet_input_shape),
            "batch_norm": self.batch_norm,
            "upsampling": self.upsampling,
            "dropout": self.dropout,
            "output_activation": self.output_activation,
            "bn_momentum": self.bn_momentum,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["filters"] = tuple(config["filters"])
        config["input_shape"] = tuple(config["input_shape"])
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
        return config

    def compile_from_config(self, config):
        """Re-compile from a saved compile config (what ``keras.models.load_model`` calls)."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)  # so saved optimizer state loads

    # ------------------------------------------------------------------ input checks
    def _check(self, x, y=None, where="x", nan_policy="error"):
        return _validation.check_data(
            x,
            y,
            channels=self.unet_input_shape[-1],
            num_classes=self.num_classes,
            input_shape=self.unet_input_shape,
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
        training at that batch. Off under ``nan_policy="ignore"``."""
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if loss is not None and getattr(self, "_input_guard", True) and keras.ops.is_tensor(x):
            finite = keras.ops.all(keras.ops.isfinite(x))
            loss = keras.ops.where(finite, loss, keras.ops.cast(float("nan"), loss.dtype))
        return loss

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


@dispatch.register("UNet", dispatch.REFERENCE, rank=100, description="Keras' functional call")
def _unet_reference(model, inputs, training):
    return super(UNet, model).call(inputs, training=training)


@dispatch.register(
    "UNet inputs", dispatch.REFERENCE, rank=100, description="Keras' own data adapters"
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
