"""On the torch backend the plain DoubleConv runs through PyTorch's eager ops (kunet.kernels.torch_eager).

It must be the Keras sublayers' exact semantics: outputs, moving statistics after a training step,
gradients of the input and of every trainable variable, inference, frozen BN, mixed precision.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kunet.layers import DoubleConv

pytestmark = pytest.mark.torch

# |eager - sublayers| <= atol + rtol * max|sublayers|, per compute dtype
TOLERANCES = {"float32": (2e-5, 2e-5), "float16": (2e-3, 2e-3)}


def _twins(cin, cout, batch_norm=True, seed=0, bn_momentum=0.99):
    """Two identical DoubleConvs with non-trivial BN parameters and moving statistics."""
    rng = np.random.default_rng(seed)
    a, b = (DoubleConv(cout, batch_norm=batch_norm, bn_momentum=bn_momentum) for _ in range(2))
    a.build((None, None, None, cin))
    b.build((None, None, None, cin))
    weights = []
    for w in a.get_weights():
        if w.ndim == 1:  # gamma, beta, moving mean/variance, conv bias
            w = rng.uniform(0.5, 1.5, w.shape) if w.min() >= 1 else rng.normal(0, 0.3, w.shape)
        else:
            w = rng.normal(0, 0.3, w.shape)
        weights.append(w.astype("float32"))
    a.set_weights(weights)
    b.set_weights(weights)
    return a, b


def _run(layer, x, training, sublayers):
    import torch

    x = torch.tensor(x, requires_grad=True)
    out = layer.call_sublayers(x, training) if sublayers else layer(x, training=training)
    loss = (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
    variables = layer.trainable_variables
    grads = torch.autograd.grad(loss, [x] + [v.value for v in variables])
    return (
        out.detach().float().numpy(),
        [g.detach().float().numpy() for g in grads],
        [keras.ops.convert_to_numpy(v) for v in layer.non_trainable_variables],
    )


def _close(got, want, dtype="float32"):
    atol, rtol = TOLERANCES[dtype]
    bound = atol + rtol * float(np.abs(want).max())
    assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cin, cout, h, w", [(1, 8, 7, 9), (3, 16, 13, 5), (16, 8, 8, 8)])
def test_eager_matches_sublayers(cin, cout, h, w, training):
    eager, ref = _twins(cin, cout)
    x = np.random.default_rng(1).normal(size=(2, h, w, cin)).astype("float32")
    got, want = _run(eager, x, training, False), _run(ref, x, training, True)
    _close(got[0], want[0])
    for g, r in zip(got[1], want[1], strict=True):
        _close(g, r)
    for g, r in zip(got[2], want[2], strict=True):  # moving statistics
        _close(g, r)
    if training:
        assert not np.allclose(got[2][0], _twins(cin, cout)[0].non_trainable_variables[0])


def test_moving_statistics_are_the_biased_batch_statistics():
    """With momentum 0 the moving statistics are the batch's own: compared tightly."""
    eager, ref = _twins(3, 8, bn_momentum=0.0)
    x = (3 * np.random.default_rng(5).normal(size=(2, 6, 5, 3)) + 1).astype("float32")
    got, want = _run(eager, x, True, False), _run(ref, x, True, True)
    for g, r in zip(got[2], want[2], strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-6, atol=1e-6)


def test_eager_path_is_taken():
    import torch

    from kunet import _fused

    layer, _ = _twins(3, 4)
    assert _fused.use_torch_eager(layer, torch.zeros(1, 4, 4, 3))
    assert not _fused.use_torch_eager(layer, keras.KerasTensor((1, 4, 4, 3)))


def test_without_batch_norm():
    eager, ref = _twins(3, 8, batch_norm=False)
    x = np.random.default_rng(2).normal(size=(1, 6, 7, 3)).astype("float32")
    got, want = _run(eager, x, True, False), _run(ref, x, True, True)
    _close(got[0], want[0])
    for g, r in zip(got[1], want[1], strict=True):
        _close(g, r)


def test_frozen_batch_norm_runs_in_inference_mode():
    eager, ref = _twins(3, 8)
    for layer in (eager, ref):
        layer.bn1.trainable = layer.bn2.trainable = False
    x = np.random.default_rng(3).normal(size=(2, 5, 5, 3)).astype("float32")
    got, want = _run(eager, x, True, False), _run(ref, x, True, True)
    _close(got[0], want[0])
    for g, r in zip(got[2], want[2], strict=True):
        np.testing.assert_array_equal(g, r)  # moving statistics untouched


def test_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    eager, ref = _twins(3, 8)
    x = np.random.default_rng(4).normal(size=(2, 9, 7, 3)).astype("float32")
    got, want = _run(eager, x, True, False), _run(ref, x, True, True)
    assert got[0].dtype == np.float32  # compared in float32; the layer returned float16
    _close(got[0], want[0], "float16")
    for g, r in zip(got[1], want[1], strict=True):
        _close(g, r, "float16")
    for g, r in zip(got[2], want[2], strict=True):
        _close(g, r, "float16")
