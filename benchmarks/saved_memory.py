"""Bytes a DoubleConv keeps alive for its backward pass, fused vs plain.

Counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor that autograd saves during
the forward (by built-in ops or by ``ctx.save_for_backward``) goes through the pack hook; distinct
storages are counted once (the plain path saves some tensors twice, e.g. a ReLU output that is also
the next convolution's input), and the layer's own variables are left out (they are alive anyway).
"""

from __future__ import annotations


def saved_bytes(fn, exclude=()):
    """Run ``fn()`` and return ``(bytes saved for backward, fn's result)``.

    ``exclude``: tensors whose storages are not counted (the variables).
    """
    import torch

    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return sum(n for ptr, n in storages.items() if ptr not in skip), result


def double_conv_saved_bytes(layer, x, sublayers=False):
    """Bytes that ``layer`` (a :class:`kunet.layers.DoubleConv`) saves for backward, training mode.

    ``x``: NHWC torch tensor; it is made to require grad, as inside a model. ``sublayers``: run the
    Keras sublayers (``layer.call_sublayers``) rather than the path the layer's dispatch picks.
    """
    x = x.detach().requires_grad_(True)
    variables = [v.value for v in layer.weights]
    run = layer.call_sublayers if sublayers else layer
    n, _ = saved_bytes(lambda: run(x, training=True), exclude=variables)
    return n


def compare(n=2, h=64, w=64, c_in=32, c_out=64, dtype=None):
    """Saved bytes of one DoubleConv on one NHWC input, three ways: a dict of figures.

    ``fused``: the Triton path; ``plain``: the Keras Conv2D/BatchNormalization/ReLU sublayers (the
    reference the fused path is verified against); ``eager``: the torch backend's default plain path
    (:mod:`kunet.backends.torch_ops`: torch conv2d + fused batch norm). ``ratio`` is fused / plain,
    ``ratio_eager`` fused / eager.

    ``dtype``: a Keras dtype policy for the layers (e.g. ``"mixed_float16"``); None: float32.
    The fused side needs CUDA or ``TRITON_INTERPRET=1`` (set before the kernels are imported).
    """
    import keras
    import torch

    from kunet.layers import DoubleConv

    x = torch.randn(n, h, w, c_in, device="cuda" if torch.cuda.is_available() else "cpu")
    out = {"shape": f"N={n} {h}x{w} {c_in}->{c_out}", "dtype": dtype or "float32"}
    for name, fused, sublayers in (("fused", True, False), ("eager", False, False),
                                   ("plain", False, True)):  # fmt: skip
        keras.utils.set_random_seed(0)
        layer = DoubleConv(c_out, fused=fused, dtype=dtype)
        layer.build((None, None, None, c_in))
        out[name] = double_conv_saved_bytes(layer, x, sublayers=sublayers)
    elem = 2 if dtype and "16" in dtype else 4
    out["activation_bytes"] = n * h * w * c_out * elem  # one [N,H,W,Cout] tensor, compute dtype
    out["ratio"] = out["fused"] / out["plain"]
    out["ratio_eager"] = out["fused"] / out["eager"]
    return out
