"""PyTorch UNet checkpoints as kunet models: ``kunet convert`` and the functions behind it.

Two key layouts of a PyTorch UNet state dict are read (``LAYOUTS``; ``layout="auto"`` recognises
them from the top-level module names):

* ``"tutorial"``: the classic tutorial UNet (Aladdin Persson's): ``downs.<i>`` (DoubleConv per
  encoder level), ``bottleneck``, ``ups.<2k>`` (``ConvTranspose2d(2f, f, 2, 2)``) alternating with
  ``ups.<2k+1>`` (DoubleConv(2f, f)), deepest level first, and ``final_conv`` (1x1 Conv2d). Its
  DoubleConv is ``conv = Sequential(Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU)``:
  keys ``downs.0.conv.{0,1,3,4}.*``.
* ``"milesial"``: milesial/Pytorch-UNet with ``bilinear=False``: ``inc`` and
  ``down<k>.maxpool_conv.1`` (DoubleConv, ``double_conv.{0,1,3,4}.*``), ``up<k>.up``
  (ConvTranspose2d) and ``up<k>.conv`` (DoubleConv), ``outc.conv`` (1x1 Conv2d); any depth (the
  repository's is 4). Its ``bilinear=True`` variant (``nn.Upsample(align_corners=True)`` without
  weights, DoubleConvs with ``mid_channels``, a halved bottleneck) has no kunet counterpart: kunet's
  ``upsampling="bilinear"`` is a half-pixel resize followed by a 2x2 convolution. Such checkpoints
  are refused with an error saying so.

Both are the network :class:`kunet.UNet` builds with its defaults (``block="double_conv"``,
``upsampling="transpose"``, plain skips, batch norm): the same convolutions, 2x2 max-pooling,
bottleneck of ``2 * filters[-1]``, and decoder blocks on the channel concatenation ``[skip,
up-sampled]``, skip first, as ``torch.cat((skip, x), dim=1)`` in both layouts, so the first decoder
kernels copy over without permuting their input channels.

Conversion: Conv2d weights OIHW -> HWIO; ConvTranspose2d weights (in, out, kH, kW) -> Keras'
``Conv2DTranspose`` kernel (kH, kW, out, in) (no spatial flip); BatchNorm2d ``weight, bias,
running_mean, running_var`` -> ``gamma, beta, moving_mean, moving_variance``
(``num_batches_tracked`` is ignored). A convolution bias before a BatchNorm (older variants of both
layouts) is folded into ``moving_mean``. PyTorch normalises with eps 1e-5 (not stored in a state
dict; ``bn_epsilon=`` if the model used another) and Keras' BatchNormalization with 1e-3, which
kunet's DoubleConv does not save; the difference is folded into ``moving_variance`` (``running_var +
1e-5 - 1e-3``; where that would fall below 0, the variance is set to 0 and ``gamma`` rescaled), so
the converted model's inference outputs equal the PyTorch model's, also after saving and loading.

Outputs: the PyTorch models return logits, and so does the converted model (``output_activation=None``,
kunet's default): ``num_classes=1`` gives one logit channel (apply a sigmoid), more give one per class
(softmax over the last axis). kunet is channels-last: ``model.predict(x)`` with ``x`` of shape
(N, H, W, C) equals ``torch_model(x.transpose(0, 3, 1, 2)).permute(0, 2, 3, 1)``.

Sizes: at sides that are multiples of ``2 ** depth`` the outputs are equal. At other sizes each
framework does its own thing: kunet zero-pads the *input* (centred) to the next multiple and crops
the output back, the tutorial model resizes the up-sampled tensor to the skip's size and milesial's
zero-pads it; the outputs then differ (mostly near the borders). The kunet output at any size equals
the PyTorch model's on the centred zero-padded input, cropped back.

Example:
    >>> from kunet.convert import unet_from_torch
    >>> model = unet_from_torch(torch.load("unet.pth", map_location="cpu", weights_only=True))
    >>> model.save("unet.keras")     # or: kunet convert --torch unet.pth --out unet.keras
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

LAYOUTS = ("tutorial", "milesial")
TORCH_BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default eps
CHECKPOINT_KEYS = ("state_dict", "model_state_dict")  # checkpoint dicts that wrap the state dict
PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel / DistributedDataParallel, torch.compile
_LIST_LIMIT = 12  # entries per kind of problem in an error message


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a layout keeps each part of a UNet of ``depth`` levels (level 0: full resolution).

    ``encoder(i, depth)``, ``bottleneck(depth)``, ``decoder(i, depth)`` are DoubleConv prefixes (the
    Sequential holding ``0`` conv, ``1`` BN, ``3`` conv, ``4`` BN), ``up(i, depth)`` the
    ConvTranspose2d that feeds decoder level ``i``, ``head`` the 1x1 Conv2d; ``signature`` the
    top-level module names that identify the layout, ``levels`` the pattern whose distinct matches
    count the levels."""

    name: str
    description: str
    signature: tuple[str, ...]
    levels: str
    encoder: Callable[[int, int], str]
    bottleneck: Callable[[int], str]
    up: Callable[[int, int], str]
    decoder: Callable[[int, int], str]
    head: str

    def depth(self, keys) -> int:
        return len({m.group(1) for k in keys if (m := re.match(self.levels, k))})

    def recognises(self, roots) -> bool:
        return sum(name in roots for name in self.signature) >= 2


