"""The UNet family: every variant trains, predicts the input's size, saves, loads under the other
backends with the same predictions, and learns a task that needs its skips.

One tester for every variant (``VARIANTS``), as segmentation_models.pytorch tests its models; a
variant's own behaviour (deep supervision's single prediction, the encoder's taps, the presets) has
its own test below.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BACKENDS

import kunet
from kunet import dispatch, encoders, presets

BACKEND = keras.backend.backend()

# name -> UNet arguments (tiny); every variant family and the combinations that share code paths
VARIANTS = {
    "residual-attention": {"block": "residual", "attention": True, "upsampling": "bilinear"},
    "unet++-deep-supervision": {"skips": "nested", "deep_supervision": True},
    "deep-supervision": {"deep_supervision": True, "filters": (4, 8, 8)},
    "3d-residual-attention-deep-supervision": {
        "spatial_dims": 3,
        "block": "residual",
        "attention": True,
        "deep_supervision": True,
        "upsampling": "trilinear",
        "num_classes": 3,
    },  # fmt: skip
    "3d-unet++": {"spatial_dims": 3, "skips": "nested"},
    "encoder": {
        "encoder": "mobilenetv2",
        "encoder_weights": None,
        "input_shape": (None, None, 3),
        "decoder_filters": (8, 8, 8, 4, 4),
    },  # fmt: skip
}
# (the plain 2D UNet has these tests in test_model.py / test_saving.py)


def make_variant(name, **overrides):
    config = {"num_classes": 2, "filters": (4, 8), "input_shape": (None, None, 1)}
    config.update(VARIANTS[name])
    if config.get("spatial_dims") == 3:
        config["input_shape"] = (None, None, None, 1)
    if "encoder" in config:
        config["filters"] = None
    config.update(overrides)
    return kunet.UNet(**config)


def _data(model, n, size, seed=0):
    """Images and integer masks of ``model``'s rank and classes: bright cubes/squares on noise."""
    rng = np.random.default_rng(seed)
    shape = (n,) + (size,) * model.spatial_dims
    masks = np.zeros(shape, "int32")
    for i in range(n):
        for cls in range(1, model.num_classes):
            corner = rng.integers(0, size - 4, size=model.spatial_dims)
            masks[(i, *(slice(c, c + 4) for c in corner))] = cls
    channels = model.unet_input_shape[-1]
    images = masks[..., None] / max(1, model.num_classes - 1) + 0.3 * rng.random(shape + (1,))
    images = np.repeat(images, channels, axis=-1).astype("float32")
    if channels == 3:  # an ImageNet encoder takes 0..255 RGB
        images *= 255.0
    return images, masks


def _odd_input(model, seed=1):
    size = (9, 13, 11)[3 - model.spatial_dims :] if model.spatial_dims == 3 else (37, 21)
    if model.encoder is not None:
        size = (35, 41)
    rng = np.random.default_rng(seed)
    return rng.random((2, *size, model.unet_input_shape[-1])).astype("float32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every variant, trained a few steps and saved once: {name: (model, path, x, prediction)}."""
    folder = tmp_path_factory.mktemp("variants")
    out = {}
    for name in VARIANTS:
        keras.utils.set_random_seed(0)
        model = make_variant(name)
        images, masks = _data(model, 4, 16 if model.spatial_dims == 3 else 32)
        history = model.fit(images, masks, batch_size=2, epochs=1, verbose=0)
        x = _odd_input(model)
        path = folder / f"{name}.keras"
        model.save(path)
        np.save(folder / f"{name}.npy", x)
        prediction = model.predict(x, verbose=0)
        out[name] = (model, path, x, prediction, history.history)
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_and_predicts_the_input_size(trained, name):
    model, _, x, prediction, history = trained[name]
    assert np.isfinite(history["loss"]).all(), history
    # one output, of the input's spatial size (odd sizes: padded and cropped in the graph)
    assert prediction.shape == x.shape[:-1] + (model.num_classes,)
    assert np.isfinite(prediction).all()
    assert tuple(model.output_shape) == (None,) * (model.spatial_dims + 1) + (model.num_classes,)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_round_trips_through_a_keras_file(trained, name):
    model, path, x, prediction, _ = trained[name]
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, kunet.UNet)
    config = model.get_config()
    if config["encoder"] is not None:
        assert config["encoder_weights"] is None  # built without weights, as loading does
    assert loaded.get_config() == config
    np.testing.assert_allclose(loaded.predict(x, verbose=0), prediction, atol=1e-5, rtol=0)


