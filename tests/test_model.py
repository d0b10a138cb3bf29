"""The UNet's architecture: shapes, depth, variables, configuration and construction errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kunet
from kunet.layers import DoubleConv, MaxPool2x


@pytest.mark.parametrize("num_classes", [1, 4])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_output_has_input_size_for_odd_sizes(make_unet, num_classes, upsampling):
    model = make_unet(num_classes=num_classes, upsampling=upsampling, filters=(2, 4, 4, 8))
    for h, w in [(37, 45), (16, 16), (5, 3), (64, 33)]:
        out = model.predict(np.random.rand(2, h, w, 1).astype("float32"), verbose=0)
        assert out.shape == (2, h, w, num_classes)
        assert np.all(np.isfinite(out))


def test_bilinear_upsampling_matches_keras():
    from kunet.layers import BilinearUpSampling2D

    x = np.random.rand(2, 5, 7, 3).astype("float32")
    ours = keras.ops.convert_to_numpy(BilinearUpSampling2D()(x))
    ref = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
    np.testing.assert_allclose(ours, keras.ops.convert_to_numpy(ref), atol=1e-6)
    assert BilinearUpSampling2D().compute_output_shape((None, None, 7, 3)) == (None, None, 14, 3)


def test_max_pool_matches_keras():
    x = np.random.rand(2, 7, 9, 3).astype("float32")
    ours = keras.ops.convert_to_numpy(MaxPool2x()(x))
    ref = keras.ops.convert_to_numpy(keras.layers.MaxPooling2D(2)(x))
    np.testing.assert_array_equal(ours, ref)
    assert MaxPool2x().compute_output_shape((None, 7, None, 3)) == (None, 3, None, 3)


def test_spatial_dims_are_dynamic(make_unet):
    model = make_unet()
    assert model.input_shape == (None, None, None, 1)
    assert model.output_shape == (None, None, None, 1)


def test_fixed_input_shape(make_unet):
    model = make_unet(input_shape=(24, 40, 3), num_classes=2)
    assert model.output_shape == (None, 24, 40, 2)
    assert model.predict(np.zeros((1, 24, 40, 3), "float32"), verbose=0).shape == (1, 24, 40, 2)


def test_depth_follows_filters():
    for filters in [(4,), (4, 8), (4, 8, 8, 16)]:
        model = kunet.UNet(filters=filters, input_shape=(None, None, 1))
        convs = [layer for layer in model.layers if isinstance(layer, DoubleConv)]
        assert [c.filters for c in convs] == [*filters, 2 * filters[-1], *filters[::-1]]
        pools = [layer for layer in model.layers if isinstance(layer, MaxPool2x)]
        assert len(pools) == len(filters)


def test_paper_defaults():
    model = kunet.UNet()
    convs = [layer.filters for layer in model.layers if isinstance(layer, DoubleConv)]
    assert convs == [64, 128, 256, 512, 1024, 512, 256, 128, 64]
    assert model.input_shape == (None, None, None, 3)
    assert model.output_shape == (None, None, None, 1)
    # 31.04M for the paper's topology with BN and no conv bias (Pytorch-UNet: 31.04M too).
    assert 31.0e6 < model.count_params() < 31.1e6


def test_double_conv_variables_are_plain_conv_and_bn():
    layer = DoubleConv(6)
    layer.build((None, None, None, 3))
    names = sorted(v.path.split("/", 1)[1] for v in layer.variables)
    assert names == sorted(
        [
            "conv1/kernel",
            "conv2/kernel",
            "bn1/gamma",
            "bn1/beta",
            "bn1/moving_mean",
            "bn1/moving_variance",
            "bn2/gamma",
            "bn2/beta",
            "bn2/moving_mean",
            "bn2/moving_variance",
        ]
    )
    assert tuple(layer.conv1.kernel.shape) == (3, 3, 3, 6)
    assert tuple(layer.conv2.kernel.shape) == (3, 3, 6, 6)
    assert len(layer.trainable_variables) == 6


def test_double_conv_matches_sublayers_by_hand():
    layer = DoubleConv(5)
    x = np.random.rand(2, 9, 7, 3).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x, training=False))
    h = layer.conv1(x)
    h = keras.ops.relu(layer.bn1(h, training=False))
    h = keras.ops.relu(layer.bn2(layer.conv2(h), training=False))
    np.testing.assert_allclose(y, keras.ops.convert_to_numpy(h), atol=1e-6)
    assert y.min() >= 0


def test_double_conv_without_batch_norm_has_bias():
    layer = DoubleConv(4, batch_norm=False)
    layer.build((None, 8, 8, 2))
    assert layer.bn1 is None
    assert {v.path.split("/", 1)[1] for v in layer.variables} == {
        "conv1/kernel",
        "conv1/bias",
        "conv2/kernel",
        "conv2/bias",
    }


def test_config_round_trip(make_unet):
    model = make_unet(
        num_classes=3,
        upsampling="bilinear",
        dropout=0.25,
        batch_norm=False,
        bn_momentum=0.5,
        name="seg",
    )
    config = model.get_config()
    assert config["num_classes"] == 3 and config["upsampling"] == "bilinear"
    clone = kunet.UNet.from_config(config)
    assert clone.get_config() == config
    assert clone.count_params() == model.count_params()
    layer = DoubleConv.from_config(DoubleConv(8, batch_norm=False).get_config())
    assert layer.filters == 8 and layer.batch_norm is False


def test_bn_momentum_reaches_every_batch_norm_and_is_saved(tmp_path, make_unet):
    model = make_unet(bn_momentum=0.9)
    bns = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(bns) == 10 and {bn.momentum for bn in bns} == {0.9}
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("bottleneck_conv").bn2.momentum == 0.9
    with pytest.raises(ValueError, match="bn_momentum"):
        make_unet(bn_momentum=1.5)


def test_output_activation(make_unet):
    x = np.random.rand(1, 16, 16, 1).astype("float32")
    probs = make_unet(num_classes=3, output_activation="softmax").predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    sig = make_unet(output_activation="sigmoid").predict(x, verbose=0)
    assert sig.min() >= 0 and sig.max() <= 1


def test_dropout_only_in_training(make_unet):
    model = make_unet(dropout=0.5)
    x = np.random.rand(1, 16, 16, 1).astype("float32")
    a = keras.ops.convert_to_numpy(model(x, training=False))
    b = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_array_equal(a, b)
    assert any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_classes": 0}, ["num_classes", "0"]),
        ({"num_classes": -2}, ["num_classes", "-2"]),
        ({"filters": ()}, ["filters", "()"]),
        ({"filters": (8, 0)}, ["filters", "(8, 0)"]),
        ({"upsampling": "nearest"}, ["upsampling", "'nearest'", "transpose", "bilinear"]),
        ({"input_shape": (32, 32)}, ["input_shape", "(32, 32)"]),
        ({"input_shape": (None, None, 0)}, ["input_shape"]),
        ({"dropout": 1.5}, ["dropout", "1.5"]),
        ({"output_activation": "relu"}, ["output_activation", "'relu'"]),
        ({"fused": "sometimes"}, ["fused", "'sometimes'"]),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, words):
    with pytest.raises(ValueError) as info:
        kunet.UNet(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.jax
@pytest.mark.parametrize(
    "ours, keras_layer, shape",
    [
        ("pool", keras.layers.MaxPooling2D(2), (2, 7, 9, 3)),
        ("transpose", keras.layers.Conv2DTranspose(5, 2, strides=2), (2, 3, 4, 6)),
        (
            "transpose",
            keras.layers.Conv2DTranspose(2, 3, strides=3, activation="relu"),
            (1, 2, 3, 4),
        ),
    ],
)
def test_jax_paths_match_keras_with_gradients(ours, keras_layer, shape):
    """On JAX, MaxPool2x (max over a reshape) and Conv2DTranspose (a matrix product) == Keras'
    layers: outputs and gradients of the input and every weight."""
    import jax

    from kunet.layers import Conv2DTranspose

    layer = MaxPool2x() if ours == "pool" else Conv2DTranspose.from_config(keras_layer.get_config())
    layer.build(shape)
    keras_layer.build(shape)
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=w.shape).astype("float32") for w in keras_layer.get_weights()]
    layer.set_weights(weights)
    keras_layer.set_weights(weights)
    x = rng.normal(size=shape).astype("float32")

    def value_and_grads(lyr):
        def loss(x, trainable):
            out, _ = lyr.stateless_call(trainable, [], x)
            return (out * np.linspace(-1, 1, out.size).reshape(out.shape)).sum(), out

        trainable = [v.value for v in lyr.trainable_variables]
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, trainable)
        return out, grads

    (got, got_grads), (want, want_grads) = value_and_grads(layer), value_and_grads(keras_layer)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.jax
def test_jax_unet_uses_no_dilated_convolution_or_reduce_window(make_unet):
    """The UNet's up-convolutions and pools take the JAX formulations (XLA:CPU's slow lowerings of
    Keras' layers are input-dilated convolutions and reduce-window max / select-and-scatter)."""
    import jax

    model = make_unet(input_shape=(16, 16, 1))
    x = np.zeros((1, 16, 16, 1), "float32")

    def loss(trainable):
        out, _ = model.stateless_call(
            trainable, [v.value for v in model.non_trainable_variables], x
        )
        return out.sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))([v.value for v in model.trainable_variables]))
    assert "conv_general_dilated" in jaxpr  # the 3x3 convolutions
    assert "lhs_dilation=(2, 2)" not in jaxpr
    assert "reduce_window" not in jaxpr and "select_and_scatter" not in jaxpr
