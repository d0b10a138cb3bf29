"""One door: which implementation runs each kunet layer that has fast paths, decided in one place.

A layer type with fast paths (``DoubleConv``, ``Conv2D``, ``Conv2DTranspose``, ``MaxPool2x``, the
UNet's inference replay and its array feeding) has a list of registered :class:`Implementation` s,
fastest first, ending with the reference (Keras' own layers, which the others are tested against).
Each implementation lives in one module and declares, with ``supports(layer, ctx)``, what it can
run: ``None`` when it can, else the reason it cannot ("no CUDA device", "BatchNormalization
synchronized=True"). :func:`choose` takes the first that can and caches the choice per layer and
:class:`Context` (backend, device, dtype, training, number of inputs, fused policy, frozen BNs), so a
call re-decides only when one of those changes.

The backend-specific implementations (the only kunet modules that import torch, TensorFlow or
Triton) are in :mod:`kunet.backends`; the modules of the active backend are imported on first use
(:data:`BACKEND_MODULES`). :func:`explain` lists, per layer of a model, the path taken in training and
in inference and why each faster one is not.

The fused Triton DoubleConv also follows a policy, most specific first:

1. ``DoubleConv(fused=True|False)`` (or ``UNet(fused=...)``, which passes it to every DoubleConv);
2. the global policy set with :func:`set_fused` (``"auto"``, ``True`` or ``False``);
3. the environment variable ``KUNET_FUSED`` (``auto``, ``1``/``true``/``on``, ``0``/``false``/``off``)
   if :func:`set_fused` was never called;
4. ``"auto"``: take it where it can run, silently fall back where it cannot. ``True`` raises a
   :class:`FusedUnavailableError` that says why when it cannot run.

Symbolic tracing (building a functional model: Keras tensors, torch "meta" tensors) always takes the
reference: every path produces the same shapes and variables.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import keras

REFERENCE = "keras"
# The modules that register each backend's implementations, imported when that backend first
# dispatches (a module imports its framework at the top: only the active backend's are imported).
BACKEND_MODULES = {
    "torch": ("kunet.backends.triton", "kunet.backends.torch_ops"),
    "tensorflow": ("kunet.backends.tensorflow_ops", "kunet.backends.tensorflow_data"),
    "jax": ("kunet.backends.jax_ops",),
}


# ---------------------------------------------------------------------------------- fused policy
class FusedUnavailableError(RuntimeError):
    """``fused=True`` was asked for where the fused DoubleConv cannot run."""


_global_policy: object = None  # None: not set, read KUNET_FUSED


def _parse_policy(value, *, name: str):
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return "auto"
        if v in ("1", "true", "on", "yes"):
            return True
        if v in ("0", "false", "off", "no"):
            return False
    raise ValueError(
        f"{name} must be 'auto', True or False (env KUNET_FUSED: auto/1/0/true/false); got {value!r}"
    )


def set_fused(policy) -> None:
    """Set the global fused-DoubleConv policy: ``"auto"`` (default), ``True`` or ``False``.

    A layer's own ``fused=`` argument, when not None, takes precedence.
    """
    global _global_policy
    _global_policy = _parse_policy(policy, name="set_fused(policy)")


def get_fused():
    """The global policy in force: ``"auto"``, ``True`` or ``False``."""
    if _global_policy is not None:
        return _global_policy
    env = os.environ.get("KUNET_FUSED")
    if env is None or env.strip() == "":
        return "auto"
    return _parse_policy(env, name="KUNET_FUSED")


def validate_policy(value, name: str = "fused"):
    """Check a per-layer ``fused`` argument (None, 'auto', True or False) and normalise it."""
    return _parse_policy(value, name=name)


def interpret_mode() -> bool:
    """True when Triton's interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0", "false", "False")


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """Why Triton cannot be used here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'kunet[triton]')"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return f"Triton failed to import: {exc!r}"
    return None


# ---------------------------------------------------------------------------------- registry
class Context(NamedTuple):
    """What a choice depends on: the key of the per-layer cache (a NamedTuple: built and hashed on
    every call, so as cheap as Python allows)."""

    backend: str
    device: str | None  # torch: the input's device type ("cpu", "cuda"); None elsewhere
    symbolic: bool  # a Keras tensor or a torch "meta" tensor: building a functional model
    dtype: str  # the layer's compute dtype
    training: bool | None  # None: a layer without a training mode
    parts: int = 1  # input tensors (a decoder's DoubleConv reads [skip, up]: 2)
    policy: object = "auto"  # the fused policy in force for the layer
    frozen: tuple = ()  # per BatchNormalization: not trainable (Keras runs it in inference mode)
    interpret: bool = False  # TRITON_INTERPRET=1


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run a layer type.

    ``supports(layer, ctx) -> None | str`` reads the layer's configuration only (never its tensors);
    ``forward`` is called with what the layer type passes (see each layer's ``call``).
    """

    layer: str  # the layer type, e.g. "DoubleConv"
    name: str  # "triton", "torch", "tensorflow", "jax", "keras" (the reference)
    backends: tuple  # the Keras backends it runs on; () for every backend
    supports: Callable
    forward: Callable
    description: str
    rank: int  # lower runs first; the reference is last
    fused: bool = False  # governed by the fused policy
    spatial_dims: tuple = (2,)  # the input ranks it implements: (2,) images, (3,) volumes


