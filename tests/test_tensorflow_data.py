"""On TensorFlow, UNet.fit/evaluate/predict feed NumPy arrays through an untuned tf.data pipeline
(kunet.backends.tensorflow_data): the same batches and results as Keras' own array handling."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.tensorflow


@pytest.fixture
def twins(make_unet):
    """Two identical compiled UNets (same weights, same optimizer state)."""
    a, b = make_unet(), make_unet()
    b.set_weights(a.get_weights())
    a.compile()
    b.compile()
    return a, b


@pytest.fixture
def calls(monkeypatch):
    from kunet.backends import tensorflow_data

    seen = []
    original = tensorflow_data.array_dataset

    def record(arrays, batch_size, shuffle=False):
        seen.append((len(arrays), batch_size, shuffle))
        return original(arrays, batch_size, shuffle=shuffle)

    monkeypatch.setattr(tensorflow_data, "array_dataset", record)
    return seen


def _dataset(*arrays, batch_size):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(arrays if len(arrays) > 1 else arrays[0]).batch(
        batch_size
    )


def test_pipeline_is_untuned_and_batches_in_order():
    from kunet.backends import tensorflow_data

    x = np.arange(10, dtype="float64").reshape(10, 1)
    ds = tensorflow_data.array_dataset((x, x * 2), batch_size=4)
    assert ds.options().autotune.enabled is False
    batches = [(a.numpy(), b.numpy()) for a, b in ds]
    assert [len(a) for a, _ in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([a for a, _ in batches]), x)
    assert batches[0][0].dtype == np.float32  # float64 -> floatx, as Keras' adapter
    shuffled = tensorflow_data.array_dataset((x,), batch_size=4, shuffle=True)
    epochs = [np.concatenate([a.numpy() for a in shuffled]).ravel() for _ in range(2)]
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), x.ravel())  # every sample once per epoch
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh permutation each epoch


def test_fit_evaluate_predict_match_keras_dataset_path(twins, binary_data, calls):
    x, y = binary_data
    ours, ref = twins
    w = np.linspace(0.5, 1.5, len(x)).astype("float32")
    h1 = ours.fit(x, y, sample_weight=w, batch_size=4, epochs=2, shuffle=False, verbose=0)
    h2 = ref.fit(_dataset(x, y, w, batch_size=4), epochs=2, verbose=0)
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        ours.predict(x, batch_size=3, verbose=0),
        ref.predict(_dataset(x, batch_size=3), verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    r1 = ours.evaluate(x, y, batch_size=5, verbose=0, return_dict=True)
    r2 = ref.evaluate(_dataset(x, y, batch_size=5), verbose=0, return_dict=True)
    for key in r2:
        np.testing.assert_allclose(r1[key], r2[key], rtol=1e-5)
    assert calls == [(3, 4, False), (1, 3, False), (2, 5, False)]


def test_validation_data_arrays(twins, binary_data, calls):
    x, y = binary_data
    ours, ref = twins
    h = ours.fit(x, y, validation_data=(x[:3], y[:3]), batch_size=4, epochs=1, verbose=0)
    assert calls == [
        (2, 4, False),
        (2, 4, True),
    ]  # validation first, then the shuffled training set
    assert np.isfinite(h.history["val_loss"][0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"validation_split": 0.25},
        {"shuffle": "batch"},
        {"steps_per_epoch": 1},
    ],
)
def test_keras_array_handling_where_needed(make_unet, binary_data, calls, kwargs):
    x, y = binary_data
    model = make_unet()
    model.compile()
    h = model.fit(x, y, batch_size=4, epochs=1, verbose=0, **kwargs)
    assert calls == []
    assert np.isfinite(h.history["loss"][0])


def test_class_weight_and_non_arrays_keep_keras_handling(binary_data):
    from kunet.backends.tensorflow_data import feed_arrays

    x, y = binary_data
    assert not feed_arrays(None, "fit", {"x": x, "y": y, "class_weight": {0: 1.0}})
    assert not feed_arrays(None, "fit", {"x": list(x), "y": y})
    assert not feed_arrays(None, "evaluate", {"x": x, "y": y[:-1]})  # Keras reports this
    args = {"x": x, "y": y, "batch_size": 2}
    assert feed_arrays(None, "evaluate", args)
    assert args["y"] is None and args["batch_size"] is None