_LAYOUTS = {
    "tutorial": Layout(
        name="tutorial",
        description="the tutorial UNet: downs.<i>, bottleneck, ups.<i>, final_conv",
        signature=("downs", "ups", "bottleneck", "final_conv"),
        levels=r"downs\.(\d+)\.",
        encoder=lambda i, depth: f"downs.{i}.conv",
        bottleneck=lambda depth: "bottleneck.conv",
        up=lambda i, depth: f"ups.{2 * (depth - 1 - i)}",
        decoder=lambda i, depth: f"ups.{2 * (depth - 1 - i) + 1}.conv",
        head="final_conv",
    ),
    "milesial": Layout(
        name="milesial",
        description="milesial/Pytorch-UNet: inc, down<k>, up<k>, outc",
        signature=("inc", "down1", "up1", "outc"),
        levels=r"down(\d+)\.",
        encoder=lambda i, depth: (
            "inc.double_conv" if i == 0 else f"down{i}.maxpool_conv.1.double_conv"
        ),
        bottleneck=lambda depth: f"down{depth}.maxpool_conv.1.double_conv",
        up=lambda i, depth: f"up{depth - i}.up",
        decoder=lambda i, depth: f"up{depth - i}.conv.double_conv",
        head="outc.conv",
    ),
}


# ---------------------------------------------------------------------------------- public API
def from_torch_state_dict(model, state_dict, layout="auto", *, bn_epsilon=TORCH_BN_EPSILON):
    """Load a PyTorch UNet's weights into ``model`` (a :class:`kunet.UNet`) and return the model.

    Args:
        model: a ``kunet.UNet`` with kunet's own encoder, ``block="double_conv"``,
            ``upsampling="transpose"``, plain skips, batch norm, 2D, no deep supervision (the
            network both layouts describe), whose ``filters``, input channels and ``num_classes``
            match the checkpoint.
        state_dict: a mapping of names to torch tensors or numpy arrays; also a checkpoint dict
            holding one under ``"state_dict"`` or ``"model_state_dict"``, or a ``torch.nn.Module``.
            ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are dropped.
        layout: ``"auto"`` (recognised from the keys), ``"tutorial"`` or ``"milesial"`` (see the
            module docstring).
        bn_epsilon: the eps of the PyTorch model's BatchNorm2d layers (not stored in a state dict;
            PyTorch's default 1e-5); folded into the moving variances.

    All or nothing: every key is checked first (missing, unexpected, mis-shaped) and any problem
    raises one ``ValueError`` listing them all, names and shapes, with no weight changed.
    """
    arrays = _arrays(state_dict)
    layout = _resolve_layout(arrays, layout)
    _check_model(model)
    plan = _Plan(arrays)
    depth = len(model.filters)
    for i in range(depth):
        plan.double_conv(layout.encoder(i, depth), model.get_layer(f"encoder{i + 1}_conv"))
        plan.conv(layout.up(i, depth), model.get_layer(f"decoder{i + 1}_up_transpose"))
        # both layouts concatenate (skip, up-sampled) as kunet's decoder blocks do: no permutation
        plan.double_conv(layout.decoder(i, depth), model.get_layer(f"decoder{i + 1}_conv"))
    plan.double_conv(layout.bottleneck(depth), model.get_layer("bottleneck_conv"))
    plan.conv(layout.head, model.get_layer("head"))
    problems = plan.problems()
    if problems:
        found = _describe(arrays, layout)
        raise ValueError(
            f"the {layout.name} state dict{f' ({found})' if found else ''} does not fit this UNet "
            f"(filters {tuple(model.filters)}, {model.unet_input_shape[-1]} input channel(s), "
            f"{model.num_classes} class(es)); no weight was changed:\n" + "\n".join(problems)
        )
    plan.assign(bn_epsilon)
    return model


