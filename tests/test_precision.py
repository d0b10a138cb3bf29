"""Mixed precision: ``UNet(dtype_policy=...)`` and Keras' global policy train on every backend with a
finite, falling loss; the head, loss and metrics stay float32; float16 gets Keras' loss scaling; the
policy is saved with the model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kunet

MIXED = ("mixed_bfloat16", "mixed_float16")


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


@pytest.mark.parametrize("policy", MIXED)
def test_mixed_policy_trains_with_float32_head_loss_and_metrics(binary_data, policy, tmp_path):
    images, masks = binary_data
    model = kunet.UNet(filters=(4, 8), input_shape=(None, None, 1), dtype_policy=policy)
    assert model.dtype_policy.name == policy
    conv = model.get_layer("encoder1_conv")
    assert conv.compute_dtype == policy.split("_")[1]  # 16-bit compute ...
    assert all(_dtype(v) == "float32" for v in model.weights)  # ... float32 variables
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (
        policy == "mixed_float16"
    )
    out = model(images[:2], training=False)
    assert _dtype(out) == "float32"  # the head computes in float32
    loss = model.compute_loss(images[:2], masks[:2], model(images[:2], training=True))
    assert _dtype(loss) == "float32"

    history = model.fit(images, masks, batch_size=4, epochs=4, verbose=0).history
    losses = history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert np.isfinite(history["dice"]).all()
    scores = model.evaluate(images, masks, verbose=0, return_dict=True)
    assert all(np.isfinite(v) for v in scores.values())

    model.save(tmp_path / "m.keras")
    keras.config.set_dtype_policy("float32")  # the saved policy wins over the global one
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.dtype_policy.name == policy
    assert loaded.get_layer("encoder1_conv").compute_dtype == policy.split("_")[1]
    np.testing.assert_array_equal(
        loaded.predict(images[:2], verbose=0), model.predict(images[:2], verbose=0)
    )


def test_global_policy_is_taken_and_recorded(binary_data):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = kunet.UNet(filters=(4, 8), input_shape=(None, None, 1))
    keras.config.set_dtype_policy("float32")
    assert model.get_config()["dtype_policy"] == "mixed_bfloat16"
    assert model.get_layer("encoder1_conv").compute_dtype == "bfloat16"
    # an explicit argument is not changed by the global policy, nor does it change it
    model = kunet.UNet(filters=(4, 8), input_shape=(None, None, 1), dtype_policy="mixed_float16")
    assert keras.config.dtype_policy().name == "float32"
    assert model.get_layer("decoder1_conv").compute_dtype == "float16"


@pytest.mark.parametrize(
    "bad, said",
    [
        ("float16", "use 'mixed_float16'"),
        ("bfloat16", "use 'mixed_bfloat16'"),
        ("int8", "dtype_policy must be one of float32, mixed_bfloat16, mixed_float16"),
    ],
)
def test_unsupported_policies_are_named(bad, said):
    with pytest.raises(ValueError, match=said):
        kunet.UNet(filters=(4, 8), dtype_policy=bad)


def test_float16_loss_scaling_keeps_training_finite(binary_data):
    """A loss scaled far beyond float16's range: Keras' LossScaleOptimizer skips the overflowing
    steps and lowers its scale instead of writing inf into the weights."""
    images, masks = binary_data
    model = kunet.UNet(filters=(4, 8), input_shape=(None, None, 1), dtype_policy="mixed_float16")
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(1e-3), initial_scale=2.0**40))  # fmt: skip
    model.fit(images, masks, batch_size=4, epochs=2, verbose=0)
    after = float(keras.ops.convert_to_numpy(model.optimizer.dynamic_scale))
    assert after < 2.0**40
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)
