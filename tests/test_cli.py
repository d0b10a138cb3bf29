"""``kunet train | predict | evaluate`` on small generated folders, and every kind of bad input.

Each bad input must end with exit status 2, one line ``kunet: error: ...`` naming the file on stderr,
no traceback and nothing left in the output folder.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from kunet.cli import main

TINY = ["--patch-size", "32", "--batch-size", "4", "--filters", "4", "8", "--quiet"]


def make_folder(root, n=4, size=(40, 48), classes=2, seed=0):
    """images/ + masks/ of bright disks on noise: 0/255 masks if binary, else palette masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[: size[0], : size[1]]
    for i in range(n):
        mask = np.zeros(size, "uint8")
        for c in range(1, classes):
            for _ in range(2):
                cy, cx = rng.uniform(8, size[0] - 8), rng.uniform(8, size[1] - 8)
                mask[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(16, 49)] = c
        image = (70 * mask + rng.normal(40, 8, size)).clip(0, 255).astype("uint8")
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        if classes == 2:
            Image.fromarray(mask * 255).save(root / "masks" / f"im{i}.png")
        else:
            pal = Image.fromarray(mask, mode="P")
            pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
            pal.save(root / "masks" / f"im{i}.png")
    return root / "images", root / "masks"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short binary run shared by the workflow tests: train 2 epochs."""
    root = tmp_path_factory.mktemp("workflow")
    images, masks = make_folder(root / "data", n=5)
    out = root / "run"
    code = main(
        [
            "train",
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--val-split",
            "0.4",  # the plan holds none out from 5 images
            *TINY,
        ]
    )
    assert code == 0
    return images, masks, out


# ---------------------------------------------------------------------------------- workflow
def test_train_writes_the_run_folder(trained):
    _, _, out = trained
    for name in ("best.keras", "last.keras", "state.json", "history.csv", "history.png"):
        assert (out / name).is_file(), name
    assert list((out / "overlays").glob("*.png"))
    state = json.loads((out / "state.json").read_text())
    assert state["epoch"] == 2 and state["num_classes"] == 2 and state["best_epoch"] in (1, 2)
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "val_dice" in rows[0]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_without_held_out_images_every_image_trains_and_best_is_the_latest(tmp_path, capsys):
    images, masks = make_folder(tmp_path / "data", n=3)
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--masks", masks, "--out", out, "--epochs", "2"]
    code, stdout, _ = run(capsys, *argv, *TINY[:-1])
    assert code == 0 and "no images held out for validation" in stdout
    state = json.loads((out / "state.json").read_text())
    assert state["best_epoch"] == 2 and state["monitor"] is None
    assert len(state["train_images"]) == 3 and "val_dice" not in state["history"][0]
    assert (out / "best.keras").read_bytes() == (out / "last.keras").read_bytes()


def test_predict_writes_masks_and_overlays(trained, tmp_path, capsys):
    images, _, run_dir = trained
    out = tmp_path / "pred"
    code, stdout, _ = run(
        capsys,
        "predict",
        "--model",
        run_dir / "best.keras",
        "--images",
        images,
        "--out",
        out,
        "--tile-size",
        "32",
    )
    assert code == 0 and "im0.png" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [f"im{i}.png" for i in range(5)] + [f"im{i}_overlay.png" for i in range(5)]
    )
    mask = np.asarray(Image.open(out / "im0.png"))
    assert mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 1}
    assert Image.open(out / "im0_overlay.png").mode == "RGB"
    # One file works too, with TTA.
    code, _, _ = run(
        capsys,
        "predict",
        "--model",
        run_dir / "best.keras",
        "--images",
        images / "im1.png",
        "--out",
        tmp_path / "one",
        "--tta",
    )
    assert code == 0 and (tmp_path / "one" / "im1.png").is_file()


def test_evaluate_prints_scores_and_json_last(trained, capsys):
    images, masks, run_dir = trained
    code, stdout, _ = run(
        capsys,
        "evaluate",
        "--model",
        run_dir / "best.keras",
        "--images",
        images,
        "--masks",
        masks,
        "--json",
    )
    assert code == 0
    scores = json.loads(stdout.strip().splitlines()[-1])
    assert set(scores["dice"]) == {"0", "1"} and set(scores["iou"]) == {"0", "1"}
    assert scores["mean_dice"] == scores["dice"]["1"]
    assert 0.0 <= scores["mean_iou"] <= scores["mean_dice"] <= 1.0
    assert "fg mean" in stdout
    assert sorted(scores["per_image_dice"]) == [f"im{i}" for i in range(5)]


def test_resume_continues_the_run(trained, tmp_path, capsys):
    images, masks, run_dir = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for p in run_dir.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    code, _, err = run(
        capsys,
        "train",
        "--images",
        images,
        "--masks",
        masks,
        "--out",
        copy,
        "--epochs",
        "3",
        "--resume",
        *TINY,
    )
    assert code == 0, err
    assert json.loads((copy / "state.json").read_text())["epoch"] == 3
    with open(copy / "history.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2"]
    # Without --resume an existing run is not overwritten.
    code, _, err = run(capsys, "train", "--images", images, "--masks", masks, "--out", copy, *TINY)
    assert code == 2 and "already holds a run" in err


def test_multiclass_with_time_budget(tmp_path, capsys):
    images, masks = make_folder(tmp_path / "data", n=2, classes=3)
    out = tmp_path / "run"
    code, _, err = run(
        capsys,
        "train",
        "--images",
        images,
        "--masks",
        masks,
        "--out",
        out,
        "--epochs",
        "50",
        "--time-budget",
        "0.01",
        *TINY,
    )
    assert code == 0, err
    state = json.loads((out / "state.json").read_text())
    assert state["epoch"] == 1 and state["num_classes"] == 3  # stopped in the first epoch
    assert (out / "best.keras").is_file()
    code, stdout, _ = run(
        capsys,
        "evaluate",
        "--model",
        out / "best.keras",
        "--images",
        images,
        "--masks",
        masks,
        "--json",
    )
    scores = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and set(scores["dice"]) == {"0", "1", "2"}


# ---------------------------------------------------------------------------------- bad input
def _fails(capsys, argv, *needles, out=None):
    code, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("kunet: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    return lines[0]


def _train(images, masks, out, *extra):
    return [
        "train",
        "--images",
        images,
        "--masks",
        masks,
        "--out",
        out,
        "--epochs",
        "1",
        *TINY,
        *extra,
    ]


def test_bad_training_folders(tmp_path, capsys):
    out = tmp_path / "run"
    images, masks = make_folder(tmp_path / "a")
    (masks / "im2.png").unlink()
    _fails(capsys, _train(images, masks, out), "im2.png", "no mask", out=out)

    images, masks = make_folder(tmp_path / "b")
    (images / "im3.png").unlink()
    _fails(capsys, _train(images, masks, out), "masks/im3.png", "no image", out=out)

    images, masks = make_folder(tmp_path / "c")
    Image.fromarray(np.zeros((40, 40), "uint8")).save(masks / "im1.png")
    _fails(capsys, _train(images, masks, out), "im1.png", "40x40", out=out)

    images, masks = make_folder(tmp_path / "d")
    (images / "im0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _fails(capsys, _train(images, masks, out), "images/im0.png", "cannot read", out=out)

    images, masks = make_folder(tmp_path / "e", classes=4)
    _fails(capsys, _train(images, masks, out, "--num-classes", "3"), "masks/im", "label 3", out=out)

    (tmp_path / "empty").mkdir()
    _fails(capsys, _train(tmp_path / "empty", masks, out), "empty", "no image files", out=out)
    _fails(capsys, _train(images, tmp_path / "missing", out), "missing", "does not exist", out=out)


def test_unwritable_output(tmp_path, capsys):
    images, masks = make_folder(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _fails(capsys, _train(images, masks, blocker / "run"), "a_file")
    _fails(capsys, _train(images, masks, blocker), "a_file", "not a folder")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _fails(capsys, _train(images, masks, locked), "locked", "not writable")


def test_bad_predict_and_evaluate_inputs(trained, tmp_path, capsys):
    images, masks, run_dir = trained
    model = run_dir / "best.keras"
    out = tmp_path / "pred"
    _fails(
        capsys,
        ["predict", "--model", tmp_path / "nope.keras", "--images", images, "--out", out],
        "nope.keras",
        out=out,
    )
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    _fails(
        capsys,
        ["predict", "--model", junk, "--images", images, "--out", out],
        "junk.keras",
        out=out,
    )
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _fails(
        capsys,
        ["predict", "--model", model, "--images", images, "--out", blocker / "pred"],
        "a_file",
    )
    # An unreadable image in the middle of a folder: no partial outputs, even in an existing folder.
    bad = tmp_path / "bad_images"
    bad.mkdir()
    for p in images.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "im3.png").write_bytes(b"garbage")
    out.mkdir()
    _fails(capsys, ["predict", "--model", model, "--images", bad, "--out", out], "im3.png", out=out)
    assert out.is_dir()
    _fails(
        capsys,
        ["predict", "--model", model, "--images", tmp_path / "none", "--out", out],
        "none",
        out=out,
    )
    clash = tmp_path / "clash"
    clash.mkdir()
    for name in ("a.png", "a_overlay.png"):
        (clash / name).write_bytes((images / "im0.png").read_bytes())
    _fails(
        capsys,
        ["predict", "--model", model, "--images", clash, "--out", out],
        "a_overlay.png",
        out=out,
    )
    # evaluate: labels beyond the model's classes, and a missing mask.
    wrong = tmp_path / "wrong_masks"
    wrong.mkdir()
    for p in masks.iterdir():
        Image.fromarray((np.asarray(Image.open(p)) > 0).astype("uint8") * 2).save(wrong / p.name)
    _fails(
        capsys,
        ["evaluate", "--model", model, "--images", images, "--masks", wrong],
        "wrong_masks/im0.png",
        "values 0, 2",
        "binary",
    )
    (wrong / "im4.png").unlink()
    _fails(capsys, ["evaluate", "--model", model, "--images", images, "--masks", wrong], "im4.png")


def test_command_line_error_has_no_traceback(tmp_path):
    images, masks = make_folder(tmp_path / "data", n=2)
    (masks / "im1.png").unlink()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "kunet.cli", *map(str, _train(images, masks, tmp_path / "run"))],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("kunet: error: ")
    assert "im1.png" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    from kunet.outputs import atomic_save_model

    class Broken:
        def save(self, path):
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise OSError("disk full")

    class Fine:
        def save(self, path):
            with open(path, "wb") as f:
                f.write(b"new checkpoint")

    target = tmp_path / "best.keras"
    target.write_bytes(b"old checkpoint")
    with pytest.raises(OSError):
        atomic_save_model(Broken(), target)
    assert target.read_bytes() == b"old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]  # no temporary left behind
    atomic_save_model(Fine(), target)
    assert target.read_bytes() == b"new checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]


# ---------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--epochs", "0", "expected a positive integer, got '0'"),
        ("--patch-size", "3.5", "expected a positive integer, got '3.5'"),
        ("--time-budget", "-1", "expected a positive number, got '-1'"),
        ("--time-budget", "nan", "expected a positive number, got 'nan'"),
        ("--val-split", "1", "expected a number in [0, 1), got '1'"),
        ("--val-split", "x", "expected a number in [0, 1), got 'x'"),
    ],
)
def test_number_options_say_what_they_expect(tmp_path, capsys, option, value, expected):
    argv = ["plan", "--images", tmp_path, "--masks", tmp_path, option, value]
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv])
    assert stop.value.code == 2
    assert f"argument {option}: {expected}" in capsys.readouterr().err


def test_every_command_takes_verbose(capsys):
    for command in ("demo", "plan", "train", "predict", "evaluate"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        assert "--verbose" in capsys.readouterr().out, command


# ---------------------------------------------------------------------------------- start-up
def test_startup_knows_the_kunet_command_and_when_to_stay_quiet(monkeypatch):
    from kunet import _startup

    monkeypatch.setattr(sys, "argv", ["/venv/bin/kunet", "demo", "--epochs", "1"])
    assert _startup.command_args() == ["demo", "--epochs", "1"]
    monkeypatch.setattr(sys, "argv", ["-m", "demo"])  # python -m kunet.cli, while kunet imports
    monkeypatch.setattr(sys, "orig_argv", ["python", "-X", "dev", "-m", "kunet.cli", "demo"])
    assert _startup.command_args() == ["demo"]
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "kunet.synthetic", "demo"])
    assert _startup.command_args() is None
    monkeypatch.setattr(sys, "argv", ["/usr/bin/pytest", "tests"])
    assert _startup.command_args() is None
    assert _startup.wants_quiet(["demo"], environ={})
    assert not _startup.wants_quiet(["demo", "--verbose"], environ={})
    assert not _startup.wants_quiet(["demo", "--verb"], environ={})  # argparse takes a prefix
    assert _startup.wants_quiet(["demo", "--", "--verbose"], environ={})
    assert not _startup.wants_quiet(["demo"], environ={"TF_CPP_MIN_LOG_LEVEL": "0"})
    _startup.quiet_start()  # Keras is imported already: nothing to do


def test_startup_shows_what_it_captured_only_when_the_import_fails(capfd):
    from kunet._startup import stderr_captured

    with stderr_captured():
        os.write(2, b"I0000 start-up noise\n")
    assert capfd.readouterr().err == ""
    with pytest.raises(ImportError), stderr_captured():
        os.write(2, b"E0000 why it failed\n")
        raise ImportError("no framework")
    assert capfd.readouterr().err == "E0000 why it failed\n"
    print("after", file=sys.stderr)
    assert capfd.readouterr().err == "after\n"  # standard error is back


C_LOG_LINES = ("E0000", "I0000", "W0000", "absl::InitializeLog")
DEMO_TINY = ["--samples", "4", "--val-samples", "2", "--size", "16", "--epochs", "1"]
DEMO_TINY += ["--batch-size", "2", "--filters", "4", "--examples", "1", "--time-budget", "0"]


@pytest.mark.tensorflow
def test_the_command_keeps_tensorflow_start_up_lines_out_of_the_terminal(tmp_path):
    """TensorFlow's C++ start-up log lines (absl's, which TF_CPP_MIN_LOG_LEVEL alone does not
    silence) stay out of the kunet command's standard error, unless the user set
    TF_CPP_MIN_LOG_LEVEL or passed --verbose."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["KERAS_BACKEND"] = "tensorflow"

    def demo(out, *extra, **environ):
        argv = ["demo", "--out", tmp_path / out, *DEMO_TINY, *extra]
        proc = subprocess.run(
            [sys.executable, "-m", "kunet.cli", *map(str, argv)],
            capture_output=True,
            text=True,
            env={**env, **environ},
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1].startswith("validation Dice: ")
        return [p for p in C_LOG_LINES if p in proc.stderr]

    assert demo("quiet") == []
    assert demo("user_level", TF_CPP_MIN_LOG_LEVEL="0") != []  # the user's own setting stands
    assert demo("verbose", "--verbose") != []


