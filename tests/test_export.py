"""Export (kunet.export, UNet.export, ``kunet export``): ONNX run in onnxruntime and SavedModels run
in TensorFlow match ``predict`` within 1e-4 at two input sizes, for models loaded from ``.keras``
files, on every backend (where the backend's Keras cannot, through a subprocess under one that can);
bad input is named and nothing is written."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import kunet
from kunet import export as kexport
from kunet.cli import main

BACKEND = keras.backend.backend()
FORMATS = ("onnx", "tf_saved_model")


def _loaded(tmp_path, model, name="model"):
    """``model`` saved and loaded back: the deploy flow (a model that was never called)."""
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return keras.models.load_model(path)


def _check_matches(path, model, fmt, inputs=None):
    """The exported file's outputs against predict, at two input sizes, with an independent check
    (not kexport.verify)."""
    inputs = inputs if inputs is not None else kexport.sample_inputs(model, seed=1)
    assert len({x.shape[1:-1] for x in inputs}) == 2  # two different spatial sizes
    for x in inputs:
        want = np.asarray(model.predict(x, verbose=0))
        got = kexport.run_exported(path, fmt, x)
        assert got.shape == want.shape, (got.shape, want.shape)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_loaded_model_exports_and_matches_predict(tmp_path, fmt):
    model = kunet.UNet(num_classes=3, filters=(4, 8, 16), input_shape=(None, None, 2))
    loaded = _loaded(tmp_path, model)
    out = tmp_path / ("unet.onnx" if fmt == "onnx" else "unet_savedmodel")
    assert loaded.export(out, format=fmt) == out  # UNet.export -> kunet.export.export
    assert out.is_file() if fmt == "onnx" else (out / "saved_model.pb").is_file()
    _check_matches(out, loaded, fmt)
    # sizes the signature never saw: batch 3, odd and unequal sides
    x = np.random.default_rng(2).random((3, 37, 45, 2)).astype("float32")
    _check_matches(out, loaded, fmt, inputs=[x, x[:1, :21, :30]])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".kunet")]  # no temporaries left


# Each backend exports the family with its own Keras exporter (the subprocess routes are covered
# above): the variants whose graphs differ (3D, deep supervision's one inference output, gates,
# bilinear up-sampling, nested skips, residual shortcuts).
NATIVE_FORMAT = {"tensorflow": "onnx", "torch": "onnx", "jax": "tf_saved_model"}
FAMILY = {
    "unet3d": dict(spatial_dims=3, filters=(2, 4), num_classes=2, input_shape=(None, None, None, 1)),
    "residual_attention_bilinear_ds": dict(
        block="residual", attention=True, upsampling="bilinear", deep_supervision=True,
        filters=(4, 8), input_shape=(None, None, 1),
    ),
    "unet++": dict(skips="nested", deep_supervision=True, filters=(4, 8), input_shape=(None, None, 1)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_exports_with_dynamic_sizes(tmp_path, name):
    fmt = NATIVE_FORMAT[BACKEND]
    model = _loaded(tmp_path, kunet.UNet(**FAMILY[name]))
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m_savedmodel")
    kexport.export(model, out, fmt, verbose=False)
    _check_matches(out, model, fmt)  # one output: the main head, also for deep supervision


def test_mixed_precision_model_exports_its_float32_twin(tmp_path):
    fmt = NATIVE_FORMAT[BACKEND]
    model = kunet.UNet(filters=(4, 8), input_shape=(None, None, 1), dtype_policy="mixed_bfloat16")
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m_savedmodel")
    kexport.export(model, out, fmt, verify=True, verbose=False)
    report = kexport.verify(out, model, fmt)
    assert max(report.values()) < 1e-4  # against the float32 twin: what the file computes
    x = kexport.sample_inputs(model)[0]
    mixed = np.asarray(model.predict(x, verbose=0))
    assert np.abs(kexport.run_exported(out, fmt, x) - mixed).max() < 0.05  # bfloat16 rounding


def test_fast_paths_are_not_traced(tmp_path, monkeypatch):
    """Export traces inside dispatch.plain(): every layer's chosen implementation is Keras'."""
    model = kunet.UNet(filters=(4, 8), input_shape=(None, None, 1))
    chosen = []
    real = kunet.dispatch.resolve

    def spy(layer, ctx, kind=None):
        impl, skipped = real(layer, ctx, kind)
        chosen.append(impl.name)
        return impl, skipped

    monkeypatch.setattr(kunet.dispatch, "resolve", spy)
    fmt = NATIVE_FORMAT[BACKEND]
    kexport.export(model, tmp_path / "m", fmt, verbose=False)
    assert chosen and set(chosen) == {kunet.dispatch.REFERENCE}
    chosen.clear()
    model.predict(np.zeros((1, 8, 8, 1), "float32"), verbose=0)  # outside export: fast paths again
    assert set(chosen) - {kunet.dispatch.REFERENCE}


@pytest.mark.torch
def test_encoder_model_exports(tmp_path):
    model = kunet.UNet(encoder="mobilenetv2", encoder_weights=None, input_shape=(None, None, 3),
                       decoder_filters=(8, 8, 4, 4, 4))  # fmt: skip
    out = tmp_path / "enc.onnx"
    kexport.export(_loaded(tmp_path, model), out, "onnx", verbose=False)
    _check_matches(out, model, "onnx")


# ---------------------------------------------------------------------------------- bad input
def test_unknown_format_is_named_and_nothing_written(tmp_path):
    model = kunet.UNet(filters=(4, 8), input_shape=(None, None, 1))
    with pytest.raises(
        ValueError, match="format must be one of 'onnx', 'tf_saved_model'.*'tflite'"
    ):
        kexport.export(model, tmp_path / "m", "tflite")
    assert os.listdir(tmp_path) == []


def test_unbuilt_model_is_refused(tmp_path):
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="is not built"):
        kexport.export(Net(), tmp_path / "m.onnx", "onnx")
    assert os.listdir(tmp_path) == []


def test_existing_output_is_kept_without_overwrite(tmp_path):
    model = kunet.UNet(filters=(4, 8), input_shape=(None, None, 1))
    out = tmp_path / "m.onnx"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        kexport.export(model, out, "onnx")
    assert out.read_bytes() == b"mine"
    if NATIVE_FORMAT[BACKEND] == "onnx":
        kexport.export(model, out, "onnx", overwrite=True, verbose=False)
        assert out.read_bytes() != b"mine"


def test_missing_tool_is_named(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    model = kunet.UNet(filters=(4, 8), input_shape=(None, None, 1))
    with pytest.raises(ModuleNotFoundError, match=r"needs onnxruntime.*kunet\[export\]"):
        kexport.export(model, tmp_path / "m.onnx", "onnx", verify=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt, backend", [("onnx", "jax"), ("tf_saved_model", "torch")])
def test_no_backend_that_can_export_is_named(monkeypatch, fmt, backend):
    import importlib.util

    real = importlib.util.find_spec
    frameworks = ("tensorflow", "jax", "torch")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in frameworks else real(name, *a)
    )
    with pytest.raises(
        kexport.ExportError, match=f"does not run on the {backend} backend.*runs on"
    ):
        kexport.route(fmt, backend)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def broken(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(keras.Model, "export", broken)
    model = kunet.UNet(filters=(4, 8), input_shape=(None, None, 1))
    fmt = NATIVE_FORMAT[BACKEND]
    with pytest.raises(kexport.ExportError, match="disk full"):
        kexport.export(model, tmp_path / "m.onnx", fmt)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------- the command
def test_cli_export_verify_and_refusals(tmp_path, capsys):
    model = kunet.UNet(num_classes=2, filters=(4, 8), input_shape=(None, None, 1))
    model.save(tmp_path / "best.keras")
    fmt = "onnx" if NATIVE_FORMAT[BACKEND] == "onnx" else "saved_model"
    out = tmp_path / ("unet.onnx" if fmt == "onnx" else "unet_savedmodel")
    argv = ["export", "--model", tmp_path / "best.keras", "--format", fmt, "--out", out]
    assert main([*argv, "--verify"]) == 0
    said = capsys.readouterr().out
    assert "verified: input 2x8x8x1 max |diff|" in said and "input 1x11x11x1" in said
    stamp = os.stat(out).st_mtime_ns
    assert main(argv) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert os.stat(out).st_mtime_ns == stamp
    assert main([*argv, "--overwrite"]) == 0

    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    bad = tmp_path / "never.onnx"
    assert (
        main(["export", "--model", tmp_path / "broken.keras", "--format", "onnx", "--out", bad])
        == 2
    )
    assert "broken.keras: not a .keras file" in capsys.readouterr().err
    assert not bad.exists()
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", tmp_path / "best.keras", "--format", "tflite", "--out", bad])
    assert e.value.code == 2 and not bad.exists()
