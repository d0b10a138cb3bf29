"""Nothing lost, nothing silent: every way kunet used to destroy a file, train on NaN without a word,
or guess about the data silently, now refused or said (one test per case; each failed before).

Crash consistency (kill -9, Ctrl-C) is in test_faults.py; misspelled keyword arguments in
test_arguments.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tifffile
from PIL import Image
from test_cli import TINY, make_folder

import kunet
from kunet.callbacks import NonFiniteError, TerminateOnNonFinite
from kunet.cli import main
from kunet.outputs import FolderLock
from kunet.run_folder import RunFolder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error(err):
    lines = [line for line in err.strip().splitlines() if not line.startswith("kunet: note: ")]
    assert len(lines) == 1 and lines[0].startswith("kunet: error: "), err
    return lines[0]


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """A trained tiny binary run folder and its data."""
    root = tmp_path_factory.mktemp("lost")
    images, masks = make_folder(root / "data", n=6)
    out = root / "run"
    argv = ["train", "--images", images, "--masks", masks, "--out", out, "--epochs", "1", *TINY]
    assert main([str(a) for a in argv]) == 0
    return images, masks, out


# ---------------------------------------------------------------------------------- never destroy
@pytest.mark.parametrize(
    "where, relation",
    [("images", "is the"), ("images/sub", "is inside the"), ("data", "contains the")],
)
def test_predict_refuses_an_output_folder_at_or_around_the_images(
    model_run, capsys, where, relation
):
    images, _, out = model_run
    before = _bytes(images)
    target = {"images": images, "images/sub": images / "sub", "data": images.parent}[where]
    code, _, err = run(capsys, "predict", "--model", out / "best.keras", "--images", images,
                       "--out", target)  # fmt: skip
    assert code == 2 and f" {relation} images folder " in _error(err)
    assert _bytes(images) == before and not (images / "sub").exists()
    # One image file: its folder counts as the input folder.
    code, _, err = run(capsys, "predict", "--model", out / "best.keras", "--images",
                       images / "im0.png", "--out", images)  # fmt: skip
    assert code == 2 and "is the images folder" in _error(err) and _bytes(images) == before


def test_predict_replaces_existing_files_only_with_overwrite(model_run, tmp_path, capsys):
    images, _, out = model_run
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "im4.png").write_bytes(b"my own im4")
    (pred / "im5_overlay.png").write_bytes(b"my own overlay")
    (pred / "notes.txt").write_text("unrelated")
    argv = ["predict", "--model", out / "best.keras", "--images", images, "--out", pred]
    code, stdout, err = run(capsys, *argv)
    line = _error(err)
    assert code == 2 and "already holds 2 of the 12 files" in line and "--overwrite" in line
    assert "im4.png" in line and "im5_overlay.png" in line and stdout == ""
    assert (pred / "im4.png").read_bytes() == b"my own im4"
    assert sorted(p.name for p in pred.iterdir()) == ["im4.png", "im5_overlay.png", "notes.txt"]
    code, _, err = run(capsys, *argv, "--overwrite", "--quiet")
    assert code == 0 and "kunet: note: --overwrite: replaced 2 existing file(s)" in err
    assert Image.open(pred / "im4.png").size == (48, 40)
    assert (pred / "notes.txt").read_text() == "unrelated" and len(list(pred.iterdir())) == 13


def test_train_refuses_a_run_folder_at_or_around_the_data(model_run, tmp_path, capsys):
    images, masks, _ = model_run
    for out in (images, masks / "run", images.parent):
        before = _bytes(images), _bytes(masks)
        code, _, err = run(capsys, "train", "--images", images, "--masks", masks, "--out", out,
                           *TINY)  # fmt: skip
        assert code == 2 and "folder" in _error(err)
        assert (_bytes(images), _bytes(masks)) == before


def test_train_overwrite_replaces_an_earlier_run(model_run, tmp_path, capsys):
    images, masks, out = model_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "my_notes.txt").write_text("keep me")
    argv = ["train", "--images", images, "--masks", masks, "--out", copy, "--epochs", "1", *TINY]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "already holds a run" in _error(err) and "--overwrite" in err
    code, _, err = run(capsys, *argv, "--overwrite", "--seed", "3")
    assert code == 0 and "--overwrite: removed" in err
    assert json.loads((copy / "state.json").read_text())["seed"] == 3
    assert (copy / "my_notes.txt").read_text() == "keep me"  # only the run's own files go
    code, _, err = run(capsys, *argv, "--overwrite", "--resume")
    assert code == 2 and "not both" in _error(err)


# ---------------------------------------------------------------------------------- NaN refused
def _tiff_folder(root, nan_at=()):
    """8 float32 TIFF images (+ PNG masks); one NaN pixel in each image of ``nan_at``."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(8):
        mask = np.zeros((32, 32), "uint8")
        mask[8:20, 6 + i : 18 + i] = 1
        image = (mask + 0.3 * rng.random((32, 32))).astype("float32")
        if i in nan_at:
            image[5, 7] = np.nan
        tifffile.imwrite(root / "images" / f"t{i}.tif", image)
        Image.fromarray(mask).save(root / "masks" / f"t{i}.png")
    return root / "images", root / "masks"