# ---------------------------------------------------------------------------------- issue 12 flags
def test_train_precision_and_stream_flags_reach_the_model_and_plan(tmp_path, capsys):
    images, masks = make_folder(tmp_path / "data", n=4)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--images", images, "--masks", masks, "--out", out,
                       "--epochs", "1", "--val-split", "0.5", "--precision", "bf16", "--stream",
                       "--workers", "1", *TINY)  # fmt: skip
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["settings"]["precision"] == "bf16"
    assert plan["reasons"]["precision"] == "set by the user"
    model = keras.models.load_model(out / "best.keras")
    assert model.dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("encoder1_conv").compute_dtype == "bfloat16"


def test_train_devices_beyond_those_present_is_named_and_writes_nothing(tmp_path, capsys):
    images, masks = make_folder(tmp_path / "data", n=4)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--images", images, "--masks", masks, "--out", out,
                       "--epochs", "1", "--devices", "64", *TINY)  # fmt: skip
    assert code == 2
    if keras.backend.backend() == "torch":
        assert "runs on KERAS_BACKEND=jax or tensorflow" in err
    else:
        assert "--devices 64: there is no GPU here" in err and f"at most {os.cpu_count()}" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "backend", [pytest.param("jax", marks=pytest.mark.jax),
                pytest.param("tensorflow", marks=pytest.mark.tensorflow)],
)  # fmt: skip
def test_train_on_two_devices_from_the_command_line(tmp_path, backend):
    """``kunet train --devices 2`` on a CPU split into 2 devices (a fresh process: the split must
    happen before the framework starts)."""
    images, masks = make_folder(tmp_path / "data", n=4)
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--masks", masks, "--out", out, "--epochs", "1",
            "--val-split", "0.5", "--devices", "2", *[a for a in TINY if a != "--quiet"]]  # fmt: skip
    env = {**os.environ, "KERAS_BACKEND": backend}
    done = subprocess.run([sys.executable, "-m", "kunet.cli", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data parallel" in done.stdout + done.stderr
    assert (out / "best.keras").is_file()
