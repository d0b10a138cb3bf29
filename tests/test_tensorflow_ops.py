"""On the TensorFlow backend the DoubleConv runs through TensorFlow's fused ops (kunet.kernels.tensorflow_ops).

It must be the Keras sublayers' exact semantics: outputs, moving statistics after a training step,
gradients of the input and of every trainable variable, inference (BN folded into the convolutions),
frozen BN, mixed precision, inside ``tf.function`` as ``model.fit`` runs it.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.tensorflow


def _run(layer, x, training, sublayers, graph=False):
    import tensorflow as tf

    variables = layer.trainable_variables

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer.call_sublayers(x, training) if sublayers else layer(x, training=training)
            weights = tf.reshape(tf.linspace(-1.0, 1.0, tf.size(out)), tf.shape(out))
            loss = tf.reduce_sum(tf.cast(out, tf.float32) * weights)
        return out, tape.gradient(loss, [x] + [v.value for v in variables])

    if graph:
        step = tf.function(step)
    out, grads = step(tf.constant(x))
    return (
        np.asarray(tf.cast(out, tf.float32)),
        [np.asarray(tf.cast(g, tf.float32)) for g in grads],
        [keras.ops.convert_to_numpy(v) for v in layer.non_trainable_variables],
    )


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cin, cout, h, w", [(1, 8, 7, 9), (3, 16, 13, 5)])
def test_tensorflow_ops_match_sublayers(
    cin, cout, h, w, training, graph, double_conv_twins, assert_close
):
    ours, ref = double_conv_twins(cin, cout)
    x = np.random.default_rng(1).normal(size=(2, h, w, cin)).astype("float32")
    got, want = _run(ours, x, training, False, graph), _run(ref, x, training, True, graph)
    assert_close(got, want)  # outputs, gradients, moving statistics
    if training:
        assert not np.allclose(
            got[2][0], double_conv_twins(cin, cout)[0].non_trainable_variables[0]
        )


def test_moving_statistics_are_the_biased_batch_statistics(double_conv_twins):
    """With momentum 0 the moving statistics are the batch's own (FusedBatchNorm's are unbiased)."""
    ours, ref = double_conv_twins(3, 8, bn_momentum=0.0)
    x = (3 * np.random.default_rng(5).normal(size=(2, 6, 5, 3)) + 1).astype("float32")
    got, want = _run(ours, x, True, False), _run(ref, x, True, True)
    for g, r in zip(got[2], want[2], strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-5)


def test_tensorflow_path_is_taken(monkeypatch, double_conv_twins):
    import tensorflow as tf

    from kunet import _fused

    layer, _ = double_conv_twins(3, 4)
    assert _fused.use_tensorflow_ops(layer, tf.zeros((1, 4, 4, 3)))
    assert not _fused.use_tensorflow_ops(layer, keras.KerasTensor((1, 4, 4, 3)))
    for option in ("center", "scale", "synchronized"):  # BN options the path does not implement
        other, _ = double_conv_twins(3, 4)
        setattr(other.bn2, option, option == "synchronized")
        assert not _fused.use_tensorflow_ops(other, tf.zeros((1, 4, 4, 3)))
    calls = []
    original = _fused.tensorflow_double_conv
    monkeypatch.setattr(
        _fused, "tensorflow_double_conv", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    layer(tf.zeros((1, 4, 4, 3)), training=True)
    assert calls == [1]


def test_without_batch_norm(double_conv_twins, assert_close):
    ours, ref = double_conv_twins(3, 8, batch_norm=False)
    x = np.random.default_rng(2).normal(size=(1, 6, 7, 3)).astype("float32")
    got, want = _run(ours, x, True, False), _run(ref, x, True, True)
    assert_close(got[:2], want[:2])  # outputs, gradients


def test_frozen_batch_norm_runs_in_inference_mode(double_conv_twins, assert_close):
    ours, ref = double_conv_twins(3, 8)
    for layer in (ours, ref):
        layer.bn1.trainable = layer.bn2.trainable = False
    x = np.random.default_rng(3).normal(size=(2, 5, 5, 3)).astype("float32")
    got, want = _run(ours, x, True, False), _run(ref, x, True, True)
    assert_close(got[:2], want[:2])  # outputs, gradients
    for g, r in zip(got[2], want[2], strict=True):
        np.testing.assert_array_equal(g, r)  # moving statistics untouched


@pytest.mark.parametrize("training", [True, False])
def test_mixed_precision(training, double_conv_twins, assert_as_accurate):
    x = np.random.default_rng(4).normal(size=(2, 9, 7, 3)).astype("float32")
    truth = _run(double_conv_twins(3, 8)[0], x, training, True)  # float32 sublayers
    keras.config.set_dtype_policy("mixed_float16")
    ours, ref = double_conv_twins(3, 8)
    got, want = _run(ours, x, training, False), _run(ref, x, training, True)
    assert_as_accurate(got, want, truth)
