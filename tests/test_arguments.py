"""Unknown keyword arguments: a TypeError naming the class called, each bad key and its closest match.

Keras' functional ``Model`` drops keywords it does not know, ``Layer`` rejects them with a ValueError
and ``Loss`` / ``Metric`` with a TypeError of the base class, none with a hint.
"""

from __future__ import annotations

import json
import warnings
import zipfile

import keras
import numpy as np
import pytest

import kunet
from kunet import layers, losses, metrics

# (class, positional arguments, keyword arguments): one small instance of every kunet layer, loss
# and metric
CLASSES = [
    (layers.DoubleConv, (4,), {}),
    (layers.PadToMultiple, (4,), {}),
    (layers.CropLike, (), {}),
    (layers.BilinearUpSampling2D, (), {}),
    (layers.MaxPool2x, (), {}),
    (layers.Conv2D, (4, 3), {"padding": "same"}),
    (layers.Conv2DTranspose, (4, 2), {"strides": 2}),
    (losses.Dice, (), {}),
    (losses.Jaccard, (), {}),
    (losses.Tversky, (), {"alpha": 0.4}),
    (losses.Focal, (), {}),
    (losses.CEDice, (), {}),
    (metrics.Dice, (), {"num_classes": 3}),
    (metrics.IoU, (), {"num_classes": 3}),
]


def _id(case):
    cls = case[0]
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def test_unet_names_every_unknown_argument(make_unet):
    with pytest.raises(TypeError) as info:
        make_unet(num_classes=1, upsamplng="bilinear", gating=True, backbone="resnet50")
    message = str(info.value)
    assert message.startswith("UNet() got unexpected keyword arguments ")
    assert "'upsamplng' (did you mean 'upsampling'?)" in message
    assert "'gating'" in message
    assert "'backbone'" in message
    # no close match for two of them: the message lists what UNet takes
    assert "upsampling, dropout" in message


@pytest.mark.parametrize(
    "cls, args, kwargs, bad, good",
    [
        (layers.DoubleConv, (4,), {"bn_momentun": 0.9}, "bn_momentun", "bn_momentum"),
        (layers.PadToMultiple, (4,), {"trainabel": False}, "trainabel", "trainable"),
        (layers.CropLike, (), {"nmae": "crop"}, "nmae", "name"),
        (layers.BilinearUpSampling2D, (), {"dtpye": "float32"}, "dtpye", "dtype"),
        (layers.MaxPool2x, (), {"autocats": False}, "autocats", "autocast"),
        (layers.Conv2D, (4, 3), {"paddng": "same"}, "paddng", "padding"),
        (layers.Conv2DTranspose, (4, 2), {"stride": 2}, "stride", "strides"),
        (losses.Dice, (), {"smoth": 0.5}, "smoth", "smooth"),
        (losses.Jaccard, (), {"from_logit": False}, "from_logit", "from_logits"),
        (losses.Tversky, (), {"alhpa": 0.4}, "alhpa", "alpha"),
        (losses.Focal, (), {"gama": 1.0}, "gama", "gamma"),
        (losses.CEDice, (), {"dice_weigth": 0.5}, "dice_weigth", "dice_weight"),
        (metrics.Dice, (), {"num_clases": 3}, "num_clases", "num_classes"),
        (metrics.IoU, (), {"treshold": 0.3}, "treshold", "threshold"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_misspelled_argument_names_class_key_and_suggestion(cls, args, kwargs, bad, good):
    with pytest.raises(TypeError) as info:
        cls(*args, **kwargs)
    assert str(info.value) == (
        f"{cls.__name__}() got an unexpected keyword argument '{bad}'; did you mean '{good}'?"
    )


@pytest.mark.parametrize("case", CLASSES, ids=_id)
def test_keras_arguments_are_accepted_and_only_the_unknown_one_is_named(case):
    cls, args, kwargs = case
    if issubclass(cls, keras.layers.Layer):
        # input_shape: the legacy keyword keras.layers.Layer still reads (with a warning)
        accepted = {
            "trainable": False,
            "dtype": "mixed_float16",
            "name": "mine",
            "input_shape": (8,),
        }
    elif issubclass(cls, keras.losses.Loss):
        accepted = {"reduction": "sum", "dtype": "float16", "name": "mine"}
    else:
        accepted = {"dtype": "float16", "name": "mine"}
    with pytest.raises(TypeError) as info:
        cls(*args, **kwargs, **accepted, unknown_option=1)
    message = str(info.value)
    assert message.startswith(
        f"{cls.__name__}() got an unexpected keyword argument 'unknown_option'"
    )
    assert "valid arguments: " in message
    valid = message.split("valid arguments: ", 1)[1].split(", ")
    assert set(accepted) <= set(valid)
    assert set(kwargs) <= set(valid)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Do not pass an `input_shape`", UserWarning)
        obj = cls(*args, **kwargs, **accepted)
    assert obj.name == "mine"
    if isinstance(obj, keras.layers.Layer):
        assert obj.trainable is False
        assert obj.dtype_policy.name == "mixed_float16"
    else:
        assert obj.dtype == "float16"


def test_unet_accepts_what_keras_model_takes(make_unet):
    model = make_unet(name="mine", trainable=False)
    assert (model.name, model.trainable) == ("mine", False)
    with pytest.raises(TypeError, match=r"^UNet\(\) got an unexpected keyword argument 'dtype'"):
        make_unet(dtype="float16")  # the functional Model would drop it: a float32 model


def _rename(config, old, new):
    return {new if k == old else k: v for k, v in config.items()}


@pytest.mark.parametrize("case", CLASSES, ids=_id)
def test_config_round_trip_and_misspelled_config_key(case):
    cls, args, kwargs = case
    obj = cls(*args, **kwargs)
    if isinstance(obj, keras.layers.Layer):
        obj = cls(*args, **kwargs, dtype="mixed_float16")  # dtype: a DTypePolicy config dict
    config = obj.get_config()
    again = cls.from_config(config)
    assert type(again) is cls
    assert again.get_config() == config

    key = "trainable" if isinstance(obj, keras.layers.Layer) else "name"
    with pytest.raises(TypeError) as info:
        cls.from_config(_rename(config, key, key[:-1]))
    # a layer's from_config (Keras' Operation.from_config) wraps it in "Error when deserializing"
    assert (
        f"{cls.__name__}() got an unexpected keyword argument '{key[:-1]}'; did you mean '{key}'?"
        in str(info.value)
    )


def test_load_model_still_works_and_rejects_a_misspelled_saved_key(tmp_path, make_unet):
    model = make_unet(num_classes=2)
    path = tmp_path / "m.keras"
    model.save(path)
    x = np.random.default_rng(0).random((1, 12, 12, 1)).astype("float32")
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, kunet.UNet)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
    )

    # the same file with "upsampling" misspelled in its config: an error, not a default UNet
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"] = _rename(config["config"], "upsampling", "upsamplng")
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(TypeError) as info:
        keras.models.load_model(bad)
    assert (
        "UNet() got an unexpected keyword argument 'upsamplng'; did you mean 'upsampling'?"
        in str(info.value)
    )