_registry: dict[str, list[Implementation]] = {}
_choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> {(kind, ctx): impl}
_ran: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> {(kind, mode): name}
_forced: dict[str, str] = {}
_plain = 0  # > 0 inside dispatch.plain()


def register(layer: str, name: str, *, rank: int, description: str, supports=None, backends=(),
             fused=False, spatial_dims=(2,)):  # fmt: skip
    """Decorator: register the decorated ``forward`` as implementation ``name`` of ``layer``.

    ``supports(layer, ctx) -> None | reason`` (default: whenever the backend matches); ``rank``:
    lower is tried first (the reference has the highest); ``backends``: () for every backend;
    ``spatial_dims``: the layer's ``spatial_dims`` it implements (2: images; the references and
    rank-agnostic paths say ``(2, 3)``).
    """

    def wrap(forward):
        check = supports or _always
        add(Implementation(layer, name, tuple(backends), check, forward, description, rank, fused,
                           tuple(spatial_dims)))  # fmt: skip
        return forward

    return wrap


def add(impl: Implementation) -> Implementation:
    """Register ``impl`` (replacing one of the same layer type and name)."""
    impls = [i for i in _registry.get(impl.layer, []) if i.name != impl.name] + [impl]
    _registry[impl.layer] = sorted(impls, key=lambda i: i.rank)
    _choices.clear()
    return impl


def _always(layer, ctx):
    return None


def implementations(layer_type: str, backend: str | None = None) -> list[Implementation]:
    """The implementations of ``layer_type`` (fastest first), importing ``backend``'s modules
    (default: the active backend's)."""
    _import_backend(backend or keras.backend.backend())
    return list(_registry.get(layer_type, []))


def _import_backend(backend: str) -> None:
    for module in BACKEND_MODULES.get(backend, ()):
        importlib.import_module(module)  # a sys.modules lookup once imported


def layer_type(layer) -> str | None:
    """The registry key of ``layer`` (its class's ``dispatch_type``), or None."""
    return getattr(type(layer), "dispatch_type", None)


def layer_types(layer) -> tuple:
    """Every registry key ``layer`` dispatches on (a UNet: its call and its input feeding)."""
    kind = layer_type(layer)
    return getattr(type(layer), "dispatch_types", (kind,) if kind else ())


def context(layer, x, training=None, *, parts=1, frozen=(), fused=False) -> Context:
    """The :class:`Context` of calling ``layer`` on ``x`` (its first input); ``training`` None for a
    layer without a training mode; ``fused``: the layer type has a fused implementation (then its
    ``fused`` policy and TRITON_INTERPRET are read)."""
    backend = keras.backend.backend()
    if backend == "torch":
        device = getattr(getattr(x, "device", None), "type", None)
        symbolic = device == "meta" or isinstance(x, keras.KerasTensor)
    else:
        device, symbolic = None, isinstance(x, keras.KerasTensor)
    policy, interpret = "auto", False
    if fused:
        policy = layer.fused if layer.fused is not None else get_fused()
        interpret = interpret_mode()
    return Context(
        backend,
        device,
        symbolic,
        layer.compute_dtype,
        None if training is None else bool(training),
        parts,
        policy,
        frozen,
        interpret,
    )