def test_train_refuses_a_nan_pixel_naming_the_file(tmp_path, capsys):
    train_images, _ = kunet.data.split(list(range(8)), 0.2, seed=0)
    images, masks = _tiff_folder(tmp_path / "data", nan_at=[train_images[1]])  # a training image
    bad = f"t{train_images[1]}.tif"
    argv = ["train", "--images", images, "--masks", masks, "--epochs", "1", *TINY]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "run")
    line = _error(err)
    assert code == 2 and bad in line and "1 NaN/inf value(s)" in line and "--nan-policy" in line
    assert not (tmp_path / "run").exists()
    # --nan-policy zero: trains; ignore: the NaN reaches the loss and stops the run at once,
    # keeping the last good (initial) state instead of a dead model.
    assert run(capsys, *argv, "--out", tmp_path / "zero", "--nan-policy", "zero")[0] == 0
    images, masks = _tiff_folder(tmp_path / "all_nan", nan_at=range(8))
    argv = ["train", "--images", images, "--masks", masks, "--epochs", "1", *TINY]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "ignore", "--nan-policy", "ignore")
    line = _error(err)
    assert code == 1 and "the loss is nan" in line and "keeps the last good epoch (0)" in line
    assert RunFolder(tmp_path / "ignore").problems() == []


def test_predict_and_evaluate_refuse_a_nan_image(model_run, tmp_path, capsys):
    _, _, out = model_run
    images, masks = _tiff_folder(tmp_path / "data", nan_at=[5])
    pred = tmp_path / "pred"
    code, _, err = run(capsys, "predict", "--model", out / "best.keras", "--images", images,
                       "--out", pred)  # fmt: skip
    assert code == 2 and "t5.tif" in _error(err) and not pred.exists()
    code, _, err = run(capsys, "evaluate", "--model", out / "best.keras", "--images", images,
                       "--masks", masks)  # fmt: skip
    assert code == 2 and "t5.tif" in _error(err)


def test_load_folder_refuses_a_nan_pixel(tmp_path):
    images, masks = _tiff_folder(tmp_path / "data", nan_at=[2])
    with pytest.raises(kunet.io.DataError, match=r"t2\.tif holds 1 NaN/inf value\(s\) \(of 1024\)"):
        kunet.data.load_folder(images, masks, num_classes=2)
    data = kunet.data.load_folder(images, masks, num_classes=2, nan_policy="zero")
    assert all(np.isfinite(s.image).all() for s in data.samples)


