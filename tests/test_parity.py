"""One parity harness for every fast path: each registered implementation against its reference.

For every layer type with implementations in :mod:`kunet.dispatch`, every implementation registered
for the active backend runs the same cases as the reference (Keras' own layers), forced with
``kunet.dispatch.use``, on twin layers with the same non-trivial weights. Compared: the output, the
gradient of a fixed weighted sum of it with respect to every input part and every trainable
variable, and the moving statistics after the call, with one tolerance table (below).

DoubleConv cases cover training, inference and frozen BatchNormalization; 1-3 input parts; BN on and
off; float32 and mixed_float16; odd sizes. An implementation that does not support a case says why
(its ``supports``); the case is then skipped with that reason. Adding an implementation =
registering it: the parametrization reads the registry. The Triton implementation runs under
Triton's CPU interpreter in the ``kernels`` nox session (``-k triton``); the other sessions skip it.

``test_a_broken_implementation_fails_the_harness`` breaks the shared math on purpose (swapped
kernel slices, a wrong momentum rule, BN folding without epsilon) and checks the harness notices.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest

from kunet import conv_bn_math as cbm
from kunet import dispatch
from kunet import layers as kl

BACKEND = keras.backend.backend()

# |implementation - reference| <= atol + rtol * max|reference|, per tensor, float32.
FLOAT32 = (2e-5, 2e-5)
# mixed_float16: two float16 computations that round in different places (BN folded into a float16
# kernel, say) differ from each other about as much as each differs from float32. So per tensor,
# against the reference run in float32: error <= SLACK * (the reference's own float16 error) +
# ULPS * max|float32 result| (about two float16 steps). A wrong formula is off by far more.
MIXED_SLACK, MIXED_ULPS = 2.0, 2e-3
# mixed_float16 with BatchNormalization folded into a float16 kernel (inference mode: training=False
# or frozen BN), gradients only: both folding implementations (torch eager and Triton, which
# accumulates in float32) land 3-50x further from float32 than Keras' unfolded path, at the same
# place, so it is the float16 folding itself; measured up to 0.7% of the mean |gradient| (mean
# error). Bound: mean error <= FOLDED_MEAN of the mean |float32 gradient|. Outputs keep the rule above.
FOLDED_MEAN = 0.01


# ---------------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    channels: tuple = (3,)  # input parts' channels
    size: tuple = (7, 9)
    filters: int = 8
    mode: str = "train"  # train | infer | frozen (training=True, both BNs frozen)
    batch_norm: bool = True
    dtype: str = "float32"

    def __str__(self):
        parts = "+".join(map(str, self.channels))
        bn = "" if self.batch_norm else "-nobn"
        return f"{parts}c-{self.size[0]}x{self.size[1]}-{self.mode}{bn}-{self.dtype}"


DOUBLE_CONV_CASES = [
    Case(),
    Case(mode="infer"),
    Case(mode="frozen"),
    Case(channels=(3, 5), size=(6, 7)),
    Case(channels=(3, 5), size=(6, 7), mode="infer"),
    Case(channels=(4, 4), size=(5, 5)),
    Case(channels=(2, 3, 1), size=(5, 6)),
    Case(channels=(2, 3, 1), size=(5, 6), mode="frozen"),
    Case(channels=(4,), batch_norm=False),
    Case(channels=(3, 4), batch_norm=False, mode="infer"),
    Case(channels=(16,), size=(8, 8), filters=16),
    Case(channels=(1,), size=(13, 5), filters=32),
    Case(channels=(1, 16), size=(13, 5), filters=32, mode="infer"),
    Case(dtype="mixed_float16"),
    Case(channels=(3, 5), size=(6, 7), mode="infer", dtype="mixed_float16"),
]

# single-input layers: (layer type, constructor, input channels, size)
LAYER_CASES = [
    ("Conv2D", lambda dt: kl.Conv2D(6, 3, padding="same", activation="relu", dtype=dt), 3, (7, 9)),
    ("Conv2D", lambda dt: kl.Conv2D(5, 1, dtype=dt), 4, (6, 6)),
    ("Conv2D", lambda dt: kl.Conv2D(5, 2, padding="same", dtype=dt), 4, (6, 6)),
    ("Conv2D", lambda dt: kl.Conv2D(5, 3, strides=2, dtype=dt), 4, (7, 7)),
    ("Conv2DTranspose", lambda dt: kl.Conv2DTranspose(4, 2, strides=2, dtype=dt), 6, (5, 7)),
    (
        "Conv2DTranspose",
        lambda dt: kl.Conv2DTranspose(4, 3, strides=2, padding="same", dtype=dt),
        6,
        (5, 7),
    ),  # fmt: skip
    ("MaxPool2x", lambda dt: kl.MaxPool2x(dtype=dt), 3, (7, 9)),
    ("Conv3DTranspose", lambda dt: kl.Conv3DTranspose(4, 2, strides=2, dtype=dt), 6, (3, 5, 4)),
    (
        "Conv3DTranspose",
        lambda dt: kl.Conv3DTranspose(4, 2, strides=2, padding="same", dtype=dt),
        6,
        (3, 5, 4),
    ),  # fmt: skip
]


def implementations(kind):
    """The implementations of ``kind`` for this backend (fastest first), reference last."""
    return [i for i in dispatch.implementations(kind) if not i.backends or BACKEND in i.backends]


def _fast(kind):
    return [i.name for i in implementations(kind) if i.name != dispatch.REFERENCE]


# ---------------------------------------------------------------------------------- runners
def _weighted_sum(out):
    ops = keras.ops
    weights = ops.reshape(ops.linspace(-1.0, 1.0, int(np.prod(out.shape))), out.shape)
    return ops.sum(ops.cast(out, "float32") * weights)


def _as_numpy(tensors):
    return [np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(t, "float32"))) for t in tensors]


def run(layer, parts, call, graph=False):
    """Forward + backward of ``_weighted_sum(call(layer, parts))`` on this backend, to NumPy:
    ``{"output": [..], "grad": [each part, each trainable variable], "moving": [...]}``."""
    trainable = layer.trainable_variables
    if BACKEND == "jax":
        import jax

        values = [v.value for v in trainable]
        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(xs, values):
            with keras.StatelessScope(
                state_mapping=list(zip(trainable, values, strict=True))
                + list(zip(layer.non_trainable_variables, frozen, strict=True))
            ) as scope:
                out = call(layer, xs)
            updated = [scope.get_current_value(v) for v in layer.non_trainable_variables]
            updated = [u if u is not None else f for u, f in zip(updated, frozen, strict=True)]
            return _weighted_sum(out), (out, updated)

        xs = [jax.numpy.asarray(p) for p in parts]
        grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
        (gx, gw), (out, moving) = grad(xs, values)
        grads = list(gx) + list(gw)
    elif BACKEND == "torch":
        import torch

        xs = [torch.tensor(p, requires_grad=True) for p in parts]
        out = call(layer, xs)
        grads = torch.autograd.grad(_weighted_sum(out), xs + [v.value for v in trainable])
        moving = [v.value for v in layer.non_trainable_variables]
    else:
        import tensorflow as tf

        def step(xs):
            with tf.GradientTape() as tape:
                tape.watch(xs)
                out = call(layer, xs)
                loss = _weighted_sum(out)
            return out, tape.gradient(loss, xs + [v.value for v in trainable])

        out, grads = (tf.function(step) if graph else step)([tf.constant(p) for p in parts])
        moving = [v.value for v in layer.non_trainable_variables]
    return {"output": _as_numpy([out]), "grad": _as_numpy(grads), "moving": _as_numpy(moving)}


def compare(got, want, what, truth=None, folded=False):
    """Assert ``got`` matches ``want`` (float32), or under mixed precision is as accurate as the
    reference ``want`` against the float32 ``truth`` (``folded``: the gradients by FOLDED_MEAN)."""
    for key in ("output", "grad", "moving"):
        assert len(got[key]) == len(want[key]), (what, key)
        for i, (g, w) in enumerate(zip(got[key], want[key], strict=True)):
            assert g.shape == w.shape, (what, key, i, g.shape, w.shape)
            if truth is None:
                atol, rtol = FLOAT32
                bound, err = atol + rtol * float(np.abs(w).max(initial=0)), np.abs(g - w)
            elif folded and key == "grad":
                t = truth[key][i]
                bound, err = FOLDED_MEAN * float(np.abs(t).mean()), np.abs(g - t).mean()
            else:
                t = truth[key][i]
                own = float(np.abs(w - t).max(initial=0))
                bound = MIXED_SLACK * own + MIXED_ULPS * float(np.abs(t).max(initial=0))
                err = np.abs(g - t)
            worst = float(err.max(initial=0))
            assert worst <= bound, f"{what}: {key}[{i}] off by {worst:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------- DoubleConv
def _double_conv(case, dtype, seed=0):
    layer = kl.DoubleConv(case.filters, batch_norm=case.batch_norm, bn_momentum=0.9, dtype=dtype)
    layer.build([(None, None, None, c) for c in case.channels])
    rng = np.random.default_rng(seed)
    for variable in layer.weights:
        variable.assign(_random_value(variable.path.rsplit("/", 1)[-1], variable.shape, rng))
    if case.mode == "frozen":
        layer.bn1.trainable = layer.bn2.trainable = False
    return layer


def _random_value(name, shape, rng):
    """Non-trivial variables: gammas of both signs, betas mostly > 0 (so the zero-padded borders
    matter), moving statistics far from their initial values."""
    if name == "gamma":
        value = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
    elif name == "beta":
        value = rng.normal(0.3, 0.5, shape)
    elif name == "moving_variance":
        value = rng.uniform(0.5, 2.0, shape)
    else:  # kernel, bias, moving_mean
        value = rng.normal(0.0, 0.3 if name == "kernel" else 0.5, shape)
    return value.astype("float32")


def _parts(case, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(2, *case.size, c)).astype("float32") for c in case.channels]


def check_double_conv(name, case, graph=False):
    """Run ``case`` on implementation ``name`` and on the reference; assert they agree."""
    training = case.mode != "infer"

    def call(layer, xs):
        return layer(xs if len(xs) > 1 else xs[0], training=training)

    ours = _double_conv(case, case.dtype)
    ctx = ours.dispatch_context(None, training)._replace(device=_device())
    impl = next(i for i in implementations("DoubleConv") if i.name == name)
    why = dispatch.reason(impl, ours, ctx)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    parts = _parts(case)
    with dispatch.use("DoubleConv", name):
        got = run(ours, parts, call, graph)
    assert dispatch.implementation(ours)["training" if training else "inference"] == name
    with dispatch.use("DoubleConv", dispatch.REFERENCE):
        want = run(_double_conv(case, case.dtype), parts, call, graph)
        truth = None
        if case.dtype != "float32":
            truth = run(_double_conv(case, "float32"), parts, call, graph)
    folded = case.batch_norm and case.mode != "train" and name != dispatch.REFERENCE
    compare(got, want, f"DoubleConv {name} {case}", truth, folded)
    if case.mode == "train" and case.batch_norm:  # the statistics did move
        before = _double_conv(case, "float32").non_trainable_variables[0]
        assert not np.allclose(got["moving"][0], keras.ops.convert_to_numpy(before))


def _device():
    return "cpu" if BACKEND == "torch" else None


@pytest.mark.parametrize("case", DOUBLE_CONV_CASES, ids=str)
@pytest.mark.parametrize("name", _fast("DoubleConv"))
def test_double_conv(name, case):
    check_double_conv(name, case)


@pytest.mark.tensorflow
@pytest.mark.parametrize("case", DOUBLE_CONV_CASES[:8], ids=str)
@pytest.mark.parametrize("name", _fast("DoubleConv"))
def test_double_conv_in_a_tf_function(name, case):
    """What ``fit`` runs on TensorFlow: the implementation traced into a graph."""
    check_double_conv(name, case, graph=True)


# ---------------------------------------------------------------------------------- other layers
def _layer_params():
    for i, (kind, *_) in enumerate(LAYER_CASES):
        for name in _fast(kind):
            for dtype in ("float32", "mixed_float16"):
                yield pytest.param(kind, name, i, dtype, id=f"{kind}-{name}-{i}-{dtype}")


def _single_layer(i, dtype):
    kind, make, cin, size = LAYER_CASES[i]
    layer = make(dtype)
    layer.build((None,) * (len(size) + 1) + (cin,))
    rng = np.random.default_rng(3)
    layer.set_weights([rng.normal(0, 0.3, w.shape).astype("float32") for w in layer.get_weights()])
    return layer


@pytest.mark.parametrize("kind, name, i, dtype", list(_layer_params()))
def test_layer(kind, name, i, dtype):
    _, _, cin, size = LAYER_CASES[i]
    ours = _single_layer(i, dtype)
    impl = next(m for m in implementations(kind) if m.name == name)
    why = dispatch.reason(impl, ours, ours.dispatch_context(None))
    if why is not None:
        pytest.skip(f"{name}: {why}")
    parts = [np.random.default_rng(4).normal(size=(2, *size, cin)).astype("float32")]

    def call(layer, xs):
        return layer(xs[0])

    with dispatch.use(kind, name):
        got = run(ours, parts, call)
    with dispatch.use(kind, dispatch.REFERENCE):
        want = run(_single_layer(i, dtype), parts, call)
        truth = run(_single_layer(i, "float32"), parts, call) if dtype != "float32" else None
    compare(got, want, f"{kind} {name} case {i}", truth)


# ---------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("name", _fast("UNet"))
def test_unet_call(name, make_unet):
    """The UNet's own fast path (torch: the inference replay) gives Keras' functional output."""
    model = make_unet(num_classes=3)
    x = np.random.default_rng(5).random((2, 37, 29, 1)).astype("float32")
    with dispatch.use("UNet", name):
        got = keras.ops.convert_to_numpy(model(keras.ops.convert_to_tensor(x), training=False))
    assert dispatch.implementation(model)["inference"] == name
    with dispatch.use("UNet", dispatch.REFERENCE):
        want = keras.ops.convert_to_numpy(model(keras.ops.convert_to_tensor(x), training=False))
    compare({"output": [got], "grad": [], "moving": []},
            {"output": [want], "grad": [], "moving": []}, f"UNet {name}")  # fmt: skip


@pytest.mark.parametrize("name", _fast("UNet inputs"))
def test_unet_inputs(name, make_unet, binary_data):
    """Array inputs fed another way (TensorFlow: a tf.data pipeline): the same training and
    predictions as Keras' own array handling."""
    images, masks = binary_data
    results = []
    for impl in (name, dispatch.REFERENCE):
        keras.utils.set_random_seed(0)
        model = make_unet()
        with dispatch.use("UNet inputs", impl):
            history = model.fit(images, masks, batch_size=4, epochs=2, shuffle=False, verbose=0)
            results.append((history.history["loss"], model.predict(images, verbose=0)))
        assert dispatch.implementation(model, "UNet inputs")["training"] == impl
    (loss, pred), (ref_loss, ref_pred) = results
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    np.testing.assert_allclose(pred, ref_pred, atol=1e-4)