def reason(impl: Implementation, layer, ctx: Context) -> str | None:
    """Why ``impl`` cannot run ``layer`` in ``ctx``, or None."""
    if impl.backends and ctx.backend not in impl.backends:
        return f"KERAS_BACKEND is {ctx.backend!r}"
    if ctx.symbolic and impl.name != REFERENCE:
        return "symbolic tensor (building the model)"
    dims = getattr(layer, "spatial_dims", 2)
    if dims not in impl.spatial_dims:
        return f"{dims}D input (this path implements {'/'.join(map(str, impl.spatial_dims))}D)"
    if impl.fused and ctx.policy is False:
        return "fused=False (the layer's fused=, kunet.set_fused or KUNET_FUSED)"
    return impl.supports(layer, ctx)


def resolve(layer, ctx: Context, kind: str | None = None):
    """The implementation of layer type ``kind`` (default: ``layer``'s) for ``layer`` in ``ctx``,
    and the faster ones skipped, with their reasons: ``(impl, [(impl, reason), ...])``.

    Raises :class:`FusedUnavailableError` where the fused policy is ``True`` and the fused
    implementation cannot run (on a real tensor)."""
    kind = kind or layer_type(layer)
    forced = _forced.get(kind)
    impls = implementations(kind, ctx.backend)
    if forced is not None and forced not in [i.name for i in impls]:
        names = ", ".join(i.name for i in impls)
        raise ValueError(f"no {kind} implementation named {forced!r} on {ctx.backend} ({names})")
    skipped = []
    for impl in impls:
        why = reason(impl, layer, ctx)
        if _plain and impl.name != REFERENCE:
            why = why or "kunet.dispatch.plain() (exporting)"
        if forced is not None and impl.name != forced:
            why = why or f"kunet.dispatch.use({kind!r}, {forced!r})"
        if why is None:
            return impl, skipped
        if forced is not None and impl.name == forced and not ctx.symbolic:
            raise ValueError(f"{kind} implementation {forced!r} cannot run here: {why}")
        if impl.fused and ctx.policy is True and not ctx.symbolic:
            raise FusedUnavailableError(
                f"fused=True, but the fused {kind} ({impl.name}) cannot run: {why}."
            )
        skipped.append((impl, why))
    raise LookupError(f"no implementation of {kind} can run here: {skipped}")


def choose(layer, ctx: Context, kind: str | None = None) -> Implementation:
    """:func:`resolve`, cached per layer, layer type and context: what a layer's call runs."""
    kind = kind or layer_type(layer)
    cache = _choices.get(layer)
    if cache is None:
        cache = _choices[layer] = {}
    impl = cache.get((kind, ctx))
    if impl is None:
        impl = cache[(kind, ctx)] = resolve(layer, ctx, kind)[0]
    if not ctx.symbolic:
        ran = _ran.get(layer)
        if ran is None:
            ran = _ran[layer] = {}
        ran[(kind, _mode(ctx))] = impl.name
    return impl


def _mode(ctx):
    return "call" if ctx.training is None else "training" if ctx.training else "inference"


def implementation(layer, kind: str | None = None) -> dict:
    """The implementation ``layer`` ran at its latest call in each mode, by name:
    ``{"training": "torch", "inference": "torch"}``, or ``{"call": "torch"}`` for a layer that has
    no training mode (a convolution, pooling); empty before its first call."""
    kind = kind or layer_type(layer)
    ran = _ran.get(layer) or {}
    return {m: ran[(kind, m)] for m in ("training", "inference", "call") if (kind, m) in ran}


class use:
    """``with kunet.dispatch.use("DoubleConv", "torch"):`` runs that implementation of the layer type
    (``ValueError`` where it cannot run) instead of the first that can: for tests and benchmarks."""

    def __init__(self, layer: str, name: str):
        self.layer, self.name = layer, name

    def __enter__(self):
        self.previous = _forced.get(self.layer)
        _forced[self.layer] = self.name
        _choices.clear()
        return self

    def __exit__(self, *exc):
        if self.previous is None:
            _forced.pop(self.layer, None)
        else:
            _forced[self.layer] = self.previous
        _choices.clear()
        return False


def forget() -> None:
    """Drop every cached choice: for code that changes a built layer's configuration in place (e.g.
    :func:`kunet.distribute.synchronize_batch_norm`), so its next call decides again."""
    _choices.clear()


class plain:
    """``with kunet.dispatch.plain():`` every layer runs its reference (Keras' own layers) and the
    model's own call and input feeding are Keras': what export traces (``kunet.export``), so that no
    private framework op, eager replay or Triton kernel ends up in an exported graph. Nests."""

    def __enter__(self):
        global _plain
        _plain += 1
        _choices.clear()
        return self

    def __exit__(self, *exc):
        global _plain
        _plain -= 1
        _choices.clear()
        return False