@pytest.mark.tensorflow
def test_the_nan_guard_does_not_depend_on_onednn_or_import_order(tmp_path):
    """TensorFlow with oneDNN off, Keras imported before kunet: the same stop at the NaN batch."""
    script = tmp_path / "run.py"
    script.write_text(
        "import keras, numpy as np, kunet\n"
        "from kunet.callbacks import NonFiniteError\n"
        "x = np.random.default_rng(0).random((8, 32, 32, 1)).astype('float32')\n"
        "y = (x[..., 0] > 0.5).astype('float32')\n"
        "class B(keras.utils.PyDataset):\n"
        "    def __len__(self): return 2\n"
        "    def __getitem__(self, i):\n"
        "        b = x[4 * i:4 * i + 4].copy(); b[0, 0, 0, 0] = np.nan if i else 0\n"
        "        return b, y[:4]\n"
        "m = kunet.UNet(num_classes=1, filters=(4, 8), input_shape=(None, None, 1))\n"
        "try:\n"
        "    m.fit(B(), epochs=1, verbose=0, shuffle=False)\n"
        "except NonFiniteError as e:\n"
        "    print('stopped:', e)\n"
    )
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "KERAS_BACKEND": "tensorflow"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert "stopped: training stopped at epoch 1, batch 2: the loss is nan" in proc.stdout, (
        proc.stdout + proc.stderr[-2000:]
    )


