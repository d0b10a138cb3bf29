"""``kunet plan``: the fingerprint and the plan derived from it, each rule on data built to trigger
it; plan files and overrides; the time-budget schedule; inference that follows the plan."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_cli import TINY, make_folder

from kunet import plan as kplan
from kunet.callbacks import LearningRateSchedule
from kunet.cli import main
from kunet.data import load_folder
from kunet.inference import remove_small_components
from kunet.io import DataError


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _plan(images, masks, **kwargs):
    data = load_folder(
        images, masks, num_classes=kwargs.pop("num_classes", None), normalization=None
    )
    return kplan.make_plan(kplan.fingerprint(data), **kwargs)


def _folder(root, n=6, size=(40, 48), fraction=0.3, classes=2, seed=0):
    """n images with a foreground square covering ``fraction`` of each."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    h, w = size
    side = max(1, int(round((fraction * h * w) ** 0.5)))
    for i in range(n):
        mask = np.zeros(size, "uint8")
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        mask[y : y + side, x : x + side] = 1 if classes == 2 else 1 + i % (classes - 1)
        image = (100 * (mask > 0) + rng.normal(50, 10, size)).clip(0, 255).astype("uint8")
        Image.fromarray(image).save(root / "images" / f"a{i}.png")
        Image.fromarray(mask * (255 if classes == 2 else 1)).save(root / "masks" / f"a{i}.png")
    return root / "images", root / "masks"


# ---------------------------------------------------------------------------------- fingerprint
def test_fingerprint_reads_sizes_classes_objects_and_intensities(tmp_path):
    images, masks = _folder(tmp_path, n=4, size=(40, 48), fraction=0.25)
    fp = kplan.fingerprint(load_folder(images, masks, normalization=None))
    assert fp["images"] == 4 and fp["channels"] == 1 and fp["num_classes"] == 2
    assert fp["height"] == {"min": 40, "median": 40.0, "max": 40}
    assert fp["width"]["median"] == 48.0 and fp["pixels"] == 4 * 40 * 48
    assert fp["class_fractions"][1] == pytest.approx(22 * 22 / (40 * 48), abs=1e-4)
    assert fp["objects"]["1"]["count"] == 4 and fp["objects"]["1"]["median_area"] == 22 * 22
    assert fp["intensity"]["dtypes"] == ["uint8"] and fp["intensity"]["as_stored"]
    assert 20 < fp["intensity"]["p1"] < 50 < 100 < fp["intensity"]["p99"] < 200


def test_the_plan_is_deterministic(tmp_path, capsys):
    images, masks = _folder(tmp_path / "d")
    outs = []
    for name in ("p1.json", "p2.json"):
        code, _, err = run(capsys, "plan", "--images", images, "--masks", masks, "--time-budget",
                           "60", "--out", tmp_path / name)  # fmt: skip
        assert code == 0, err
        outs.append((tmp_path / name).read_text())
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["settings"]["time_budget"] == 60.0


# ---------------------------------------------------------------------------------- rules
def test_patch_size_follows_the_images(tmp_path):
    big_folder = _folder(tmp_path / "big", n=2, size=(600, 520))
    big = _plan(*big_folder)["settings"]
    assert big["patch_size"] == 128 and big["filters"] == [16, 32, 64, 128]  # patch < image
    assert big["batch_size"] == 4 and big["tile_size"] == 256
    gpu = _plan(*big_folder, gpu=True)["settings"]
    assert gpu["patch_size"] == 256 and gpu["batch_size"] == 4 and gpu["tile_size"] == 512
    small = _plan(*_folder(tmp_path / "small", n=2, size=(40, 48)))["settings"]
    assert small["patch_size"] == 64 and small["filters"] == [16, 32, 64]  # 3 levels
    assert small["batch_size"] == 16  # ~74k pixels, at most 16 patches
    mid = _plan(*_folder(tmp_path / "mid", n=2, size=(96, 200)))["settings"]
    assert mid["patch_size"] == 96 and mid["batch_size"] == 8 and len(mid["filters"]) == 3


