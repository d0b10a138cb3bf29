"""kunet.dispatch: the one place that decides which implementation runs each layer with fast paths.

Which path each layer takes and why the faster ones are not (``kunet.explain``), the per-layer cache
and what makes it decide again, registering an implementation, forcing one, the fused policy, the
BatchNormalization options the fast paths refuse, and the TensorFlow import-order warning.
Numerical parity of the implementations: tests/test_parity.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import kunet
from kunet import dispatch
from kunet.layers import DoubleConv, MaxPool2x

BACKEND = keras.backend.backend()
# what each DoubleConv of a UNet runs here on a CPU (encoders read one tensor, decoders two)
EXPECTED = {
    "torch": {"encoder": "torch", "decoder": "torch"},
    "tensorflow": {"encoder": "tensorflow", "decoder": "tensorflow"},
    "jax": {"encoder": "keras", "decoder": "jax"},
}[BACKEND]


def _rows(explanation):
    return {(name, kind): (train, infer, why) for name, kind, train, infer, why in explanation.rows}


def test_explain_lists_every_layer_with_a_fast_path(make_unet):
    model = make_unet(filters=(4, 8))
    rows = _rows(kunet.explain(model))
    kinds = {kind for _, kind in rows}
    assert kinds == {"UNet", "UNet inputs", "DoubleConv", "MaxPool2x", "Conv2DTranspose", "Conv2D"}
    for stage in ("encoder1", "encoder2", "decoder1", "decoder2"):
        train, infer, _ = rows[(f"{stage}_conv", "DoubleConv")]
        assert train == infer == EXPECTED[stage[:7]], (stage, train, infer)
    text = str(kunet.explain(model))
    assert text.splitlines()[0].startswith(f"backend {BACKEND}")
    assert all(f"{name} " in text for name, _ in rows)
    if BACKEND == "torch":  # a CPU: the Triton kernel needs CUDA, and says so
        assert "triton: no CUDA device" in rows[("encoder1_conv", "DoubleConv")][2][0]
        assert rows[("unet", "UNet")][:2] == ("keras", "torch")  # the inference replay
        assert "torch: training (the replay is for inference)" in rows[("unet", "UNet")][2]
    if BACKEND == "jax":
        assert rows[("encoder1_conv", "DoubleConv")][2] == ["jax: one input: nothing to split"]


def test_explain_says_why_a_fast_path_is_not_taken():
    """A BatchNormalization option the fast paths do not implement: the Keras sublayers run, and the
    table names the option for each faster implementation of this backend."""
    inputs = keras.Input((8, 8, 3))
    layer = DoubleConv(4, name="odd")
    layer.build((None, 8, 8, 3))  # the sublayers are made for the input's rank
    layer.bn2.center = False  # BN without beta
    model = keras.Model(inputs, layer(inputs))
    train, infer, why = _rows(kunet.explain(model))[("odd", "DoubleConv")]
    assert train == infer == "keras"
    faster = [i.name for i in dispatch.implementations("DoubleConv") if i.backends == (BACKEND,)]
    unsupported = {"jax": "one input: nothing to split"}.get(
        BACKEND, "BatchNormalization center=False"
    )
    assert why == [f"{name}: {unsupported}" for name in faster] or BACKEND == "torch", why
    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype("float32")
    out = layer(keras.ops.convert_to_tensor(x), training=True)
    assert out.shape == (2, 8, 8, 4) and layer.implementation["training"] == "keras"


@pytest.mark.torch
def test_on_torch_the_table_names_both_reasons():
    inputs = keras.Input((8, 8, 3))
    layer = DoubleConv(4, name="odd")
    layer.build((None, 8, 8, 3))
    layer.bn1.scale = False
    model = keras.Model(inputs, layer(inputs))
    why = _rows(kunet.explain(model))[("odd", "DoubleConv")][2]
    assert why == [
        "triton: BatchNormalization scale=False",
        "torch: BatchNormalization scale=False",
    ]


@pytest.mark.tensorflow
def test_a_synchronized_batch_norm_takes_the_keras_sublayers():
    layer = DoubleConv(4)
    layer.build((None, None, None, 3))
    layer.bn1.synchronized = True
    impl, skipped = dispatch.resolve(layer, layer.dispatch_context(None, True))
    assert impl.name == "keras"
    assert [(i.name, why) for i, why in skipped if i.backends == ("tensorflow",)] == [
        ("tensorflow", "BatchNormalization synchronized=True")
    ]


def test_the_choice_is_made_once_per_context(monkeypatch):
    calls = []
    real = dispatch.resolve
    monkeypatch.setattr(dispatch, "resolve", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    layer = DoubleConv(4)
    x = keras.ops.convert_to_tensor(np.ones((1, 6, 6, 3), "float32"))
    for _ in range(3):
        layer(x, training=True)
    assert len(calls) == 1
    layer(x, training=False)
    assert len(calls) == 2  # a new mode
    layer(x, training=False)
    layer.bn1.trainable = layer.bn2.trainable = False  # frozen BNs: decided again
    layer(x, training=True)
    assert len(calls) == 3 and calls[-1].frozen == (True, True)
    kunet.set_fused(False)  # the policy is part of the context
    try:
        layer(x, training=True)
    finally:
        kunet.set_fused("auto")
    assert len(calls) == 4 and calls[-1].policy is False


def test_building_a_model_records_no_implementation(make_unet):
    model = make_unet()
    for layer in model.layers:
        assert dispatch.implementation(layer) == {}, layer.name


def test_a_registered_implementation_is_picked_up():
    """Adding an implementation is registering it: the layers run it where it supports the call."""
    ran = []

    def supports(layer, ctx):
        return None if ctx.dtype == "float32" else "float32 only"

    @dispatch.register("MaxPool2x", "probe", rank=1, supports=supports, description="a test")
    def probe(layer, x):
        ran.append(tuple(x.shape))
        return keras.ops.max_pool(x, 2, 2)

    try:
        layer = MaxPool2x()
        assert layer(keras.ops.ones((1, 4, 4, 2))).shape == (1, 2, 2, 2)
        assert ran == [(1, 4, 4, 2)] and layer.implementation == {"call": "probe"}
        inputs = keras.Input((4, 4, 2))
        x = MaxPool2x(name="pool")(inputs)
        model = keras.Model(inputs, MaxPool2x(name="half", dtype="mixed_float16")(x))
        rows = _rows(kunet.explain(model))
        assert rows[("pool", "MaxPool2x")][:2] == ("probe", "probe")
        assert rows[("half", "MaxPool2x")][0] != "probe"
        assert "probe: float32 only" in rows[("half", "MaxPool2x")][2]
    finally:
        dispatch._registry["MaxPool2x"] = [
            i for i in dispatch._registry["MaxPool2x"] if i.name != "probe"
        ]
        dispatch._choices.clear()


def test_use_forces_an_implementation_or_says_why_it_cannot():
    layer = DoubleConv(4)
    x = keras.ops.ones((1, 6, 6, 3))
    with dispatch.use("DoubleConv", "keras"):
        layer(x, training=True)
    assert layer.implementation["training"] == "keras"
    other = "jax" if BACKEND != "jax" else "torch"
    with (
        dispatch.use("DoubleConv", other),
        pytest.raises(ValueError, match="KERAS_BACKEND is|no DoubleConv implementation named"),
    ):
        layer(x, training=True)
    layer(x, training=True)  # the override is gone
    assert layer.implementation["training"] == EXPECTED["encoder"]


def test_fused_policy_values():
    assert dispatch.validate_policy("ON") is True and dispatch.validate_policy("auto") == "auto"
    with pytest.raises(ValueError, match="must be 'auto', True or False"):
        dispatch.validate_policy("sometimes", name="UNet(fused=...)")


@pytest.mark.tensorflow
def test_tensorflow_imported_first_with_onednn_off_warns_once_with_the_fix():
    """TensorFlow reads TF_ENABLE_ONEDNN_OPTS when imported: after that kunet can only say so.
    Simulated on any CPU: oneDNN turned off for the import, then the variable removed (as if the
    user never chose)."""
    script = (
        "import os, warnings\n"
        "os.environ['TF_ENABLE_ONEDNN_OPTS'] = '0'\n"
        "import keras, tensorflow\n"
        "del os.environ['TF_ENABLE_ONEDNN_OPTS']\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    import kunet\n"
        "    kunet.dispatch.check_tensorflow_onednn()\n"
        "print([str(w.message) for w in seen if w.category.__name__ == 'PerformanceWarning'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update({"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"})
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    messages = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printed list
    assert len(messages) == 1 and dispatch.ONEDNN_FIX in messages[0]
    # the user's own TF_ENABLE_ONEDNN_OPTS=0, or kunet imported first: nothing to say
    quiet = script.replace("del os.environ['TF_ENABLE_ONEDNN_OPTS']\n", "")
    out = subprocess.run([sys.executable, "-c", quiet], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]
