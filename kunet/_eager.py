"""Eager inference through a functional model's layers without Keras' per-layer ``__call__``.

On the torch backend a model runs eagerly, and Keras' ``Layer.__call__`` costs ~0.3 ms of Python per
layer (argument binding, input conversion and autocasting, pytree flattening of inputs and outputs,
call-context bookkeeping): measured on a 2-core CPU, a UNet 16-128 forward on a tiny input took 8 ms
through Keras against ~1 ms of torch work, ~12% of a batch of 8 at 128x128 (benchmarks/README.md).

:class:`EagerPlan` records the model's graph once (the public ``layer.input`` / ``layer.output`` of
each layer, in order) and replays it by calling each layer's ``call`` directly. That is exact only
where ``__call__`` adds nothing to an inference step, so a plan exists only when:

* every layer is one of the kunet/Keras layers listed in ``_PLAIN_CALL`` (their ``call`` is the whole
  computation), used once, with no activity regularizer;
* every layer computes in float32 (no autocasting to do) and the model has one input and one output.

The caller (:meth:`kunet.UNet.call`) uses it only for inference (``training`` falsy, no mask) on real
torch tensors; everything else takes Keras' own path. Tests: ``tests/test_eager.py``.
"""

from __future__ import annotations

import inspect

import keras

from kunet import layers as kl

# Layers whose ``call(inputs[, training])`` is their whole inference step: no masks, no state written,
# no losses added. Exact types: a subclass may rely on __call__.
_PLAIN_CALL = (
    kl.DoubleConv,
    kl.MaxPool2x,
    kl.Conv2D,
    kl.Conv2DTranspose,
    kl.PadToMultiple,
    kl.CropLike,
    kl.BilinearUpSampling2D,
    keras.layers.Concatenate,
    keras.layers.Dropout,
)


class EagerPlan:
    """The layers of a functional ``model`` in execution order, with where each one's inputs come from.

    ``EagerPlan.build(model)`` returns None when the model does not qualify (see the module docstring).
    """

    def __init__(self, steps, output_slot):
        # (call, input slots, inputs-as-list, accepts training); step i writes slot i + 1, slot 0
        # being the model's input
        self.steps = steps
        self.output_slot = output_slot

    @classmethod
    def build(cls, model):
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            return None
        slots = {id(model.inputs[0]): 0}
        steps = []
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if (
                type(layer) not in _PLAIN_CALL
                or getattr(layer, "activity_regularizer", None) is not None
                or layer.compute_dtype != "float32"
                or len(getattr(layer, "_inbound_nodes", ())) != 1
            ):
                return None
            inputs = layer.input
            as_list = isinstance(inputs, (list, tuple))
            sources = list(inputs) if as_list else [inputs]
            if any(id(t) not in slots for t in sources):
                return None  # not in execution order
            takes_training = "training" in inspect.signature(layer.call).parameters
            steps.append((layer.call, [slots[id(t)] for t in sources], as_list, takes_training))
            slots[id(layer.output)] = len(slots)
        output = slots.get(id(model.outputs[0]))
        return None if output is None else cls(steps, output)

    def __call__(self, x):
        values = [x]
        for call, sources, as_list, takes_training in self.steps:
            args = ([values[i] for i in sources],) if as_list else (values[sources[0]],)
            values.append(call(*args, training=False) if takes_training else call(*args))
        return values[self.output_slot]