def test_normalize_does_not_spread_a_nan():
    image = np.random.default_rng(0).random((16, 16, 1)).astype("float32")
    clean = kunet.io.normalize(image)
    image[3, 4, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN/inf value\(s\) \(of 256\)"):
        kunet.io.normalize(image)
    zeroed = kunet.io.normalize(image, nan_policy="zero")
    assert np.isfinite(zeroed).all() and zeroed[3, 4, 0] == 0.0
    kept = kunet.io.normalize(image, nan_policy="ignore")
    assert np.isnan(kept[3, 4, 0]) and np.isfinite(np.delete(kept.ravel(), 3 * 16 + 4)).all()
    assert np.abs(kept[np.isfinite(kept)] - np.delete(clean.ravel(), 3 * 16 + 4)).max() < 0.02


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    x = rng.random((8, 32, 32, 1)).astype("float32")
    return x, (x[..., 0] > 0.5).astype("float32")


def test_fit_evaluate_predict_refuse_nan_arrays_naming_the_index(make_unet, arrays):
    x, y = arrays
    bad = x.copy()
    bad[3, 1, 2, 0] = np.nan
    bad[5, 0, 0, 0] = np.inf
    model = make_unet()
    before = [w.copy() for w in model.get_weights()]
    pattern = r"x\[3\] holds 1 NaN/inf value\(s\).*2 of the 8 images do \(3, 5\)"
    for call in (
        lambda: model.fit(bad, y, epochs=1, verbose=0),
        lambda: model.evaluate(bad, y, verbose=0),
        lambda: model.predict(bad, verbose=0),
        lambda: model.fit(x, y, validation_data=(bad, y), epochs=1, verbose=0),
    ):
        with pytest.raises(ValueError, match=pattern.replace("x", "(x|validation_data)", 1)):
            call()
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    history = model.fit(bad, y, epochs=1, verbose=0, nan_policy="zero")
    assert np.isfinite(history.history["loss"][0])
    assert np.isfinite(model.predict(bad, verbose=0, nan_policy="zero")).all()


class _Batches(keras.utils.PyDataset):
    """Two batches; the second holds one NaN pixel."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return 2

    def __getitem__(self, i):
        x = self.x[4 * i : 4 * i + 4].copy()
        if i == 1:
            x[2, 3, 3, 0] = np.nan
        return x, self.y[4 * i : 4 * i + 4]


def test_a_nan_batch_in_a_dataset_stops_training_at_that_batch(make_unet, arrays):
    """On every backend and whatever the kernels do with NaN (on TensorFlow's oneDNN kernels the
    loss used to stay finite while the weights became NaN)."""
    x, y = arrays
    model = make_unet()
    with pytest.raises(NonFiniteError, match="epoch 1, batch 2: the loss is nan"):
        model.fit(_Batches(x, y), epochs=2, verbose=0, shuffle=False)
    with pytest.raises(NonFiniteError):  # also when the caller passed callbacks of their own
        make_unet().fit(
            _Batches(x, y),
            epochs=1,
            verbose=0,
            shuffle=False,
            callbacks=[keras.callbacks.History()],
        )
    with pytest.raises(ValueError, match="nan_policy='zero' replaces NaN/inf in arrays, but x is"):
        make_unet().fit(_Batches(x, y), epochs=1, verbose=0, nan_policy="zero")
    # Keras' own TerminateOnNaN, when given, is left to do its job (stop without raising).
    history = make_unet().fit(
        _Batches(x, y),
        epochs=2,
        verbose=0,
        shuffle=False,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    assert len(history.history["loss"]) == 1 and np.isnan(history.history["loss"][0])


def test_weights_turning_nan_with_a_finite_loss_stop_training(make_unet, arrays):
    x, y = arrays

    class PoisonMovingVariance(keras.callbacks.Callback):  # unused by the training loss
        def on_epoch_end(self, epoch, logs=None):
            bn = self.model.get_layer("encoder1_conv").bn1
            bn.moving_variance.assign(np.full(bn.moving_variance.shape, np.nan, "float32"))

    guard = TerminateOnNonFinite()
    with pytest.raises(NonFiniteError, match="end of epoch 1: 1 variable.*moving_variance"):
        make_unet().fit(x, y, epochs=3, verbose=0, callbacks=[PoisonMovingVariance(), guard])


# ---------------------------------------------------------------------------------- crash leftovers
def test_a_kunet_0_1_0_run_folder_resumes_without_duplicated_epochs(model_run, tmp_path, capsys):
    """kill -9 during 0.1.0's checkpoint save left state.json at epoch 1 and history.csv with two
    rows, plus an orphan temporary checkpoint; the next run cleans and continues it."""
    images, masks, out = model_run
    legacy = tmp_path / "run"
    shutil.copytree(out, legacy)
    state = json.loads((legacy / "state.json").read_text())
    for key in ("history", "checkpoints"):
        state.pop(key)
    (legacy / "state.json").write_text(json.dumps(state))
    with open(legacy / "history.csv") as f:
        rows = f.read().splitlines()
    (legacy / "history.csv").write_text("\n".join([*rows, rows[1].replace("0,", "1,", 1)]) + "\n")
    (legacy / ".last-k3j4_x9a.keras").write_bytes(b"half a checkpoint")
    code, _, err = run(capsys, "train", "--images", images, "--masks", masks, "--out", legacy,
                       "--epochs", "2", "--resume", *TINY)  # fmt: skip
    assert code == 0, err
    assert "removed 1 temporary file(s)" in err
    assert RunFolder(legacy).problems() == []
    with open(legacy / "history.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]
    assert not (legacy / ".last-k3j4_x9a.keras").exists()


# ---------------------------------------------------------------------------------- say the guesses
def test_inferred_classes_are_said_even_under_quiet(tmp_path, capsys):
    images, masks = make_folder(tmp_path / "data", n=3, classes=6)
    argv = ["train", "--images", images, "--masks", masks, "--epochs", "1", *TINY]
    code, stdout, err = run(capsys, *argv, "--out", tmp_path / "run")
    assert code == 0 and stdout == ""
    assert "kunet: note: 6 classes inferred from the masks (labels 0..5)" in err
    code, _, err = run(capsys, *argv, "--out", tmp_path / "strict", "--strict")
    assert code == 2 and "6 classes inferred" in _error(err) and "--strict" in err
    code, _, err = run(capsys, *argv, "--out", tmp_path / "binary", "--num-classes", "1")
    assert code == 2 and "values 0, " in _error(err) and "must be binary" in err


def test_channel_conversions_and_mask_mappings_are_said(model_run, tmp_path, capsys):
    _, _, out = model_run
    images, masks = make_folder(tmp_path / "data", n=3)
    rgba = np.asarray(Image.open(images / "im0.png").convert("RGBA"))
    Image.fromarray(rgba, mode="RGBA").save(images / "im0.png")
    argv = ["train", "--images", images, "--masks", masks, "--epochs", "1", *TINY]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "run")
    assert code == 0
    assert "kunet: note: alpha channel dropped (RGBA -> RGB): 1 file(s) (im0.png)" in err
    assert "kunet: note: mask values 0/255 read as 0/1 (binary): 3 file(s)" in err
    assert "gray image repeated to 3 channels" in err  # im1, im2 beside an RGB image
    code, _, err = run(capsys, *argv, "--out", tmp_path / "strict", "--strict", "--num-classes",
                       "2")  # fmt: skip
    assert code == 2 and "refused under --strict" in _error(err)
    # RGB into the 1-channel model: predict says it converted to gray
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(rgba[..., :3]).save(rgb / "c.png")
    code, _, err = run(capsys, "predict", "--model", out / "best.keras", "--images", rgb,
                       "--out", tmp_path / "pred", "--quiet")  # fmt: skip
    assert code == 0 and "RGB image converted to gray (luminance) for a 1-channel model" in err


def test_load_folder_warns_what_it_guessed(tmp_path):
    images, masks = make_folder(tmp_path / "data", n=2, classes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = kunet.data.load_folder(images, masks)
    said = [str(w.message) for w in caught if issubclass(w.category, kunet.io.GuessWarning)]
    assert said == ["3 classes inferred from the masks (labels 0..2); set the number of classes "
                    "(--num-classes / num_classes=) if that is wrong"]  # fmt: skip
    assert data.notes == said
    with pytest.raises(kunet.io.DataError, match="refused under --strict"):
        kunet.data.load_folder(images, masks, guesses=kunet.io.Guesses(strict=True))


def test_tiled_and_whole_image_prediction_check_channels(make_unet):
    model = make_unet(input_shape=(None, None, 3))
    gray = np.zeros((40, 40, 1), "float32")
    for call in (
        lambda: kunet.inference.predict_tiled(model, gray, tile_size=16),
        lambda: kunet.inference.predict_image(model, gray),
    ):
        with pytest.raises(ValueError, match=r"image has 1 channel\(s\).*model expects 3"):
            call()
    image = np.zeros((40, 40, 3), "float32")
    image[1, 1, 1] = np.inf
    for call in (
        lambda: kunet.inference.predict_tiled(model, image, tile_size=16),
        lambda: kunet.inference.predict_image(model, image),
    ):
        with pytest.raises(ValueError, match=r"image holds 1 NaN/inf value\(s\)"):
            call()
    probs = kunet.inference.predict_image(model, image, nan_policy="zero")
    assert np.isfinite(probs).all()


def test_one_kunet_process_writes_into_a_folder_at_a_time(model_run, tmp_path, capsys):
    images, _, out = model_run
    pred = tmp_path / "pred"
    pred.mkdir()
    with FolderLock(pred):  # as another kunet process would hold it
        code, _, err = run(capsys, "predict", "--model", out / "best.keras", "--images", images,
                           "--out", pred)  # fmt: skip
    assert code == 2 and "is in use by another kunet process" in _error(err)
    assert sorted(p.name for p in pred.iterdir()) == []


def test_a_file_that_is_not_a_keras_archive_is_named_so(model_run, tmp_path, capsys):
    images, _, _ = model_run
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    code, _, err = run(capsys, "predict", "--model", junk, "--images", images, "--out",
                       tmp_path / "pred")  # fmt: skip
    assert code == 2 and f"{junk}: not a .keras file" in _error(err) and "File not found" not in err