def test_sparse_foreground_is_oversampled(tmp_path):
    sparse = _plan(*_folder(tmp_path / "sparse", fraction=0.03))
    dense = _plan(*_folder(tmp_path / "dense", fraction=0.4))
    assert sparse["settings"]["foreground"] == 0.5 and "10%" in sparse["reasons"]["foreground"]
    assert dense["settings"]["foreground"] == pytest.approx(1 / 3, abs=1e-3)
    assert sparse["settings"]["batch_dice"] is True and dense["settings"]["batch_dice"] is False


def test_the_budget_sets_epoch_length_and_augmentation(tmp_path):
    images, masks = _folder(tmp_path, n=6, size=(128, 128))
    fp = kplan.fingerprint(load_folder(images, masks, normalization=None))
    fixed = kplan.make_plan(fp)["settings"]
    assert fixed["epochs"] == kplan.DEFAULT_EPOCHS and fixed["time_budget"] is None
    short = kplan.make_plan(fp, time_budget=5, backend="jax")["settings"]
    long = kplan.make_plan(fp, time_budget=600, backend="tensorflow")["settings"]
    assert short["patches_per_epoch"] < long["patches_per_epoch"]
    assert long["patches_per_epoch"] % long["batch_size"] == 0
    assert (short["augmentation"], long["augmentation"]) == ("light", "heavy")
    assert long["time_budget"] == 600.0 and long["epochs"] >= 1000  # the budget ends the run


def test_normalization_keeps_one_range_unless_backgrounds_differ(tmp_path):
    same = _plan(*_folder(tmp_path / "same", n=6))
    assert same["settings"]["normalization"] == "dataset"
    low, high = same["settings"]["intensity_range"]
    assert 20 < low < 50 and 100 < high < 200  # the dataset's 1st and 99th percentiles
    images, masks = _folder(tmp_path / "shifted", n=6)
    for path in sorted(images.iterdir())[::2]:  # every other image exposed brighter
        brighter = np.asarray(Image.open(path)).astype(int) + 100
        Image.fromarray(brighter.clip(0, 255).astype("uint8")).save(path)
    shifted = _plan(images, masks)
    assert shifted["settings"]["normalization"] == "percentile"
    assert shifted["settings"]["intensity_range"] is None
    assert "each image on its own" in shifted["reasons"]["normalization"]


def test_few_images_are_not_split_for_validation(tmp_path):
    assert _plan(*_folder(tmp_path / "few", n=19))["settings"]["val_split"] == 0.0
    many = _plan(*_folder(tmp_path / "many", n=30))["settings"]
    assert many["val_split"] == 0.1


# ---------------------------------------------------------------------------------- plan files
def test_plan_files_are_checked_naming_the_field(tmp_path, capsys):
    images, masks = _folder(tmp_path / "d")
    path = tmp_path / "plan.json"
    assert run(capsys, "plan", "--images", images, "--masks", masks, "--out", path)[0] == 0
    plan = json.loads(path.read_text())
    argv = ["train", "--images", images, "--masks", masks, "--out", tmp_path / "run", "--plan",
            path, *TINY]  # fmt: skip
    bad = {
        "patch_sise": ("unknown setting 'patch_sise'", "did you mean 'patch_size'"),
        "augmentation": ("setting 'augmentation' must be one of none, light", "'wild'"),
    }
    for name, needles in bad.items():
        broken = json.loads(json.dumps(plan))
        broken["settings"][name] = "wild" if name == "augmentation" else 64
        path.write_text(json.dumps(broken))
        code, _, err = run(capsys, *argv)
        assert code == 2 and all(n in err for n in needles), err
        assert str(path) in err
    path.write_text("{not json")
    code, _, err = run(capsys, *argv)
    assert code == 2 and "not a kunet plan (cannot parse it as JSON" in err
    code, _, err = run(capsys, *argv[: -len(TINY)], "--set", "augmntation=light")
    assert code == 2 and "--set: unknown setting 'augmntation'" in err
    assert not (tmp_path / "run").exists()


def test_plan_refuses_bad_folders_like_train(tmp_path, capsys):
    images, masks = make_folder(tmp_path / "d", n=3)
    (masks / "im1.png").unlink()
    code, out, err = run(capsys, "plan", "--images", images, "--masks", masks)
    assert code == 2 and "im1.png has no mask" in err and out == ""
    code, _, err = run(
        capsys, "plan", "--images", images, "--masks", masks, "--out", images / "p.json"
    )
    assert code == 2 and "inside the images folder" in err