def unet_from_torch(state_dict, layout="auto", *, bn_epsilon=TORCH_BN_EPSILON, **overrides):
    """A :class:`kunet.UNet` with the architecture and weights of a PyTorch UNet state dict.

    Inferred from the tensors: the depth and ``filters`` (each encoder level's output channels),
    the input channels (``input_shape=(None, None, C)``: any size) and ``num_classes`` (the head's
    output channels). ``overrides`` go to ``kunet.UNet`` (e.g. ``name``, ``input_shape`` with fixed
    sides, ``bn_momentum`` or ``dropout`` for fine-tuning, ``output_activation="sigmoid"`` for
    probabilities instead of logits). ``state_dict``, ``layout`` and ``bn_epsilon`` are those of
    :func:`from_torch_state_dict`; a path to a ``.pth`` file is read with ``torch.load``.
    """
    return _convert(state_dict, layout, bn_epsilon, overrides)[0]


def convert_file(torch_path, out, *, layout="auto", overwrite=False):
    """``kunet convert``: read the PyTorch checkpoint ``torch_path`` (``torch.load(...,
    map_location="cpu", weights_only=True)``), build the matching UNet (:func:`unet_from_torch`)
    and save it to ``out`` (a ``.keras`` file); print one summary line; return the model.

    An existing ``out`` is replaced only with ``overwrite``. The file is written atomically, and
    nothing is written on any error: every problem with the input raises
    :class:`kunet.io.DataError` naming the file (the CLI prints it and exits with status 2).
    """
    from kunet.io import DataError
    from kunet.outputs import atomic_save_model, check_existing, check_writable

    torch_path, out = Path(torch_path), Path(out)
    if out.suffix != ".keras":
        raise DataError(
            f"--out {out}: a kunet model is a .keras file; give a name ending in .keras"
        )
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give the .keras file's path")
    if not torch_path.is_file():
        raise DataError(f"--torch {torch_path}: no such file")
    if out.exists() and out.resolve() == torch_path.resolve():
        raise DataError(f"--out {out} is the --torch file itself; choose another name")
    if out.parent.is_dir():
        check_existing(out.parent, [out.name], overwrite, "--out folder")
    state = _load(torch_path)
    try:
        model, found = _convert(state, layout, TORCH_BN_EPSILON, {})
    except ValueError as e:
        raise DataError(f"--torch {torch_path}: {e}") from None
    made = out.parent  # the outermost folder check_writable creates, removed again on failure
    while not made.parent.exists():
        made = made.parent
    created = check_writable(out.parent, "--out folder")
    try:
        atomic_save_model(model, out)
    except BaseException:
        if created:
            import shutil

            shutil.rmtree(made, ignore_errors=True)
        raise
    print(
        f"{torch_path} ({found.name} layout) -> {out}: filters {tuple(model.filters)}, "
        f"{model.unet_input_shape[-1]} input channel(s), {model.num_classes} class(es), "
        f"{model.count_params():,} parameters; outputs logits"
    )
    return model


