"""Export a kunet model for runtimes without Keras: ONNX (onnxruntime, TensorRT, OpenVINO, ...) and
TensorFlow SavedModel (TF Serving, the TFLite converter), with dynamic batch and spatial sizes.

>>> model.export("unet.onnx", format="onnx")                 # kunet.UNet.export: this module
>>> kunet.export.export(model, "unet_savedmodel", format="tf_saved_model", verify=True)
>>> # kunet export --model run/best.keras --format onnx --out unet.onnx --verify

It is Keras' own export (``keras.Model.export``: tf2onnx on TensorFlow, ``torch.onnx`` on PyTorch,
jax2tf on JAX) with what a kunet model needs around it:

* The graph traced is the plain one (:class:`kunet.dispatch.plain`): no private oneDNN op, torch
  eager replay or Triton kernel ends up in the file.
* A model just loaded from a ``.keras`` file exports (Keras refuses a model that was never called;
  kunet calls it once on a small zero batch first).
* Dynamic H and W (and D) work on every backend: kunet's padding is written so that JAX's shape
  checker can follow it (:func:`kunet.layers.centred_padding`).
* Where the active backend's Keras cannot export a format for a kunet model (:func:`why_not`: ONNX
  under JAX, jax2onnx cannot express padding by a size known only at run time; a 3D model's ONNX
  under PyTorch, torch.onnx cannot export Keras' channels_last_3d convolutions; SavedModel under
  PyTorch, Keras has no such exporter), the model is saved to a temporary ``.keras`` file and exported by a
  subprocess under a backend that can (:data:`NATIVE`), which is told on stderr; with no such
  backend installed, the error names the backends that can.
* Mixed-precision models are exported in float32 (a float32 twin with the same weights): the formats
  are exported from float32 graphs.
* The file (or SavedModel folder) appears whole or not at all, and an existing one is replaced only
  with ``overwrite=True``. ``verify=True`` runs the exported file (onnxruntime / TensorFlow) at two
  input sizes and compares with ``model.predict``.

The tools are an optional extra: ``pip install "kunet[export]"`` (onnx, onnxruntime, tf2onnx,
onnxscript, and TensorFlow for SavedModels and tf2onnx). A missing one is named in the error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import keras
import numpy as np

from kunet import dispatch

FORMATS = ("onnx", "tf_saved_model")
_ALIASES = {"onnx": "onnx", "tf_saved_model": "tf_saved_model", "saved_model": "tf_saved_model"}
# The backends whose Keras exports each format of a kunet model (tested: tests/test_export.py).
NATIVE = {"onnx": ("tensorflow", "torch"), "tf_saved_model": ("tensorflow", "jax")}
# The Python modules each (format, backend) route needs, with the package that provides each.
_TOOLS = {
    ("onnx", "tensorflow"): (
        ("tensorflow", "tensorflow"),
        ("tf2onnx", "tf2onnx"),
        ("onnx", "onnx"),
    ),
    ("onnx", "torch"): (("torch", "torch"), ("onnxscript", "onnxscript"), ("onnx", "onnx")),
    ("tf_saved_model", "tensorflow"): (("tensorflow", "tensorflow"),),
    ("tf_saved_model", "jax"): (("tensorflow", "tensorflow"),),  # jax2tf writes TF graphs
}
_VERIFY_TOOLS = {"onnx": (("onnxruntime", "onnxruntime"),), "tf_saved_model": _TOOLS[
    ("tf_saved_model", "tensorflow")]}  # fmt: skip
_WHY_NOT = {
    ("onnx", "jax"): "Keras exports ONNX under JAX with jax2onnx, which cannot express padding by "
    "a size known only at run time (kunet pads every input to a multiple of 2**depth)",
    ("tf_saved_model", "torch"): "Keras has no SavedModel exporter for the PyTorch backend",
}
TOLERANCE = 1e-4  # verify: max |exported - predict| <= TOLERANCE * max(1, max |predict|)


class ExportError(RuntimeError):
    """The export (or its verification) failed; the message says where and why."""


def export_format(format) -> str:
    """``"onnx"`` or ``"tf_saved_model"`` (``"saved_model"`` is taken for the latter); ValueError
    naming the formats for anything else."""
    fmt = _ALIASES.get(format) if isinstance(format, str) else None
    if fmt is None:
        raise ValueError(
            f"format must be one of 'onnx', 'tf_saved_model' (or 'saved_model'); got {format!r}"
        )
    return fmt


def missing_tools(fmt, backend, verify=False) -> list[str]:
    """The packages (pip names) the ``(fmt, backend)`` route needs that are not installed."""
    needed = list(_TOOLS[(fmt, backend)]) + (list(_VERIFY_TOOLS[fmt]) if verify else [])
    return sorted({pkg for module, pkg in needed if importlib.util.find_spec(module) is None})


def why_not(fmt, backend, spatial_dims=2) -> str | None:
    """Why the ``backend``'s Keras cannot export ``fmt`` for a kunet model of ``spatial_dims``, or
    None when it can."""
    if backend not in NATIVE[fmt]:
        return _WHY_NOT.get((fmt, backend), f"Keras has no {_name(fmt)} exporter for {backend}")
    if (fmt, backend, spatial_dims) == ("onnx", "torch", 3):
        return (
            "Keras' torch Conv3D asks for the channels_last_3d memory format, which "
            "torch.onnx's exporter does not implement"
        )
    return None


def route(fmt, backend=None, spatial_dims=2) -> str:
    """The backend that will export ``fmt`` for a kunet model of ``spatial_dims``: the active one
    where its Keras can, else the first installed one that can (run in a subprocess). ExportError
    naming the backends that can when none is installed."""
    backend = backend or keras.backend.backend()
    if why_not(fmt, backend, spatial_dims) is None:
        return backend
    able = [b for b in NATIVE[fmt] if why_not(fmt, b, spatial_dims) is None]
    for other in able:
        if importlib.util.find_spec(other) is not None:
            return other
    raise ExportError(
        f"{_name(fmt)} export of a kunet model does not run on the {backend} backend "
        f"({why_not(fmt, backend, spatial_dims)}); it runs on {' or '.join(able)}: install one "
        f'(pip install "kunet[export]" brings tensorflow) or export under KERAS_BACKEND={able[0]}'
    )


def _name(fmt):
    return "ONNX" if fmt == "onnx" else "SavedModel"


def _check_tools(fmt, backend, verify):
    missing = missing_tools(fmt, backend, verify)
    if missing:
        raise ModuleNotFoundError(
            f"{_name(fmt)} export on {backend}{' with verify' if verify else ''} needs "
            f'{", ".join(missing)}, not installed: pip install "kunet[export]" '
            f"(or pip install {' '.join(missing)})"
        )


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"export needs a keras.Model; got {type(model).__name__}")
    if not model.built or not model.inputs:
        raise ValueError(
            f"model {model.name!r} is not built: export needs its input shape (build a kunet.UNet, "
            "or call the model on a batch first)"
        )


def _input_spec(model):
    (spec,) = model.inputs  # a kunet model has one input
    return tuple(spec.shape)


def _size_multiple(model):
    return int(getattr(model, "size_multiple", 1) or 1)


def sample_inputs(model, seed=0) -> list[np.ndarray]:
    """Two input batches of different sizes (sizes the model accepts: its fixed ones, else one
    multiple of :attr:`UNet.size_multiple` and one odd size): what ``verify`` compares."""
    shape = _input_spec(model)
    m = _size_multiple(model)
    rng = np.random.default_rng(seed)
    batches = []
    for batch, extra in ((2, 0), (1, m // 2 + 1)):
        dims = [d if d is not None else 2 * m + extra for d in shape[1:-1]]
        scale = 255.0 if getattr(model, "encoder", None) else 1.0  # encoders take 0..255 images
        batches.append((rng.random((batch, *dims, shape[-1])) * scale).astype("float32"))
    return batches


def _called(model):
    """Call ``model`` once (inference) on a small zero batch: Keras exports only a model it has seen
    called, and a model loaded from a ``.keras`` file has not been."""
    shape = _input_spec(model)
    m = _size_multiple(model)
    x = np.zeros((1, *(d if d is not None else m for d in shape[1:-1]), shape[-1]), "float32")
    model(x, training=False)


def _float32(model):
    """``model`` itself when it computes in float32, else a float32 twin with its weights (a kunet
    UNet rebuilt from its config under the float32 policy)."""
    if all(layer.dtype_policy.name == "float32" for layer in model._flatten_layers()):
        return model
    if not hasattr(model, "unet_input_shape"):
        raise ExportError(
            f"model {model.name!r} computes in {model.dtype_policy.name}: export a float32 model "
            "(the exported formats are traced in float32)"
        )
    twin = type(model).from_config({**model.get_config(), "dtype_policy": "float32"})
    twin.set_weights(model.get_weights())
    return twin


def export(model, path, format="onnx", *, overwrite=False, verify=False, verbose=True):
    """Export ``model`` to ``path``: an ``.onnx`` file (``format="onnx"``) or a SavedModel folder
    (``"tf_saved_model"``, alias ``"saved_model"``). See the module docstring for what is done
    around Keras' export. Returns ``path``; with ``verify=True`` also checks the file against
    ``model.predict`` at two input sizes (:func:`verify`) and raises ExportError when they differ.

    Raises: ValueError (unknown format, unbuilt model), FileExistsError (``path`` exists and not
    ``overwrite``), ModuleNotFoundError (an export tool missing, named), ExportError (the export
    failed, or no installed backend can export the format)."""
    fmt = export_format(format)
    _check_model(model)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists: pass overwrite=True (kunet export --overwrite) to replace it"
        )
    if path.exists() and (fmt == "onnx") != path.is_file():
        raise FileExistsError(
            f"{path} exists and is a {'folder' if path.is_dir() else 'file'}; "
            f"{_name(fmt)} export writes a {'file' if fmt == 'onnx' else 'folder'}"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder (the export's parent folder)")
    dims = len(_input_spec(model)) - 2
    backend = route(fmt, spatial_dims=dims)
    _check_tools(fmt, backend, verify)
    with tempfile.TemporaryDirectory(prefix=".kunet-export-", dir=path.parent) as work:
        tmp = Path(work) / ("model.onnx" if fmt == "onnx" else "model_savedmodel")
        if backend == keras.backend.backend():
            _export_here(model, tmp, fmt)
        else:
            if verbose:
                print(
                    f"kunet: note: {_name(fmt)} export runs under the {backend} backend (a "
                    f"subprocess): {why_not(fmt, keras.backend.backend(), dims)}",
                    file=sys.stderr,
                )
            _export_in_subprocess(model, tmp, fmt, backend, Path(work))
        if verify:
            report = _verify_file(tmp, model, fmt)
            if verbose:
                print(_report_line(report))
        _publish(tmp, path)
    if verbose:
        print(f"-> {path}")
    return path


def _export_here(model, tmp, fmt):
    with dispatch.plain():
        plain = _float32(model)
        _called(plain)
        try:
            with warnings.catch_warnings():
                # torch.onnx's tracer warns about every Python int it records (kernel sizes, the
                # crop of a transposed convolution); verify=True checks the result at two sizes
                warnings.filterwarnings(
                    "ignore", message=".*(might cause the trace|registered as constants)"
                )
                keras.Model.export(plain, str(tmp), format=fmt, verbose=False)
        except Exception as e:  # noqa: BLE001 - the exporter's own failure, said in one line
            message = " ".join(str(e).split())[:400]
            raise ExportError(
                f"{_name(fmt)} export on {keras.backend.backend()} failed: "
                f"{type(e).__name__}: {message}"
            ) from e
    if not tmp.exists():
        raise ExportError(f"{_name(fmt)} export on {keras.backend.backend()} wrote nothing")


def _export_in_subprocess(model, tmp, fmt, backend, work):
    source = work / "model.keras"
    model.save(source)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "kunet.export", str(source), str(tmp), fmt],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not tmp.exists():
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])[-600:]
        raise ExportError(f"{_name(fmt)} export under {backend} (subprocess) failed: {tail}")


def _publish(tmp, path):
    """Move the finished export into place: a file by one rename; a folder by renaming any old one
    aside first, then removing it once the new one is in place."""
    if tmp.is_file():
        os.replace(tmp, path)
        return
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=".kunet-old-", dir=path.parent))
        os.replace(path, old / "previous")
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old / "previous", path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def run_exported(path, fmt, x):
    """The exported model's output on ``x`` (NumPy, float32): onnxruntime for ONNX, TensorFlow's
    ``serve`` endpoint for a SavedModel."""
    fmt = export_format(fmt)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (name,) = [i.name for i in session.get_inputs()]
        return np.asarray(session.run(None, {name: x})[0])
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    out = loaded.serve(tf.constant(x))
    if isinstance(out, dict):
        (out,) = out.values()
    return np.asarray(out)


def verify(path, model, format="onnx", inputs=None) -> dict:
    """Run the exported file at ``path`` on :func:`sample_inputs` (or ``inputs``) and compare with
    ``model.predict`` (a mixed-precision model's float32 twin's, which is what was exported):
    ``{shape: max |difference|}``. ExportError when one exceeds
    :data:`TOLERANCE` (relative to the largest output, at least 1)."""
    fmt = export_format(format)
    reference = _float32(model)  # what was exported (a mixed-precision model: its float32 twin)
    report = {}
    for x in inputs if inputs is not None else sample_inputs(model):
        expected = np.asarray(reference.predict(x, verbose=0), dtype="float32")
        got = run_exported(path, fmt, x)
        if got.shape != expected.shape:
            raise ExportError(
                f"exported {_name(fmt)} gives shape {got.shape} on input {x.shape}; "
                f"predict gives {expected.shape}"
            )
        diff = float(np.abs(got - expected).max())
        report[x.shape] = diff
        bound = TOLERANCE * max(1.0, float(np.abs(expected).max()))
        if not diff <= bound:
            raise ExportError(
                f"exported {_name(fmt)} differs from predict on input {x.shape}: max |diff| "
                f"{diff:.3g} > {bound:.3g}"
            )
    return report


_verify_file = verify  # export()'s own `verify` argument shadows the function


def _report_line(report):
    return "verified: " + ", ".join(
        f"input {'x'.join(map(str, shape))} max |diff| {diff:.2g}" for shape, diff in report.items()
    )


def export_file(model_path, out, *, format="onnx", verify=False, overwrite=False):
    """``kunet export``: load the ``.keras`` file and :func:`export` it to ``out``. Bad input (an
    unreadable model, an existing ``out`` without ``overwrite``, a missing tool) is a DataError
    naming it; nothing is written unless the export (and verification) succeeded."""
    from kunet.io import DataError
    from kunet.predict import load_model

    fmt = export_format(format)
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"--out {out} exists: pass --overwrite to replace it")
    model = load_model(model_path)
    try:
        export(model, out, fmt, overwrite=overwrite, verify=verify)
    except (ValueError, FileExistsError, FileNotFoundError, ModuleNotFoundError) as e:
        raise DataError(f"--out {out}: {e}") from None
    except ExportError as e:
        raise DataError(str(e)) from None


def _worker(argv):
    """``python -m kunet.export MODEL.keras OUT FORMAT``: the subprocess :func:`export` runs under
    another backend."""
    source, out, fmt = argv
    import kunet  # noqa: F401 - registers kunet's classes

    model = keras.models.load_model(source)
    _export_here(model, Path(out), fmt)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        _worker(sys.argv[1:])
