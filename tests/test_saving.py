"""Saving: .keras and .weights.h5 round trips, and loading across backends (in subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
from conftest import BACKENDS

import kunet

BACKEND = keras.backend.backend()


def _trained(make_unet, data, **kwargs):
    model = make_unet(**kwargs)
    model.fit(*data, epochs=1, batch_size=4, verbose=0)
    return model


def test_keras_round_trip_identical(tmp_path, make_unet, multiclass_data):
    model = _trained(make_unet, multiclass_data, num_classes=3, upsampling="bilinear")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: importing kunet registers all
    assert isinstance(loaded, kunet.UNet)
    assert loaded.get_config() == model.get_config()
    x = multiclass_data[0][:2]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # compiled state comes back: same loss/metrics classes, optimizer state restored
    assert isinstance(loaded.loss, kunet.losses.CEDice)
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) > 0
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert loaded.fit(*multiclass_data, epochs=1, verbose=0).history["dice"]


def test_untrained_model_loads_without_optimizer_warning(tmp_path, make_unet, binary_data):
    """A model saved before training has no optimizer state: loading it builds no optimizer (Keras
    would warn that the saved optimizer's 2 variables do not match a built one's), and it trains."""
    make_unet().save(tmp_path / "new.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = keras.models.load_model(tmp_path / "new.keras")
    assert not loaded.optimizer.built
    loaded.fit(*binary_data, epochs=1, batch_size=4, verbose=0)
    assert int(loaded.optimizer.iterations) == 2


def test_weights_round_trip(tmp_path, make_unet, binary_data):
    model = _trained(make_unet, binary_data)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    other = make_unet()
    other.load_weights(path)
    x = binary_data[0][:2]
    np.testing.assert_array_equal(other.predict(x, verbose=0), model.predict(x, verbose=0))


DATA = os.path.join(os.path.dirname(__file__), "data")


def test_loads_a_model_saved_by_kunet_0_1_0():
    """A .keras file written by kunet 0.1.0 at f57b030 (torch backend), when each decoder still had a
    Concatenate layer before its DoubleConv, loads here and predicts the logits it predicted then.
    Random weights and BN statistics; input 24x40 (padded to 28x40 inside the graph)."""
    model = keras.saving.load_model(os.path.join(DATA, "unet_0.1.0_f57b030.keras"))
    saved = np.load(os.path.join(DATA, "unet_0.1.0_f57b030.npz"))
    logits = model.predict(saved["x"], verbose=0)
    assert logits.shape == saved["logits"].shape == (2, 24, 40, 2)
    scale = float(np.abs(saved["logits"]).max())
    np.testing.assert_allclose(logits, saved["logits"], atol=1e-5 * scale, rtol=0)


def test_compile_config_is_backend_neutral(make_unet):
    config = make_unet().get_compile_config()
    assert config["optimizer"]["module"] == "keras.optimizers"
    assert config["jit_compile"] == "auto"
    assert "backend" not in json.dumps(config)


_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, keras, kunet
    path, x_path, out_path = sys.argv[1:4]
    model = keras.models.load_model(path)
    x = np.load(x_path)
    np.save(out_path, np.asarray(model.predict(x, verbose=0)))
    # the compiled state came along: it evaluates and trains one more step
    y = np.load(x_path.replace("x.npy", "y.npy"))
    assert isinstance(model.loss, kunet.losses.CEDice), model.loss
    model.fit(x, y, epochs=1, verbose=0)
    print("loaded under", keras.backend.backend(), "optimizer step", int(model.optimizer.iterations))
    """
)


@pytest.mark.parametrize("target", [b for b in BACKENDS if b != BACKEND])
def test_saved_here_loads_under_other_backend(tmp_path, make_unet, multiclass_data, target):
    """Each backend's session covers its two outgoing pairs: all six pairs over the matrix."""
    model = _trained(make_unet, multiclass_data, num_classes=3)
    model.save(tmp_path / "m.keras")
    x = multiclass_data[0][:3]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", multiclass_data[1][:3])
    expected = model.predict(x, verbose=0)
    env = {**os.environ, "KERAS_BACKEND": target, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_SCRIPT,
            str(tmp_path / "m.keras"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "out.npy"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded under {target}" in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-4)