# ---------------------------------------------------------------------------------- the harness
MUTATIONS = {
    # the pieces of a split kernel handed to the wrong parts
    "swapped kernel slices": (
        "kernel_pieces",
        lambda real: lambda kernel, channels: real(kernel, channels)[::-1],
    ),
    # Keras' momentum rule turned around
    "momentum rule": (
        "update_moving_statistics",
        lambda real: (
            lambda bn, mean, var: real(
                dataclasses.replace(bn, momentum=1.0 - bn.momentum), mean, var
            )
        ),
    ),
    # BN folded without epsilon
    "folding without epsilon": (
        "fold_batch_norm",
        lambda real: (
            lambda kernel, bias, bn: real(kernel, bias, dataclasses.replace(bn, epsilon=0))
        ),
    ),
}
MUTATION_CASES = {
    "swapped kernel slices": Case(channels=(4, 4), size=(5, 5)),
    "momentum rule": Case(),
    "folding without epsilon": Case(mode="infer"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("name", _fast("DoubleConv"))
def test_a_broken_implementation_fails_the_harness(name, mutation, monkeypatch):
    """Mutation check: each fast DoubleConv that uses a piece of the shared math fails the harness
    when that piece is broken (and passes again once it is restored: ``test_double_conv``)."""
    function, breaker = MUTATIONS[mutation]
    case = MUTATION_CASES[mutation]
    if not _uses(name, function):
        pytest.skip(f"{name} does not use conv_bn_math.{function}")
    monkeypatch.setattr(cbm, function, breaker(getattr(cbm, function)))
    with pytest.raises(AssertionError, match="off by"):
        check_double_conv(name, case)


def _uses(name, function):
    """Whether implementation ``name``'s module calls ``conv_bn_math.function``."""
    impl = next(i for i in implementations("DoubleConv") if i.name == name)
    import importlib

    source = Path(importlib.import_module(impl.forward.__module__).__file__).read_text()
    return f"cbm.{function}(" in source


def test_every_implementation_is_exercised():
    """Every registered implementation, of every backend, has harness cases on its own backend:
    its layer type is one the harness parametrizes, its backends are in the nox matrix, and the
    Triton one runs in the ``kernels`` session (under the interpreter)."""
    import importlib.util

    for backend in dispatch.BACKEND_MODULES:
        if importlib.util.find_spec(backend) is not None:  # the matrix installs all three
            dispatch._import_backend(backend)
    covered = {"DoubleConv", "UNet", "UNet inputs"} | {kind for kind, *_ in LAYER_CASES}
    noxfile = (Path(__file__).resolve().parents[1] / "noxfile.py").read_text()
    matrix = ast.literal_eval(noxfile.split("BACKENDS = ", 1)[1].split("\n", 1)[0])
    for kind, impls in dispatch._registry.items():
        assert kind in covered, f"no harness cases for layer type {kind}"
        for impl in impls:
            assert set(impl.backends) <= set(matrix), (impl.name, impl.backends, matrix)
            if impl.fused:
                assert "tests/test_parity.py" in noxfile.split("def kernels", 1)[1], impl.name
    assert len(dispatch._registry["DoubleConv"]) >= 5