def test_train_uses_and_saves_the_plan_with_overrides(tmp_path, capsys):
    images, masks = _folder(tmp_path / "d", n=6, size=(40, 48))
    path = tmp_path / "plan.json"
    assert run(capsys, "plan", "--images", images, "--masks", masks, "--out", path)[0] == 0
    plan = json.loads(path.read_text())
    plan["settings"].update(augmentation="none", patches_per_epoch=8, epochs=2)
    path.write_text(json.dumps(plan))
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--images", images, "--masks", masks, "--out", out,
                       "--plan", path, "--batch-size", "2", "--set", "learning_rate=0.005",
                       "foreground=0.25", "--quiet")  # fmt: skip
    assert code == 0, err
    used = json.loads((out / "plan.json").read_text())
    assert used["settings"]["augmentation"] == "none" and used["settings"]["batch_size"] == 2
    assert used["settings"]["learning_rate"] == 0.005 and used["settings"]["foreground"] == 0.25
    assert used["reasons"]["batch_size"] == "set by the user"
    assert used["settings"]["tta"] in (True, False)  # "auto" resolved on the validation image
    assert isinstance(used["settings"]["min_component_size"], dict)
    # a resumed run keeps its plan: the same values are accepted, others are refused
    argv = ["train", "--images", images, "--masks", masks, "--out", out, "--resume", "--quiet"]
    assert run(capsys, *argv, "--epochs", "3", "--batch-size", "2")[0] == 0
    code, _, err = run(capsys, *argv, "--epochs", "4", "--batch-size", "3")
    assert code == 2 and "keeps its plan" in err and "batch_size=3" in err