_LOAD_ALL = textwrap.dedent(
    """
    import sys, numpy as np, keras, kunet
    folder, names = sys.argv[1], sys.argv[2].split(",")
    for name in names:
        model = keras.models.load_model(f"{folder}/{name}.keras")
        np.save(f"{folder}/{name}.loaded.npy", model.predict(np.load(f"{folder}/{name}.npy"), verbose=0))
    print("loaded under", keras.backend.backend())
    """
)


@pytest.mark.parametrize("target", [b for b in BACKENDS if b != BACKEND])
def test_variants_load_under_another_backend(trained, target):
    """Each backend's session covers its two outgoing pairs: all six over the matrix."""
    folder = next(iter(trained.values()))[1].parent
    env = {**os.environ, "KERAS_BACKEND": target, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_ALL, str(folder), ",".join(trained)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded under {target}" in result.stdout
    for name, (_, _, _, prediction, _) in trained.items():
        loaded = np.load(folder / f"{name}.loaded.npy")
        np.testing.assert_allclose(loaded, prediction, atol=1e-4, err_msg=name)


# ---------------------------------------------------------------------------------- deep supervision
def test_deep_supervision_trains_every_head_and_predicts_one_output():
    model = make_variant("deep-supervision")
    assert len(model.outputs) == 3  # main + the 1/2 and 1/4 resolution heads
    x = _odd_input(model)
    # training: every output, the auxiliary ones on the padded grid down-sampled
    outputs = model(x, training=True)
    assert [tuple(o.shape) for o in outputs] == [(2, 37, 21, 2), (2, 20, 12, 2), (2, 10, 6, 2)]
    # inference (call, predict, evaluate): the main output only
    assert tuple(model(x, training=False).shape) == (2, 37, 21, 2)
    images, masks = _data(model, 4, 32)
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.get_layer("head_down4").weights]
    model.fit(images, masks, batch_size=2, epochs=1, verbose=0)
    after = model.get_layer("head_down4").weights
    assert not np.allclose(before[0], keras.ops.convert_to_numpy(after[0]))  # its loss trains it
    assert set(model.evaluate(images, masks, verbose=0, return_dict=True)) == {
        "loss",
        "dice",
        "iou",
    }


