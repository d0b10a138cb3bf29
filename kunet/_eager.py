"""Eager inference through a functional model's layers without Keras' per-layer ``__call__``.

On the torch backend a model runs eagerly, and Keras' ``Layer.__call__`` costs Python per layer
(argument binding, input conversion and autocasting, pytree flattening of inputs and outputs,
call-context bookkeeping) that is a visible share of a small model's forward pass
(benchmarks/README.md).

:class:`EagerPlan` records the model's graph once (the public ``layer.input`` / ``layer.output`` of
each layer, in order) and replays it by calling each layer's ``call`` directly. That is exact only
where ``__call__`` adds nothing to an inference step, so a plan exists only when:

* every layer is one of the kunet/Keras layers listed in ``_PLAIN_CALL`` (their ``call`` is the whole
  computation), used once, with no activity regularizer;
* every layer computes in float32 (no autocasting to do) and the model has one input and one output.

It is the ``UNet`` "torch" implementation (:mod:`kunet.backends.torch_ops`), for inference
(``training`` falsy, no mask) on real torch tensors; everything else takes Keras' own path. Tests:
``tests/test_eager.py``.
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
    kl.TrilinearUpSampling3D,
    kl.Conv3DTranspose,
    kl.AttentionGate,
    kl.ResidualDoubleConv,
    keras.layers.Conv3D,
    keras.layers.Concatenate,
    keras.layers.Dropout,
)


class EagerPlan:
    """The layers of a functional ``model`` in execution order, with where each one's inputs come from.

    ``EagerPlan.plan_or_reason(model)`` says why when the model does not qualify (see the module
    docstring); :func:`replay_plan` caches the answer on the model.
    """

    def __init__(self, steps, output_slot):
        # (call, input slots, inputs-as-list, accepts training); step i writes slot i + 1, slot 0
        # being the model's input
        self.steps = steps
        self.output_slot = output_slot

    @classmethod
    def plan_or_reason(cls, model):
        """The plan, or why ``model`` does not qualify (a string)."""
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            return "more than one input or output"
        slots = {id(model.inputs[0]): 0}
        steps = []
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if type(layer) not in _PLAIN_CALL:
                return f"layer {layer.name} ({type(layer).__name__}) may rely on __call__"
            if getattr(layer, "activity_regularizer", None) is not None:
                return f"layer {layer.name} has an activity regularizer"
            if layer.compute_dtype != "float32":
                return f"layer {layer.name} computes in {layer.compute_dtype}"
            if len(getattr(layer, "_inbound_nodes", ())) != 1:
                return f"layer {layer.name} is used more than once"
            inputs = layer.input
            as_list = isinstance(inputs, (list, tuple))
            sources = list(inputs) if as_list else [inputs]
            if any(id(t) not in slots for t in sources):
                return "layers not in execution order"
            takes_training = "training" in inspect.signature(layer.call).parameters
            steps.append((layer.call, [slots[id(t)] for t in sources], as_list, takes_training))
            slots[id(layer.output)] = len(slots)
        output = slots.get(id(model.outputs[0]))
        return "the output is no layer's output" if output is None else cls(steps, output)

    def __call__(self, x):
        values = [x]
        for call, sources, as_list, takes_training in self.steps:
            args = ([values[i] for i in sources],) if as_list else (values[sources[0]],)
            values.append(call(*args, training=False) if takes_training else call(*args))
        return values[self.output_slot]


def replay_plan(model):
    """``model``'s :class:`EagerPlan` (built once), or None where it does not qualify."""
    plan = _plan_or_reason(model)
    return plan if isinstance(plan, EagerPlan) else None


def replay_refusal(model) -> str | None:
    """Why ``model`` has no :class:`EagerPlan`, or None."""
    plan = _plan_or_reason(model)
    return None if isinstance(plan, EagerPlan) else plan


def _plan_or_reason(model):
    if "_eager_plan_cache" not in model.__dict__:
        model.__dict__["_eager_plan_cache"] = EagerPlan.plan_or_reason(model)
    return model.__dict__["_eager_plan_cache"]
