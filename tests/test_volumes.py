"""kunet.volumes (NIfTI, .npy, TIFF stacks), 3D folders in kunet.data, 3D patches and augmentation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kunet import data, volumes
from kunet.augment import Augment, crop, grid_crops
from kunet.io import DataError, Guesses

nib = pytest.importorskip("nibabel")  # the nifti extra; the test matrix installs it (.[all])
tifffile = pytest.importorskip("tifffile")

AFFINE = np.array(
    [[0.0, 0.0, 2.5, 10.0], [0.0, -0.8, 0.0, 20.0], [0.7, 0.0, 0.0, -5.0], [0.0, 0.0, 0.0, 1.0]]
)


def _volume(shape=(6, 7, 8), seed=0):
    return np.random.default_rng(seed).random(shape).astype("float32")


def _save_nifti(path, dhw, affine=AFFINE):
    """Save a (D, H, W[, C]) array as NIfTI (x, y, z[, c]), the layout kunet.volumes reverses."""
    data_xyz = dhw.transpose(2, 1, 0) if dhw.ndim == 3 else dhw.transpose(2, 1, 0, 3)
    img = nib.Nifti1Image(data_xyz, affine)
    nib.save(img, str(path))
    return path


def _blob_mask(shape, seed=0):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    c = rng.uniform(3, np.array(shape) - 3)
    return (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 9).astype("uint8")


# ---------------------------------------------------------------------------------- reading
def test_nifti_is_read_as_d_h_w_c_with_its_affine(tmp_path):
    vol = _volume()
    _save_nifti(tmp_path / "a.nii.gz", vol)
    x, meta = volumes.read_volume(tmp_path / "a.nii.gz")
    assert x.shape == (6, 7, 8, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x[..., 0], vol)  # (x, y, z) -> (z, y, x) = (D, H, W)
    np.testing.assert_allclose(meta.affine, AFFINE)
    assert meta.format == "nifti" and meta.shape == (6, 7, 8)
    # 4D NIfTI: the last axis is channels
    _save_nifti(tmp_path / "c.nii", np.stack([vol, 2 * vol], axis=-1))
    x2, _ = volumes.read_volume(tmp_path / "c.nii")
    assert x2.shape == (6, 7, 8, 2)
    np.testing.assert_array_equal(x2[..., 1], 2 * vol)


def test_npy_and_tiff_stacks_are_read(tmp_path):
    vol = _volume()
    np.save(tmp_path / "a.npy", vol)
    np.save(tmp_path / "b.npy", np.stack([vol, vol], axis=-1))
    tifffile.imwrite(tmp_path / "c.tif", (vol * 1000).astype("uint16"))
    assert volumes.read_volume(tmp_path / "a.npy")[0].shape == (6, 7, 8, 1)
    assert volumes.read_volume(tmp_path / "b.npy")[0].shape == (6, 7, 8, 2)
    x, meta = volumes.read_volume(tmp_path / "c.tif")
    assert x.shape == (6, 7, 8, 1) and meta.dtype == "uint16"
    np.testing.assert_array_equal(x[..., 0], (vol * 1000).astype("uint16"))


def test_masks_are_integer_volumes_and_0_255_is_binary(tmp_path):
    mask = _blob_mask((8, 9, 10))
    _save_nifti(tmp_path / "m.nii.gz", (mask * 255).astype("uint8"))
    guesses = Guesses()
    y, _ = volumes.read_volume_mask(tmp_path / "m.nii.gz", guesses)
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, mask)
    assert any("0/255" in line for line in guesses.lines())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: np.save(p / "bad.npy", np.zeros((4, 5))), "expected a volume of shape"),
        (lambda p: (p / "bad.npy").write_bytes(b"not a numpy file"), "cannot read .npy"),
        (lambda p: (p / "bad.nii.gz").write_bytes(b"\x00" * 40), "cannot read NIfTI"),
        (lambda p: (p / "bad.tif").write_bytes(b"II*\x00garbage"), "cannot read TIFF"),
        (
            lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 5)), AFFINE), str(p / "bad.nii.gz")),
            "expected a 3D NIfTI",
        ),
        (
            lambda p: tifffile.imwrite(
                p / "bad.tif",
                np.zeros((2, 3, 4, 5), "uint8"),
                imagej=True,
                metadata={"axes": "TZYX"},
            ),
            "expected a stack of 2D pages",
        ),
        (lambda p: tifffile.imwrite(p / "bad.tif", np.zeros((4, 5), "uint8")), "stack of 2D pages"),
    ],
)
def test_unreadable_or_wrong_rank_files_are_named(tmp_path, make, message):
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(DataError, match=message) as e:
        volumes.read_volume(path)
    assert str(path) in str(e.value)


def test_nan_follows_the_nan_policy(tmp_path):
    vol = _volume()
    vol[1, 2, 3] = np.nan
    np.save(tmp_path / "a.npy", vol)
    with pytest.raises(DataError, match=r"a\.npy holds 1 NaN/inf"):
        volumes.read_volume(tmp_path / "a.npy")
    x, _ = volumes.load_volume(tmp_path / "a.npy", nan_policy="zero")
    assert np.isfinite(x).all() and x[1, 2, 3, 0] == 0.0
    assert np.isnan(volumes.read_volume(tmp_path / "a.npy", nan_policy="ignore")[0]).sum() == 1
    np.save(tmp_path / "m.npy", np.where(np.isnan(vol), np.nan, 0.0))
    with pytest.raises(DataError, match=r"m\.npy: mask holds 1 NaN"):
        volumes.read_volume_mask(tmp_path / "m.npy")


def test_load_volume_normalizes_the_whole_volume(tmp_path):
    vol = 1000 + 500 * _volume((10, 10, 10))
    np.save(tmp_path / "a.npy", vol)
    x, _ = volumes.load_volume(tmp_path / "a.npy")
    assert -0.1 < np.percentile(x, 1) < 0.01 and 0.99 < np.percentile(x, 99) < 1.01


def test_missing_nibabel_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_nibabel(name, *args, **kwargs):
        if name == "nibabel":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nibabel)
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"a\.nii\.gz.*pip install kunet\[nifti\]"):
        volumes.read_volume(tmp_path / "a.nii.gz")


# ---------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".npy", ".tif"])
def test_mask_round_trip_keeps_values_and_the_affine(tmp_path, suffix):
    src = _save_nifti(tmp_path / "img.nii.gz", _volume((6, 7, 8)))
    _, meta = volumes.read_volume(src)
    mask = np.random.default_rng(1).integers(0, 3, (6, 7, 8))
    out = volumes.write_mask(tmp_path / f"pred{suffix}", mask, like=meta)
    back, back_meta = volumes.read_volume_mask(out)
    np.testing.assert_array_equal(back, mask)
    if suffix.startswith(".nii"):
        np.testing.assert_allclose(back_meta.affine, AFFINE)
        np.testing.assert_allclose(back_meta.spacing, meta.spacing)
    assert sorted(os.listdir(tmp_path)) == sorted(["img.nii.gz", f"pred{suffix}"])  # no temp left


def test_write_mask_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "pred.npy"
    path.write_bytes(b"the user's file")
    with pytest.raises(DataError, match=r"pred\.npy already exists.*overwrite"):
        volumes.write_mask(path, np.zeros((2, 3, 4), int))
    assert path.read_bytes() == b"the user's file"
    assert os.listdir(tmp_path) == ["pred.npy"]
    volumes.write_mask(path, np.ones((2, 3, 4), int), overwrite=True)
    np.testing.assert_array_equal(np.load(path), 1)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(file, array):
        file.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(volumes.np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        volumes.write_mask(tmp_path / "pred.npy", np.zeros((2, 3, 4), int))
    assert os.listdir(tmp_path) == []


def test_write_mask_checks_the_shape_against_its_image(tmp_path):
    _, meta = volumes.read_volume(_save_nifti(tmp_path / "img.nii.gz", _volume((6, 7, 8))))
    with pytest.raises(DataError, match=r"6x7x8"):
        volumes.write_mask(tmp_path / "pred.nii.gz", np.zeros((6, 7, 9), int), like=meta)
    with pytest.raises(DataError, match="unknown volume format"):
        volumes.write_mask(tmp_path / "pred.png", np.zeros((6, 7, 8), int))
    assert os.listdir(tmp_path) == ["img.nii.gz"]


def test_mask_names_follow_the_source():
    assert volumes.mask_name("a/b.nii.gz") == "b.nii.gz"
    assert volumes.mask_name("b.nii") == "b.nii.gz"
    assert volumes.mask_name("b.tiff") == "b.tiff"
    assert volumes.volume_stem("x/case.1.nii.gz") == "case.1"


# ---------------------------------------------------------------------------------- folders
def make_volume_folder(root, n=3, shape=(12, 14, 16), suffix=".nii.gz", seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = _blob_mask(shape, seed + i)
        image = (300.0 * mask + rng.normal(100, 20, shape)).astype("float32")
        if suffix == ".npy":
            np.save(root / "images" / f"v{i}.npy", image)
            np.save(root / "masks" / f"v{i}.npy", mask)
        else:
            _save_nifti(root / "images" / f"v{i}{suffix}", image)
            _save_nifti(root / "masks" / f"v{i}{suffix}", mask)
    return root / "images", root / "masks"


def test_load_folder_reads_volumes(tmp_path):
    images, masks = make_volume_folder(tmp_path)
    folder = data.load_folder(images, masks, volumes=True, guesses=Guesses())
    assert folder.num_classes == 2 and folder.channels == 1
    s = folder.samples[0]
    assert s.image.shape == (12, 14, 16, 1) and s.mask.shape == (12, 14, 16)
    np.testing.assert_allclose(s.meta.affine, AFFINE)


def test_load_folder_names_a_shape_mismatch(tmp_path):
    images, masks = make_volume_folder(tmp_path, n=2)
    _save_nifti(masks / "v1.nii.gz", np.zeros((12, 14, 15), "uint8"))
    with pytest.raises(
        DataError, match=r"v1\.nii\.gz is 12x14x15 \(DxHxW\) but its image .* 12x14x16"
    ):
        data.load_folder(images, masks, volumes=True)


def test_a_folder_mixing_images_and_volumes_is_refused(tmp_path):
    images, masks = make_volume_folder(tmp_path, n=1, suffix=".npy")
    (images / "stray.png").write_bytes(b"")
    with pytest.raises(DataError, match="mixes 2D images"):
        data.load_folder(images, masks, volumes=True)
    assert volumes.holds_volumes(images)


# ---------------------------------------------------------------------------------- patches
def _samples(n=3, shape=(12, 14, 16)):
    out = []
    for i in range(n):
        mask = _blob_mask(shape, i).astype("int32")
        image = (mask + 0.1 * _volume(shape, i))[..., None].astype("float32")
        out.append(data.Sample(f"v{i}", None, None, image, mask))
    return out


def test_patch_dataset_gives_3d_patches_deterministically():
    ds = data.PatchDataset(_samples(), 2, patch_size=8, batch_size=3, patches_per_epoch=6, seed=4)
    x, y = ds[1]
    assert x.shape == (3, 8, 8, 8, 1) and y.shape == (3, 8, 8, 8)
    assert x.dtype == np.float32 and y.dtype == np.float32
    again = data.PatchDataset(
        _samples(), 2, patch_size=8, batch_size=3, patches_per_epoch=6, seed=4
    )
    np.testing.assert_array_equal(again[1][0], x)
    other = data.PatchDataset(
        _samples(), 2, patch_size=8, batch_size=3, patches_per_epoch=6, seed=5
    )
    assert not np.array_equal(other[1][0], x)
    # larger than the volume along one axis: mirrored
    big = data.PatchDataset(_samples(), 2, patch_size=(16, 8, 8), batch_size=2)
    assert big[0][0].shape == (2, 16, 8, 8, 1)


def test_foreground_oversampling_centres_patches_on_objects():
    samples = _samples()
    ds = data.PatchDataset(
        samples, 2, patch_size=6, batch_size=8, patches_per_epoch=8, foreground=1.0,
        augment=False,
    )  # fmt: skip
    _, y = ds[0]
    assert all(y[i, 3, 3, 3] == 1 or y[i, 2:4, 2:4, 2:4].any() for i in range(len(y)))
    uniform = data.PatchDataset(
        samples, 2, patch_size=6, batch_size=8, patches_per_epoch=64, foreground=0.0,
        augment=False,
    )  # fmt: skip
    hits = np.mean([b[1][:, 2:4, 2:4, 2:4].any(axis=(1, 2, 3)).mean() for b in uniform])
    assert hits < 0.8


def test_tile_dataset_covers_each_volume():
    samples = _samples(2, (12, 14, 16))
    ds = data.TileDataset(samples, 2, patch_size=8, batch_size=4)
    assert len(ds.tiles) == 2 * 2 * 2 * 2
    x, y = ds[0]
    assert x.shape == (4, 8, 8, 8, 1) and y.shape == (4, 8, 8, 8)
    np.testing.assert_array_equal(y[0], samples[0].mask[:8, :8, :8])


def test_grid_crops_and_crop_in_3d():
    assert grid_crops((10, 20, 30, 1), (8, 16, 16)) == [
        (z, y, x) for z in (0, 2) for y in (0, 4) for x in (0, 14)
    ]
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    image, mask = crop(vol[..., None], vol, (0, 0, 0), (6, 5, 6))  # mirrored past the end
    assert image.shape == (6, 5, 6, 1)
    np.testing.assert_array_equal(mask[4], vol[2])


@pytest.mark.parametrize("level", ["light", "heavy"])
def test_volume_augmentation_keeps_image_and_mask_aligned(level):
    # The image is its mask plus a constant: any misalignment shows as a mismatch.
    mask = _blob_mask((12, 14, 16)) + 2 * _blob_mask((12, 14, 16), seed=3)
    image = mask[..., None].astype("float32")
    aug = Augment.level(level)
    aug.contrast = aug.gamma = None
    aug.brightness = 0.0
    seen = set()
    for seed in range(12):
        x, y = aug.patch(image, mask, (8, 10, 10), seed=seed, centre=(6, 7, 8))
        assert x.shape == (8, 10, 10, 1) and y.shape == (8, 10, 10)
        assert set(np.unique(y)) <= {0, 1, 2, 3}
        if level == "light":  # flips and rotations only: exact
            np.testing.assert_array_equal(x[..., 0], y)
            seen.add(y.tobytes())
        else:  # interpolated: the image matches the labels away from their borders
            assert np.mean(np.abs(x[..., 0] - y) < 0.5) > 0.9
    assert level == "heavy" or len(seen) > 4  # the flips and rotations do vary


def test_flips_cover_all_three_axes():
    vol = np.arange(4 * 6 * 6).reshape(4, 6, 6)
    aug = Augment(flip=True, rotate90=False, scale=None, elastic=0.0, brightness=0.0,
                  contrast=None, gamma=None)  # fmt: skip
    outs = [
        aug.patch(vol[..., None].astype("float32"), vol, (4, 6, 6), seed=s)[1] for s in range(40)
    ]
    flipped_axes = set()
    for out in outs:
        for axis in range(3):
            if np.array_equal(out, np.flip(vol, axis)):
                flipped_axes.add(axis)
    assert flipped_axes == {0, 1, 2}


# ---------------------------------------------------------------------------------- command line
def _blob_folder(root, n, size=16, seed=0, suffix=".nii.gz"):
    """images/ + masks/ of make_blobs3d volumes as int16 NIfTI (or TIFF stacks), anisotropic affine."""
    from kunet.synthetic import make_blobs3d

    x, y = make_blobs3d(n, size=size, seed=seed)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        image, mask = (x[i, ..., 0] * 1000).astype("int16"), y[i]
        if suffix == ".tif":
            tifffile.imwrite(root / "images" / f"v{i}.tif", image)
            tifffile.imwrite(root / "masks" / f"v{i}.tif", mask)
        else:
            _save_nifti(root / "images" / f"v{i}{suffix}", image, affine)
            _save_nifti(root / "masks" / f"v{i}{suffix}", mask, affine)
    return root / "images", root / "masks", affine


TINY_3D = ["--patch-size", "16", "--batch-size", "2", "--filters", "4", "8", "--quiet",
           "--set", "patches_per_epoch=4"]  # fmt: skip


def _main(capsys, *argv):
    from kunet.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_predict_evaluate_on_a_nifti_folder(tmp_path, capsys):
    images, masks, affine = _blob_folder(tmp_path / "train", 3)
    test_images, test_masks, _ = _blob_folder(tmp_path / "test", 2, seed=9)
    run = tmp_path / "run"
    code, out, err = _main(capsys, "train", "--images", images, "--masks", masks, "--out", run,
                           "--epochs", "2", *TINY_3D)  # fmt: skip
    assert code == 0, err
    state = json.loads((run / "state.json").read_text())
    assert state["spatial_dims"] == 3 and state["epoch"] == 2
    assert json.loads((run / "plan.json").read_text())["fingerprint"]["spatial_dims"] == 3
    assert sorted(p.name for p in (run / "overlays").iterdir()) == ["v0.png", "v1.png", "v2.png"]

    pred = tmp_path / "pred"
    code, out, err = _main(capsys, "predict", "--model", run / "best.keras", "--images",
                           test_images, "--out", pred)  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in pred.iterdir()) == [
        "v0.nii.gz", "v0_overlay.png", "v1.nii.gz", "v1_overlay.png"
    ]  # fmt: skip
    written = nib.load(str(pred / "v0.nii.gz"))
    np.testing.assert_allclose(written.affine, affine)  # the input's affine is kept
    assert written.shape == (16, 16, 16) and set(np.unique(written.get_fdata())) <= {0.0, 1.0}
    # nothing is replaced without --overwrite
    before = (pred / "v0.nii.gz").read_bytes()
    code, _, err = _main(capsys, "predict", "--model", run / "best.keras", "--images",
                         test_images, "--out", pred)  # fmt: skip
    assert code == 2 and "already holds 4 of the 4 files" in err
    assert (pred / "v0.nii.gz").read_bytes() == before

    code, out, err = _main(capsys, "evaluate", "--model", run / "best.keras", "--images",
                           test_images, "--masks", test_masks, "--json")  # fmt: skip
    assert code == 0, err
    scores = json.loads(out.strip().splitlines()[-1])
    assert sorted(scores["per_image_dice"]) == ["v0", "v1"] and 0 <= scores["mean_dice"] <= 1

    # one volume file works too
    code, _, err = _main(capsys, "predict", "--model", run / "best.keras", "--images",
                         images / "v0.nii.gz", "--out", tmp_path / "one")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "one" / "v0.nii.gz").is_file()


def test_cli_model_presets_and_their_errors(tmp_path, capsys):
    images, masks, _ = _blob_folder(tmp_path / "d", 2)
    code, _, err = _main(capsys, "train", "--images", images, "--masks", masks, "--out",
                         tmp_path / "r1", "--model", "unet3d-smal", *TINY_3D)  # fmt: skip
    assert code == 2 and "unknown preset" in err and "unet3d-small" in err and "unet++" in err
    assert not (tmp_path / "r1").exists()
    code, _, err = _main(capsys, "train", "--images", images, "--masks", masks, "--out",
                         tmp_path / "r2", "--model", "unet3d-small", "--epochs", "1",
                         "--patch-size", "16", "--batch-size", "2", "--quiet",
                         "--set", "patches_per_epoch=2")  # fmt: skip
    assert code == 0, err
    plan = json.loads((tmp_path / "r2" / "plan.json").read_text())["settings"]
    assert plan["model"] == "unet3d-small" and plan["filters"] == [8, 16, 32]  # the preset's
    # a 3D preset on 2D images
    from PIL import Image

    for sub in ("im", "ma"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((16, 16), "uint8")).save(tmp_path / sub / "a.png")
    code, _, err = _main(capsys, "train", "--images", tmp_path / "im", "--masks", tmp_path / "ma",
                         "--out", tmp_path / "r3", "--model", "unet3d", *TINY_3D)  # fmt: skip
    assert code == 2 and "--model unet3d is a 3D architecture" in err
    assert not (tmp_path / "r3").exists()


def test_tiff_stacks_need_the_3d_flag(tmp_path, capsys):
    images, masks, _ = _blob_folder(tmp_path / "d", 2, suffix=".tif")
    code, _, err = _main(capsys, "plan", "--images", images, "--masks", masks)
    assert code == 2 and "v0.tif" in err and "--3d" in err
    code, out, err = _main(capsys, "plan", "--images", images, "--masks", masks, "--3d")
    assert code == 0, err
    assert "2 volume(s)" in out and "16x16x16 (DxHxW)" in out


def test_plan_sizes_3d_patches_for_volumes():
    from kunet import plan as kplan

    fp = {
        "images": 30, "spatial_dims": 3, "channels": 1, "num_classes": 2,
        "depth": {"min": 40, "median": 60.0, "max": 80},
        "height": {"min": 100, "median": 128.0, "max": 200},
        "width": {"min": 100, "median": 128.0, "max": 200},
        "pixels": 30 * 60 * 128 * 128, "class_fractions": [0.8, 0.2], "objects": {},
        "intensity": {"as_stored": True, "p1": 0.0, "p99": 1.0, "per_image_p1": [0.0, 0.01],
                      "per_image_p99": [1.0, 1.0]},
    }  # fmt: skip
    cpu = kplan.make_plan(fp, time_budget=600)["settings"]
    assert cpu["patch_size"] == 48 and cpu["filters"] == [8, 16, 32] and cpu["batch_size"] == 2
    assert cpu["tile_size"] == 96
    gpu = kplan.make_plan(fp, gpu=True)["settings"]
    assert gpu["patch_size"] == 56 and gpu["tile_size"] == 112  # the smallest side, a multiple of 8
    small = kplan.make_plan({**fp, "depth": {"min": 12, "median": 12.0, "max": 12}})["settings"]
    assert small["patch_size"] == 16 and small["batch_size"] == 8