# ---------------------------------------------------------------------------------- schedule
def test_the_learning_rate_reaches_its_end_as_the_budget_runs_out(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("kunet.callbacks.time.monotonic", lambda: now[0])

    class Optimizer:
        class learning_rate:  # noqa: N801 - stands for a Keras variable
            value = None

            @classmethod
            def assign(cls, v):
                cls.value = v

    class Model:
        optimizer = Optimizer

    schedule = LearningRateSchedule(2e-3, warmup=0.0, final=0.01, budget=60.0, start=100.0)
    schedule.set_model(Model)
    rates = []
    for epoch in range(6):  # 10-s epochs: midpoints at 5, 15, ... 55 s
        schedule.on_epoch_begin(epoch)
        rates.append(Optimizer.learning_rate.value)
        now[0] += 10.0
        schedule.on_epoch_end(epoch)
    assert rates == sorted(rates, reverse=True) and rates[0] < 2e-3
    assert rates[-1] == pytest.approx(schedule.rate(55 / 60), rel=1e-6)
    assert schedule.progress == 1.0 and schedule.rate(1.0) == pytest.approx(2e-5)
    assert schedule.rate(0.5) == pytest.approx(2e-3 * (0.01 + 0.99 * 0.5))
    resumed = LearningRateSchedule(2e-3, budget=60.0, start=now[0], resumed_from=0.5)
    assert resumed._elapsed_progress(30.0) == pytest.approx(0.75)


# ---------------------------------------------------------------------------------- inference
def test_small_components_are_removed_per_class():
    labels = np.zeros((10, 10), int)
    labels[0:3, 0:3] = 1  # 9 px
    labels[6, 6] = 1  # 1 px
    labels[8:10, 0:2] = 2  # 4 px
    out = remove_small_components(labels, {"1": 5, 2: 5})
    assert out[0:3, 0:3].min() == 1 and out[6, 6] == 0 and out[8:10, 0:2].max() == 0
    assert (remove_small_components(labels, {}) == labels).all()


def test_without_held_out_images_tta_follows_the_training_flips():
    from kunet.train import tune_inference

    auto = {"tta": "auto", "min_component_size": "auto", "tile_size": 64}
    for augmentation, tta in (("light", True), ("heavy", True), ("none", False)):
        plan = {"settings": {**auto, "augmentation": augmentation}, "reasons": {}}
        tuned = tune_inference(None, [], plan, 2)
        assert tuned["settings"]["tta"] is tta and tuned["settings"]["min_component_size"] == {}
        assert "no held-out images" in tuned["reasons"]["tta"]
        assert plan["settings"]["tta"] == "auto"  # the caller's plan is left as it was
    fixed = {"settings": {**auto, "tta": False, "augmentation": "light"}, "reasons": {}}
    assert tune_inference(None, [], fixed, 2)["settings"]["tta"] is False  # a user's choice stays


def test_the_kept_checkpoint_is_the_latest_within_the_noise_of_the_best():
    from kunet.train import VALIDATION_NOISE, RecordEpochs

    class Run:
        kept = []

        def commit(self, model, state, improved=False):
            self.kept.append(improved)

    state = {"history": [], "epoch": 0, "best_score": None, "best_epoch": None}
    record = RecordEpochs(Run(), state, monitor="val_dice")
    assert VALIDATION_NOISE == 0.005
    # 0.947 is within 0.005 of the best (0.95): kept; 0.944 is not; drifting down stays anchored
    for epoch, dice in enumerate([0.90, 0.95, 0.947, 0.944, 0.946, 0.96, 0.93]):
        record.on_epoch_end(epoch, {"val_dice": dice})
    assert Run.kept == [True, True, True, False, True, True, False]
    assert state["best_epoch"] == 6 and state["best_score"] == 0.96 and state["epoch"] == 7


def test_tta_stays_on_unless_it_clearly_lowers_the_held_out_dice(monkeypatch):
    from types import SimpleNamespace

    from kunet import train

    mask = np.zeros((50, 50), "int32")
    mask[:40, :25] = 1  # 1000 foreground pixels
    lost = {}

    def predict_labels(model, image, tile, tta, min_sizes=None):
        pred = mask.copy()
        if tta:
            pred.flat[np.flatnonzero(mask)[: lost["pixels"]]] = 0
        return pred

    monkeypatch.setattr(train, "predict_labels", predict_labels)
    samples = [SimpleNamespace(image=None, mask=mask)]

    def tta(pixels, augmentation="light"):
        lost["pixels"] = pixels
        settings = {"tta": "auto", "min_component_size": {}, "tile_size": 64}
        plan = {"settings": {**settings, "augmentation": augmentation}, "reasons": {}}
        return train.tune_inference(None, samples, plan, 2)["settings"]["tta"]

    assert tta(2) is True  # Dice 0.999 with flips vs 1.0 without: noise, the ensemble stays
    assert tta(40) is False  # 0.980: clearly lower
    assert tta(2, augmentation="none") is False  # never trained on flips: on only if it helps


def test_predict_and_evaluate_follow_the_plan_beside_the_model(tmp_path, capsys):
    images, masks = make_folder(tmp_path / "d", n=5)
    out = tmp_path / "run"
    argv = ["train", "--images", images, "--masks", masks, "--out", out, "--epochs", "1", *TINY]
    assert run(capsys, *argv)[0] == 0
    plan = json.loads((out / "plan.json").read_text())
    from kunet.predict import inference_settings

    assert inference_settings(plan)[0] == plan["settings"]["tile_size"]
    assert inference_settings(plan, tile_size=64, tta=True)[:2] == (64, True)
    assert inference_settings(None) == (256, False, {})
    # a plan beside the model that says zscore normalizes the images that way for predict
    plan["settings"]["normalization"] = "zscore"
    (out / "plan.json").write_text(json.dumps(plan))
    argv = ["predict", "--model", out / "best.keras", "--images", images, "--out"]
    assert run(capsys, *argv, tmp_path / "z", "--quiet")[0] == 0
    (out / "plan.json").write_text("{broken")
    code, _, err = run(capsys, *argv, tmp_path / "b")
    assert code == 2 and "plan.json: not a kunet plan" in err


def test_check_settings_names_the_bad_value():
    with pytest.raises(DataError, match=r"setting 'val_split' must be a number in \[0, 1\); got 1"):
        kplan.check_settings({"val_split": 1})
    with pytest.raises(DataError, match=r"--set expects NAME=VALUE; got 'patch_size'"):
        kplan.parse_overrides(["patch_size"])
    assert kplan.parse_overrides(["filters=[8,16]", "schedule=constant"]) == {
        "filters": [8, 16],
        "schedule": "constant",
    }