# ---------------------------------------------------------------------------------- explain
@dataclasses.dataclass
class Explanation:
    """:func:`explain`'s answer: ``rows`` of (layer name, layer type, training path, inference path,
    reasons the faster paths are not taken); ``str()`` is the table."""

    backend: str
    device: str | None
    rows: list

    def __str__(self):
        head = ("layer", "type", "training", "inference", "faster paths not taken")
        table = [head] + [
            (name, kind, train, infer, "; ".join(why) or "-")
            for name, kind, train, infer, why in self.rows
        ]
        widths = [max(len(r[i]) for r in table) for i in range(4)]
        lines = [f"backend {self.backend}" + (f", device {self.device}" if self.device else "")]
        for r in table:
            lines.append(
                "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
            )
        return "\n".join(lines)

    def __repr__(self):
        return str(self)


def explain(model, *, device: str | None = None) -> Explanation:
    """Which implementation each layer of ``model`` runs, in training and in inference, and why each
    faster one registered for this backend is not taken.

    ``device``: the torch device type the inputs will be on (default: where the model's variables
    are). Tensors are not needed: the choice depends on the configuration only.
    """
    backend = keras.backend.backend()
    if device is None and backend == "torch" and model.weights:
        device = model.weights[0].value.device.type
    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]
    rows = []
    for layer in layers:
        for kind in layer_types(layer):
            modes, why = {}, []
            for training in (True, False):
                ctx = layer.dispatch_context(None, training)._replace(
                    backend=backend, device=device
                )
                impl, skipped = resolve_quietly(layer, ctx, kind)
                modes[training] = impl.name
                for other, because in skipped:
                    if other.backends and backend not in other.backends:
                        continue  # another backend's: not a path this model could take here
                    line = f"{other.name}: {because}"
                    if line not in why:
                        why.append(line)
            rows.append((layer.name, kind, modes[True], modes[False], why))
    return Explanation(backend, device, rows)


def resolve_quietly(layer, ctx, kind=None):
    """:func:`resolve` without raising for ``fused=True`` (the error becomes a reason)."""
    try:
        return resolve(layer, ctx, kind)
    except FusedUnavailableError:
        return resolve(layer, ctx._replace(policy="auto"), kind)


# ---------------------------------------------------------------------------------- devices
def has_accelerator() -> bool:
    """Whether the active backend sees a GPU (what ``kunet plan`` sizes patches and epochs for)."""
    backend = keras.backend.backend()
    try:
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
        if backend == "jax":
            import jax

            return jax.default_backend() in ("gpu", "cuda", "rocm")
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # noqa: BLE001 - no accelerator is the safe answer
        return False
    return False


# ---------------------------------------------------------------------------------- import order
class PerformanceWarning(UserWarning):
    """kunet runs, but slower than it could here; the message says how to fix it."""


ONEDNN_FIX = (
    "import kunet before keras/tensorflow, or start Python with TF_ENABLE_ONEDNN_OPTS=1 set"
)


def check_tensorflow_onednn() -> str | None:
    """Warn (once per process) when TensorFlow was imported before kunet with its oneDNN CPU kernels
    off and the user did not choose that (no ``TF_ENABLE_ONEDNN_OPTS``): TensorFlow reads the
    variable only when it is imported, and leaves oneDNN off on CPUs without AVX512_VNNI/BF16 or
    AMX (most AVX2 and AMD machines), where kunet trains much slower without it
    (benchmarks/README.md). Returns the message, or None."""
    global _onednn_checked
    if _onednn_checked or "tensorflow" not in sys.modules:
        return None
    _onednn_checked = True
    if keras.backend.backend() != "tensorflow" or "TF_ENABLE_ONEDNN_OPTS" in os.environ:
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port

        if _pywrap_util_port.IsMklEnabled():
            return None
    except Exception:  # noqa: BLE001 - a TensorFlow without the probe: say nothing
        return None
    message = (
        "TensorFlow was imported before kunet, with its oneDNN CPU kernels off (TensorFlow reads "
        "TF_ENABLE_ONEDNN_OPTS only when it is first imported); kunet trains much slower without "
        f"them on CPUs like this one (benchmarks/README.md). To fix: {ONEDNN_FIX}."
    )
    warnings.warn(message, PerformanceWarning, stacklevel=3)
    return message


_onednn_checked = False