# ---------------------------------------------------------------------------------- reading
def _load(path):
    """``torch.load`` of a checkpoint file, tensors only; DataError naming the file otherwise."""
    from kunet.io import DataError, _one_line

    try:
        import torch
    except ImportError:
        raise DataError(
            f"--torch {path}: reading a PyTorch checkpoint needs PyTorch: pip install torch"
        ) from None
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        held = f" ({found.group(1)})" if found else ""
        raise DataError(
            f"--torch {path}: holds Python objects besides tensors{held}, which "
            "torch.load(weights_only=True) does not unpickle (a whole nn.Module saved with "
            "torch.save(model)?); save the network's state_dict() instead"
        ) from None
    except Exception as e:  # noqa: BLE001 - any reader failure is an unreadable checkpoint
        raise DataError(
            f"--torch {path}: cannot be read as a PyTorch checkpoint "
            f"({type(e).__name__}: {_one_line(e)[:200]})"
        ) from None


def _arrays(state_dict) -> dict:
    """The state dict as ``{name: numpy array}``, unwrapped and without wrapper prefixes."""
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = _load(state_dict)
    if callable(getattr(state_dict, "state_dict", None)):  # a torch.nn.Module
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            "expected a PyTorch state dict (a mapping of names to tensors), a checkpoint dict "
            f"holding one under {' or '.join(map(repr, CHECKPOINT_KEYS))}, or a torch.nn.Module; "
            f"got a {type(state_dict).__name__}"
        )
    for key in CHECKPOINT_KEYS:
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
            break
    if not state_dict:
        raise ValueError("the state dict is empty")
    names = [str(k) for k in state_dict]
    for prefix in PREFIXES:
        if all(n.startswith(prefix) for n in names):
            names = [n[len(prefix) :] for n in names]
    arrays, bad = {}, []
    for name, value in zip(names, state_dict.values(), strict=True):
        array = _to_numpy(value)
        if array is None:
            bad.append(f"{name} ({type(value).__name__})")
        else:
            arrays[name] = array
    if bad:
        raise ValueError(
            f"the state dict holds values that are not tensors: {', '.join(bad[:_LIST_LIMIT])}"
            + (f" and {len(bad) - _LIST_LIMIT} more" if len(bad) > _LIST_LIMIT else "")
        )
    return arrays


def _to_numpy(value):
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and str(tensor.dtype) != "torch.float32":
            tensor = tensor.float()  # half and bfloat16 (which numpy lacks) read as float32
        return tensor.numpy()
    if isinstance(value, (np.ndarray, np.generic, int, float)):
        return np.asarray(value)
    return None


def _resolve_layout(arrays, layout) -> Layout:
    if layout != "auto" and layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}; got {layout!r}")
    roots = {k.split(".")[0] for k in arrays}
    matching = [lay for lay in _LAYOUTS.values() if lay.recognises(roots)]
    if layout == "auto":
        if len(matching) > 1:
            raise ValueError(
                "the state dict's keys fit more than one layout "
                f"({', '.join(lay.name for lay in matching)}); pass layout=... to choose"
            )
        if not matching:
            known = "; ".join(f"{lay.name!r}: {lay.description}" for lay in _LAYOUTS.values())
            raise ValueError(
                f"not a UNet state dict of a layout kunet reads ({known}); its top-level modules "
                f"are {_names(sorted(roots))}"
            )
        found = matching[0]
    else:
        found = _LAYOUTS[layout]
        if found not in matching:
            raise ValueError(
                f"the state dict is not in the {layout!r} layout ({found.description}); its "
                f"top-level modules are {_names(sorted(roots))}"
            )
    if found.name == "milesial":
        depth = found.depth(arrays)
        if depth and not any(f"{found.up(i, depth)}.weight" in arrays for i in range(depth)):
            raise ValueError(
                "this is milesial/Pytorch-UNet's bilinear=True variant (up<k>.up has no weights: "
                "nn.Upsample(align_corners=True), DoubleConvs with mid_channels, a halved "
                "bottleneck), which kunet's UNet cannot express (its upsampling='bilinear' is a "
                "half-pixel resize and a 2x2 convolution); only bilinear=False checkpoints "
                "(ConvTranspose2d up-sampling) convert"
            )
    return found


def _shape(arrays, key):
    """The shape of a 4D convolution weight ``key``; ValueError naming it when absent or not 4D."""
    if key not in arrays:
        raise ValueError(f"{key} is missing, so the architecture cannot be inferred")
    shape = arrays[key].shape
    if len(shape) != 4:
        raise ValueError(f"{key} has shape {tuple(shape)}; a Conv2d weight (out, in, kH, kW) is 4D")
    return shape