def test_deep_supervision_loss_is_the_weighted_sum_of_each_outputs_loss():
    model = make_variant("deep-supervision", num_classes=1)
    images, masks = _data(model, 2, 32)
    masks = masks.astype("float32")
    outputs = model(images, training=True)
    total = model.compute_loss(images, masks, outputs, training=True)
    loss = model.default_loss()
    want = float(loss(masks, outputs[0]))
    for factor, weight, out in ((2, 0.5, outputs[1]), (4, 0.25, outputs[2])):
        assert factor == model.size_multiple // (8 // factor)  # 32 px needs no padding
        want += weight * float(loss(masks[:, factor // 2 :: factor, factor // 2 :: factor], out))
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_deep_supervision_masks_are_padded_like_the_image():
    model = make_variant("deep-supervision", num_classes=3)  # multiple 8
    masks = np.arange(2 * 13 * 5).reshape(2, 13, 5) % 3
    down = keras.ops.convert_to_numpy(model._downsampled_masks(masks, 4))
    padded = np.pad(masks, [(0, 0), (1, 2), (1, 2)])  # 13 -> 16, 5 -> 8, centred
    np.testing.assert_array_equal(down, padded[:, 2::4, 2::4])


def test_deep_supervision_takes_one_loss():
    model = make_variant("deep-supervision")
    with pytest.raises(ValueError, match="takes one loss"):
        model.compile(loss=["mse", "mse"])


# ---------------------------------------------------------------------------------- unet++
def test_unet_plus_plus_has_the_nested_nodes_of_its_depth():
    model = make_variant("unet++-deep-supervision", filters=(4, 8, 8), deep_supervision=False)
    names = {layer.name for layer in model.layers}
    nodes = {f"x{i}{j}_conv" for j in range(1, 4) for i in range(4 - j)}
    assert nodes <= names
    # X(0, 3) reads X(0, 0), X(0, 1), X(0, 2) and the up-sampled X(1, 2): four parts
    inputs = model.get_layer("x03_conv").input
    assert [t.shape[-1] for t in inputs] == [4, 4, 4, 4]


def test_a_deep_supervised_unet_plus_plus_prunes_for_inference():
    model = kunet.UNetPlusPlus(num_classes=2, filters=(4, 8, 8), input_shape=(None, None, 1))
    x = _odd_input(model)
    full = model.pruned(3)
    np.testing.assert_allclose(full.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    small = model.pruned(1)
    assert small.predict(x, verbose=0).shape == x.shape[:-1] + (2,)
    assert len(small.layers) < len(full.layers)
    assert "x12_conv" not in {layer.name for layer in small.layers}
    with pytest.raises(ValueError, match="depth must be an int in"):
        model.pruned(4)
    with pytest.raises(ValueError, match="needs a UNet\\+\\+"):
        make_variant("deep-supervision").pruned(1)


# ---------------------------------------------------------------------------------- encoders
@pytest.mark.torch
@pytest.mark.parametrize("name", ["resnet50", "resnet50v2", "vgg16", "densenet121", "mobilenetv2",
                                  "efficientnetb0", "efficientnetv2b0", "convnext_tiny"])  # fmt: skip
def test_each_encoder_tap_is_at_its_output_stride(name):
    """The taps in kunet.encoders.ENCODERS: layer names of the network, each the last at its stride.
    (One network per family: the deeper ResNets only differ in block counts, which the name
    pattern encodes; checked once when the table was written.)"""
    network = encoders.backbone(name)
    _, _, taps = encoders.ENCODERS[name]
    x = keras.KerasTensor((1, 64, 64, 3))
    strides = sorted(taps)
    extractor = keras.Model(network.input, [network.get_layer(taps[s]).output for s in strides])
    for stride, spec in zip(strides, extractor.compute_output_spec(x), strict=True):
        assert spec.shape[1] == 64 // stride, (name, stride, spec.shape)


def test_encoder_weights_from_a_local_file_load_offline(tmp_path):
    network = encoders.backbone("mobilenetv2")
    path = tmp_path / "mobilenetv2.weights.h5"
    network.save_weights(path)
    model = make_variant("encoder", encoder_weights=str(path))
    loaded = model.get_layer("encoder")
    for a, b in zip(network.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_freeze_encoder_keeps_the_encoder_and_its_statistics():
    model = make_variant("encoder", freeze_encoder=True)
    encoder = model.get_layer("encoder")
    before = [keras.ops.convert_to_numpy(w).copy() for w in encoder.weights]
    images, masks = _data(model, 2, 32)
    model.fit(images, masks, batch_size=2, epochs=1, verbose=0)
    for a, b in zip(before, encoder.weights, strict=True):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))
    assert not encoder.trainable_weights
    assert model.trainable_weights  # the decoder trains


def test_encoder_preprocessing_is_the_networks_own():
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    for mode, module in (("caffe", "resnet"), ("tf", "mobilenet_v2"), ("torch", "densenet")):
        want = getattr(keras.applications, module).preprocess_input(x.copy())
        got = keras.ops.convert_to_numpy(encoders.ImageNetPreprocessing(mode)(x))
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=mode)


# ---------------------------------------------------------------------------------- presets, errors
@pytest.mark.parametrize(
    "kind", ["own encoder", pytest.param("pretrained", marks=pytest.mark.torch)]
)
def test_every_preset_builds_with_its_arguments(kind):
    """(The ImageNet networks are built under one backend only: they take a minute under JAX.)"""
    for name in presets.names():
        config = presets.config(name)
        if (config.get("encoder") is not None) != (kind == "pretrained"):
            continue
        if config.get("encoder") is not None:
            config["encoder_weights"] = None  # no download in tests
        small = {"filters": (4, 8)} if config.get("encoder") is None else {}
        model = kunet.UNet.from_preset(name, **{**config, **small})
        for key, value in config.items():
            if key != "filters" or not small:
                got = getattr(model, "unet_input_shape" if key == "input_shape" else key)
                assert got == value, (name, key)


def test_an_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'unet4d'.*attention-unet.*unet3d"):
        kunet.UNet.from_preset("unet4d")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 3, "encoder": "resnet50"}, "encoder='resnet50'.*spatial_dims=3"),
        ({"skips": "nested", "attention": True}, "attention=True.*skips='nested'"),
        ({"skips": "nested", "encoder": "resnet50", "filters": None}, "skips='nested'.*encoder"),
        ({"encoder": "resnet50"}, "filters sets.*decoder_filters"),
        ({"encoder": "resnet51", "filters": None}, "unknown encoder 'resnet51'.*resnet50"),
        (
            {"encoder": "resnet50", "filters": None, "input_shape": (None, None, 1)},
            "RGB.*input_shape",
        ),  # fmt: skip
        ({"encoder": "resnet50", "filters": None, "encoder_weights": "/nowhere.h5"}, "no such"),
        ({"freeze_encoder": True}, "freeze_encoder=True applies to a pretrained encoder"),
        ({"decoder_filters": (8, 8, 8, 8, 8)}, "decoder_filters applies"),
        (
            {"spatial_dims": 3, "upsampling": "bilinear"},
            "'bilinear' does not go with spatial_dims=3",
        ),
        ({"upsampling": "trilinear"}, "'trilinear' does not go with spatial_dims=2"),
        (
            {"spatial_dims": 2, "input_shape": (None, None, None, 1)},
            "3 spatial axes.*spatial_dims=2",
        ),
        ({"spatial_dims": 4}, "spatial_dims must be 2"),
        ({"block": "dense"}, "block must be one of"),
        ({"skips": "dense"}, "skips must be one of"),
        ({"attention": "yes"}, "attention must be True or False"),
    ],
)
def test_bad_combinations_name_the_arguments(kwargs, match):
    config = {"filters": (4, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        kunet.UNet(**config)


def test_a_volume_model_names_the_rank_of_images():
    model = make_variant("3d-unet++")
    with pytest.raises(
        ValueError, match=r"volumes shaped \(N, D, H, W, 1\).*images.*spatial_dims=2"
    ):
        model.fit(np.zeros((2, 16, 16, 1), "float32"), np.zeros((2, 16, 16)), verbose=0)
    image_model = make_variant("residual-attention")
    with pytest.raises(ValueError, match="spatial_dims=3"):
        image_model.predict(np.zeros((1, 8, 8, 8, 1), "float32"), verbose=0)


# ---------------------------------------------------------------------------------- fast paths
def test_two_d_variants_keep_the_double_conv_fast_path_and_volumes_say_why_not():
    table = kunet.explain(make_variant("residual-attention", block="double_conv"))
    fast = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}[BACKEND]
    rows = {row[0]: row for row in table.rows}
    # a decoder's DoubleConv inside a residual block, two inputs: the backend's own path
    residual = kunet.explain(make_variant("residual-attention"))
    inner = [r for r in residual.rows if r[1] == "DoubleConv"]
    assert inner and all(r[2] == fast or BACKEND == "jax" for r in inner)
    assert rows["decoder1_conv"][2] == fast
    volume = kunet.explain(make_variant("3d-unet++"))
    for _name, kind, train, infer, why in volume.rows:
        if kind == "DoubleConv":
            assert train == infer == dispatch.REFERENCE
            assert any("3D input" in w for w in why), why


# ---------------------------------------------------------------------------------- learning
def _small_objects(n, size, dims, seed):
    """2-pixel squares (cubes) in strong noise: found only with the skips' full-resolution detail
    (a UNet whose decoder gets no skips scores Dice 0.3 on it in 2D, 0.0 in 3D, at this budget)."""
    rng = np.random.default_rng(seed)
    shape = (n,) + (size,) * dims
    masks = np.zeros(shape, "float32")
    for i in range(n):
        for _ in range(6 if dims == 2 else 4):
            corner = rng.integers(0, size - 2, size=dims)
            masks[(i, *(slice(c, c + 2) for c in corner))] = 1
    images = masks + 0.35 * rng.normal(size=shape)
    return images[..., None].astype("float32"), masks


LEARNING = {  # family -> (UNet arguments, Dice it must reach on held-out data)
    "residual": ({"block": "residual"}, 0.7),
    "attention": ({"attention": True}, 0.7),
    "unet++": ({"skips": "nested"}, 0.7),
    "deep-supervision": ({"deep_supervision": True}, 0.7),
    "3d": ({"spatial_dims": 3}, 0.6),
}


def _learn(config, monkeypatch=None):
    dims = config.get("spatial_dims", 2)
    keras.utils.set_random_seed(0)
    model = kunet.UNet(num_classes=1, filters=(8, 16), input_shape=(None,) * dims + (1,),
                       bn_momentum=0.9, **config)  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    size, n = (32, 64) if dims == 2 else (16, 32)
    images, masks = _small_objects(n, size, dims, 0)
    history = model.fit(images, masks, batch_size=8, epochs=512 // n, verbose=0).history["loss"]
    held_out = _small_objects(16, size, dims, 1)
    return history, model.evaluate(*held_out, verbose=0, return_dict=True)["dice"]


@pytest.mark.parametrize("family", list(LEARNING))
def test_each_family_learns_what_needs_its_skips(family):
    """64 steps of a task only the skips can solve; the thresholds sit between what the variant
    reaches (0.85-0.93 in 2D, 0.81 in 3D, torch) and what the no-skip control below reaches."""
    config, threshold = LEARNING[family]
    losses, dice = _learn(config)
    assert losses[-1] < 0.8 * losses[0], losses
    assert dice > threshold, (family, dice)


@pytest.mark.parametrize("config", [{}, {"spatial_dims": 3}], ids=["2d", "3d"])
def test_a_decoder_without_skips_fails_the_learning_bar(config, monkeypatch):
    """The control that makes the learning test able to fail: skips dropped from every decoder."""
    from kunet import blocks

    real = blocks.decoder_block
    monkeypatch.setattr(blocks, "decoder_block", lambda x, skip, *a, **k: real(x, None, *a, **k))
    _, dice = _learn(config)
    assert dice < (0.6 if config else 0.7) - 0.2, dice
