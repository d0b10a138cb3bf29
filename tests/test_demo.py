"""``kunet demo``: trains end to end on the current backend and writes a loadable model and a figure."""

import contextlib
import io
import os

import keras
import numpy as np
import pytest
from PIL import Image

import kunet
from kunet import cli, demo

SIZE = 32
ZOOM = 4  # demo.save_figure's default
TINY = [
    "--samples",
    "8",
    "--val-samples",
    "4",
    "--size",
    str(SIZE),
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--filters",
    "4,8",
    "--examples",
    "2",
    "--time-budget",
    "0",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny demo run shared by the checks of its outputs: (return code, stdout, out dir)."""
    out = tmp_path_factory.mktemp("demo")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(["demo", "--out", str(out), *TINY])
    return code, buffer.getvalue(), out


def test_demo_succeeds_and_reports_the_dice_and_backend(tiny_run):
    code, stdout, _ = tiny_run
    assert code == 0
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("validation Dice: ")
    dice = float(last.split()[2])
    assert 0.0 <= dice <= 1.0
    assert f"backend {keras.backend.backend()}" in last
    assert "Otsu threshold baseline Dice" in stdout


def test_demo_writes_only_the_model_and_the_figure(tiny_run):
    _, _, out = tiny_run
    assert sorted(os.listdir(out)) == ["demo.png", "model.keras"]  # no partial files left


def test_demo_replaces_its_outputs_only_with_overwrite(tiny_run, tmp_path, capsys):
    _, _, out = tiny_run
    copy = tmp_path / "demo"
    copy.mkdir()
    before = {}
    for name in ("model.keras", "demo.png"):
        before[name] = (out / name).read_bytes()
        (copy / name).write_bytes(before[name])
    assert cli.main(["demo", "--out", str(copy), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds 2 of the 2 files" in err[0] and "--overwrite" in err[0]
    assert {n: (copy / n).read_bytes() for n in before} == before
    (copy / ".kunet-tmp-model-x1y2z3.keras").write_bytes(b"left by a killed demo")
    assert cli.main(["demo", "--out", str(copy), *TINY, "--overwrite", "--seed", "1"]) == 0
    assert (copy / "model.keras").read_bytes() != before["model.keras"]
    assert sorted(os.listdir(copy)) == ["demo.png", "model.keras"]  # the stale temporary is gone


def test_saved_model_loads_and_predicts(tiny_run):
    _, _, out = tiny_run
    model = keras.models.load_model(os.path.join(out, "model.keras"))
    assert isinstance(model, kunet.UNet)
    assert model.filters == (4, 8) and model.num_classes == 1
    images = np.zeros((1, SIZE, SIZE, 1), np.float32)
    assert tuple(model.predict(images, verbose=0).shape) == (1, SIZE, SIZE, 1)


def test_figure_is_a_png_of_three_panels_per_example(tiny_run):
    _, _, out = tiny_run
    with Image.open(os.path.join(out, "demo.png")) as image:
        assert image.format == "PNG"
        assert image.size == (3 * SIZE * ZOOM, 2 * SIZE * ZOOM)  # 3 panels, --examples 2


def test_save_figure_draws_image_truth_and_prediction(tmp_path):
    images = np.zeros((1, 2, 3, 1), np.float32)
    images[0, 0, 0, 0] = 1.0
    truth = np.array([[[0, 1, 0], [0, 0, 0]]], np.uint8)
    prediction = np.array([[[0, 0, 1], [1, 0, 0]]], np.uint8)
    path = tmp_path / "figure.png"
    demo.save_figure(str(path), images, truth, prediction, zoom=2)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape == (2 * 2, 3 * 3 * 2)
    # Undo the zoom by reading the last pixel of every 2 x 2 block (the separators cover the first).
    panels = [pixels[1::2, 6 * j + 1 : 6 * (j + 1) : 2] for j in range(3)]
    np.testing.assert_array_equal(panels[0], images[0, ..., 0] * 255)
    np.testing.assert_array_equal(panels[1], truth[0] * 255)
    np.testing.assert_array_equal(panels[2], prediction[0] * 255)
    assert (pixels[:, 6] == 128).all() and (pixels[:, 12] == 128).all()  # panel separators
    assert sorted(os.listdir(tmp_path)) == ["figure.png"]


def test_require_dice_fails_and_time_budget_stops_training(tmp_path, capsys):
    code = cli.main(
        [
            "demo",
            "--out",
            str(tmp_path),
            *TINY,
            "--epochs",
            "3",
            "--time-budget",
            "0.001",
            "--require-dice",
            "1.01",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 1
    assert "stopped after epoch 1/3" in stdout
    assert "below the required 1.01" in stdout


@pytest.mark.parametrize(
    "bad", [["--filters", "8,x"], ["--filters", "0,8"], ["--epochs", "0"], ["--size", "4"]]
)
def test_bad_options_are_rejected(bad, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", *bad])


def test_help_text_is_the_module_docstring_first_line():
    first = demo.__doc__.splitlines()[0]
    assert first and first.endswith(".")


# ---------------------------------------------------------------------------------- --3d
def test_demo_3d_trains_a_3d_unet_on_volumes(tmp_path):
    buffer = io.StringIO()
    argv = ["demo", "--3d", "--out", str(tmp_path), "--samples", "4", "--val-samples", "2",
            "--size", "16", "--epochs", "1", "--batch-size", "2", "--filters", "4,8",
            "--examples", "2", "--time-budget", "0"]  # fmt: skip
    with contextlib.redirect_stdout(buffer):
        assert cli.main(argv) == 0
    stdout = buffer.getvalue()
    assert "4 + 2 synthetic 16^3 volumes, filters (4, 8)" in stdout
    assert "Otsu threshold baseline Dice" in stdout and "validation Dice: " in stdout
    model = keras.models.load_model(tmp_path / "model.keras")
    assert model.spatial_dims == 3 and model.filters == (4, 8)
    with Image.open(tmp_path / "demo.png") as image:  # one slice per volume: 3 panels x 2 rows
        assert image.size == (3 * 16 * ZOOM, 2 * 16 * ZOOM)
    assert sorted(os.listdir(tmp_path)) == ["demo.png", "model.keras"]


def test_demo_3d_has_its_own_defaults(capsys):
    assert demo.defaults(three_d=True)["size"] == 32 and demo.defaults()["size"] == SIZE * 2
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--3d" in help_text
    assert f"default: 512; with --3d: {demo.DEFAULTS_3D['samples']}" in help_text
    assert "default: 8,16,32; with --3d: 8,16,32" not in help_text  # equal defaults said once
    assert "(default: 8,16,32)" in help_text