def _infer(arrays, layout):
    """``(filters, input channels, classes)`` of the checkpoint, from its convolution weights."""
    depth = layout.depth(arrays)
    if depth == 0:
        raise ValueError(f"the state dict has no encoder levels ({layout.description})")
    filters = tuple(
        int(_shape(arrays, f"{layout.encoder(i, depth)}.0.weight")[0]) for i in range(depth)
    )
    channels = int(_shape(arrays, f"{layout.encoder(0, depth)}.0.weight")[1])
    classes = int(_shape(arrays, f"{layout.head}.weight")[0])
    bottleneck = int(_shape(arrays, f"{layout.bottleneck(depth)}.0.weight")[0])
    if bottleneck != 2 * filters[-1]:
        raise ValueError(
            f"the bottleneck ({layout.bottleneck(depth)}) has {bottleneck} filters where kunet's "
            f"UNet has 2 * filters[-1] = {2 * filters[-1]} (filters {filters})"
        )
    return filters, channels, classes


def _describe(arrays, layout) -> str:
    try:
        filters, channels, classes = _infer(arrays, layout)
    except ValueError:
        return ""
    return f"filters {filters}, {channels} input channel(s), {classes} class(es)"


def _convert(state_dict, layout, bn_epsilon, overrides):
    """``(model, layout)``: :func:`unet_from_torch` and the layout it read."""
    from kunet.model import UNet

    arrays = _arrays(state_dict)
    found = _resolve_layout(arrays, layout)
    filters, channels, classes = _infer(arrays, found)
    config = {"num_classes": classes, "filters": filters, "input_shape": (None, None, channels)}
    model = UNet(**(config | overrides))
    return from_torch_state_dict(model, arrays, found.name, bn_epsilon=bn_epsilon), found


# ---------------------------------------------------------------------------------- mapping
_REQUIRED = {  # what kunet.UNet must be for a torch UNet to map onto it: attribute -> value
    "encoder": None,
    "block": "double_conv",
    "skips": "plain",
    "attention": False,
    "batch_norm": True,
    "upsampling": "transpose",
    "spatial_dims": 2,
    "deep_supervision": False,
}


def _check_model(model):
    from kunet.model import UNet

    if not isinstance(model, UNet):
        raise ValueError(f"model must be a kunet.UNet; got a {type(model).__name__}")
    wrong = [f"{k}={getattr(model, k)!r}" for k, v in _REQUIRED.items() if getattr(model, k) != v]
    if wrong:
        want = ", ".join(f"{k}={v!r}" for k, v in _REQUIRED.items())
        raise ValueError(
            f"the PyTorch UNet layouts map onto a kunet.UNet with {want}; this one has "
            f"{', '.join(wrong)}"
        )


def _torch_shape(kernel_shape):
    """The torch shape of a Keras Conv2D kernel (kH, kW, in, out) -> (out, in, kH, kW), which is
    also that of a Conv2DTranspose kernel (kH, kW, out, in) -> ConvTranspose2d (in, out, kH, kW)."""
    kh, kw, a, b = kernel_shape
    return (b, a, kh, kw)


class _Plan:
    """The torch keys a UNet reads (with their expected shapes and kunet targets) and the values
    it will assign, collected first so that every problem is reported before anything changes."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.expected = {}  # key -> (torch shape or None for any, kunet target, required)
        self.steps = []  # callables (bn_epsilon) -> [(variable, value), ...]

    def want(self, key, shape, target, required=True):
        self.expected[key] = (None if shape is None else tuple(shape), target, required)

    def conv(self, prefix, layer):
        """A Conv2d / ConvTranspose2d (weight and bias) onto a Keras convolution layer."""
        kernel, bias = layer.kernel, layer.bias
        self.want(f"{prefix}.weight", _torch_shape(kernel.shape), _target(kernel))
        self.want(f"{prefix}.bias", bias.shape, _target(bias))
        self.steps.append(
            lambda eps: [
                (kernel, self.arrays[f"{prefix}.weight"].transpose(2, 3, 1, 0)),
                (bias, self.arrays[f"{prefix}.bias"]),
            ]
        )

    def double_conv(self, prefix, layer):
        """``Sequential(Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU)`` onto a DoubleConv."""
        for index, conv, bn in ((0, layer.conv1, layer.bn1), (3, layer.conv2, layer.bn2)):
            c, b = f"{prefix}.{index}", f"{prefix}.{index + 1}"
            self.want(f"{c}.weight", _torch_shape(conv.kernel.shape), _target(conv.kernel))
            n = (conv.kernel.shape[-1],)
            self.want(f"{c}.bias", n, f"{_target(bn.moving_mean)} (folded in)", required=False)
            for name, variable in (("weight", bn.gamma), ("bias", bn.beta),
                                   ("running_mean", bn.moving_mean),
                                   ("running_var", bn.moving_variance)):  # fmt: skip
                self.want(f"{b}.{name}", n, _target(variable))
            self.want(f"{b}.num_batches_tracked", None, "(not used)", required=False)
            self.steps.append(
                lambda eps, c=c, b=b, conv=conv, bn=bn: self._conv_bn(c, b, conv, bn, eps)
            )

    def _conv_bn(self, c, b, conv, bn, eps):
        a = self.arrays
        gamma, beta, var = (
            a[f"{b}.{n}"].astype("float64") for n in ("weight", "bias", "running_var")
        )
        mean = a[f"{b}.running_mean"].astype("float64")
        if f"{c}.bias" in a:  # BN(conv(x) + bias) == BN'(conv(x)) with the mean shifted by bias
            mean = mean - a[f"{c}.bias"]
        # torch: gamma (x - mean) / sqrt(var + eps); Keras adds its own epsilon to moving_variance
        total = var + eps
        moving = total - bn.epsilon
        low = moving < 0
        gamma = np.where(low, gamma * np.sqrt(bn.epsilon / np.where(low, total, 1.0)), gamma)
        moving = np.where(low, 0.0, moving)
        return [
            (conv.kernel, a[f"{c}.weight"].transpose(2, 3, 1, 0)),
            (bn.gamma, gamma),
            (bn.beta, beta),
            (bn.moving_mean, mean),
            (bn.moving_variance, moving),
        ]

    def problems(self) -> list:
        """One line per kind of problem (missing, mis-shaped, unexpected keys), or []."""
        missing, misshaped = [], []
        for key, (shape, target, required) in self.expected.items():
            if key not in self.arrays:
                if required:
                    missing.append(f"{key} {shape} -> kunet {target}")
            elif shape is not None and tuple(self.arrays[key].shape) != shape:
                misshaped.append(
                    f"{key}: torch {tuple(self.arrays[key].shape)} vs kunet {target} "
                    f"(wants torch {shape})"
                )
        unexpected = [
            f"{k} {tuple(v.shape)}" for k, v in self.arrays.items() if k not in self.expected
        ]
        lines = []
        for what, entries in (("missing", missing), ("mis-shaped", misshaped),
                              ("unexpected", unexpected)):  # fmt: skip
            if entries:
                lines.append(f"  {what} ({len(entries)}): {_names(entries, '; ')}")
        return lines

    def assign(self, bn_epsilon):
        """Assign every value; all or nothing (the old values come back if an assignment fails)."""
        pairs = [pair for step in self.steps for pair in step(bn_epsilon)]
        values = []
        for variable, value in pairs:
            value = np.asarray(value, dtype=variable.dtype)
            if tuple(value.shape) != tuple(variable.shape):  # _Plan.problems rules this out
                raise AssertionError(f"{variable.path}: {value.shape} vs {tuple(variable.shape)}")
            values.append(value)
        old = [np.array(variable.numpy()) for variable, _ in pairs]
        try:
            for (variable, _), value in zip(pairs, values, strict=True):
                variable.assign(value)
        except BaseException:
            for (variable, _), value in zip(pairs, old, strict=True):
                variable.assign(value)
            raise


def _target(variable) -> str:
    return f"{variable.path} {tuple(variable.shape)}"


def _names(entries, sep=", ") -> str:
    shown = sep.join(entries[:_LIST_LIMIT])
    more = len(entries) - _LIST_LIMIT
    return shown + (f"{sep}and {more} more" if more > 0 else "")
