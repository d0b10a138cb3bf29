"""Checks of user data with errors that name the argument and the offending shape or value.

Arrays are checked whole (cheap next to training). Datasets and loaders (``tf.data.Dataset``,
``keras.utils.PyDataset``, torch ``DataLoader``) are checked on their first batch only, which catches
wrong channel counts, mismatched masks and wrong label ranges before the first step without a pass over
the data. Python generators are not checked (peeking would consume them).
"""

from __future__ import annotations

import numpy as np

from kunet.io import check_nan_policy, count_nonfinite, nonfinite_message, show


def _as_array(value):
    if value is None or isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy") and hasattr(value, "shape"):  # tf tensor
        return value.numpy()
    if hasattr(value, "shape") and hasattr(value, "__array__"):  # jax array & co
        return np.asarray(value)
    return None


def _first_batch(data):
    """The first (x, y) of a dataset-like object, or None where peeking is not safe or possible."""
    module = type(data).__module__ or ""
    try:
        if module.startswith("tensorflow"):
            batch = next(iter(data.take(1)))
        elif module.startswith("torch.utils.data"):
            batch = next(iter(data))
        elif hasattr(data, "__getitem__") and hasattr(data, "on_epoch_end"):  # PyDataset
            if len(data) == 0:
                return None
            batch = data[0]
        else:
            return None
    except StopIteration:
        return None
    if isinstance(batch, dict):
        return None
    if isinstance(batch, (tuple, list)):
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        return x, y
    return batch, None


def check_data(x, y, *, channels, num_classes, input_shape=None, where="x", nan_policy="error",
               spatial_dims=2):  # fmt: skip
    """Validate images ``x`` and masks ``y`` (either may be a dataset yielding (x, y) batches).

    Returns ``x``, with NaN/inf values replaced by 0 where ``nan_policy`` is 'zero' and ``x`` is an
    array (a dataset is returned as it is: its first batch is checked, the rest is guarded in the
    training step).
    """
    xa = _as_array(x)
    peeked = False
    if xa is None and x is not None:
        first = _first_batch(x)
        if first is None:
            return x
        xa, ya = _as_array(first[0]), _as_array(first[1])
        if xa is None:
            return x
        label = f"{where} (first batch)"
        y_label = f"{where} masks (first batch)"
        peeked = True
        if nan_policy == "zero":
            raise ValueError(
                f"nan_policy='zero' replaces NaN/inf in arrays, but {where} is a dataset: replace "
                "them in its pipeline (e.g. np.nan_to_num), or pass nan_policy='ignore'"
            )
    else:
        ya = _as_array(y)
        label = where
        y_label = "y" if where == "x" else f"{where} masks"
    if xa is None:
        return x
    check_images(xa, channels=channels, input_shape=input_shape, name=label,
                 spatial_dims=spatial_dims)  # fmt: skip
    if ya is not None:
        check_masks(ya, xa.shape, num_classes=num_classes, name=y_label, images_name=label)
    cleaned = check_finite(xa, nan_policy, name=label)
    return x if peeked or cleaned is xa else cleaned


def check_finite(x, nan_policy="error", name="x"):
    """``x`` (N, ...) under ``nan_policy``: 'error' raises ValueError naming the first image index
    holding NaN/inf and the counts; 'zero' returns a copy with them set to 0; 'ignore' returns ``x``."""
    check_nan_policy(nan_policy)
    if nan_policy == "ignore" or count_nonfinite(x) == 0:
        return x
    if nan_policy == "zero":
        return np.where(np.isfinite(x), x, 0).astype(x.dtype)
    per_image = [count_nonfinite(image) for image in x]
    bad = [i for i, n in enumerate(per_image) if n]
    raise ValueError(
        nonfinite_message(f"{name}[{bad[0]}]", per_image[bad[0]], x[0].size)
        + (f"; {len(bad)} of the {len(x)} images do ({show(bad)})" if len(bad) > 1 else "")
    )


_AXES = {2: "H, W", 3: "D, H, W"}


def check_images(x, *, channels, input_shape=None, name="x", spatial_dims=2):
    axes = _AXES[spatial_dims]
    if x.ndim != spatial_dims + 2:
        what = "images" if spatial_dims == 2 else "volumes"
        hint = ""
        if x.ndim == 5 and spatial_dims == 2:
            hint = "; for volumes build the model with spatial_dims=3"
        elif x.ndim == 4 and spatial_dims == 3:
            hint = "; this model takes volumes: for images build it with spatial_dims=2"
        raise ValueError(
            f"{name} must be a batch of {what} shaped (N, {axes}, {channels}) (channels last); "
            f"got shape {tuple(x.shape)}{hint}"
        )
    if x.shape[-1] != channels:
        none = "None, " * spatial_dims
        raise ValueError(
            f"{name} has {x.shape[-1]} channels (shape {tuple(x.shape)}) but the model expects "
            f"{channels} (input_shape={tuple(input_shape) if input_shape else None}); "
            f"build the model with input_shape=({none}{x.shape[-1]})"
        )
    if input_shape is not None:
        for axis, want in enumerate(input_shape[:-1], start=1):
            if want is not None and x.shape[axis] != want:
                raise ValueError(
                    f"{name} has spatial size {tuple(x.shape[1:-1])} but the model was built for "
                    f"input_shape={tuple(input_shape)}; use None for {axes} to accept any size"
                )


def check_masks(y, image_shape, *, num_classes, name="y", images_name="x"):
    spatial = tuple(image_shape[:-1])  # (N, *spatial)
    shape = tuple(y.shape)
    if shape not in (spatial, spatial + (1,)):
        hint = ""
        if y.ndim == len(image_shape) and shape[:-1] == spatial and shape[-1] == num_classes > 1:
            hint = " (one-hot masks: pass integer class indices, e.g. y.argmax(-1))"
        axes = "N, H, W" if len(spatial) == 3 else "N, D, H, W"
        raise ValueError(
            f"{name} has shape {shape}, which does not match {images_name} of shape "
            f"{tuple(image_shape)}: masks must be shaped ({axes}) or ({axes}, 1) = "
            f"{spatial} or {spatial + (1,)}{hint}"
        )
    if y.size == 0:
        return
    bad = count_nonfinite(y)
    if bad:
        raise ValueError(f"{name} holds {bad} NaN/inf value(s); masks hold class indices")
    lo, hi = y.min(), y.max()
    if num_classes == 1:
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{name} values must lie in [0, 1] for num_classes=1 (binary masks); got values "
                f"from {lo} to {hi}. For masks stored as 0/255 divide by 255; for several "
                "classes build the model with num_classes=N"
            )
        return
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{name} values must be class indices in [0, {num_classes - 1}] for "
            f"num_classes={num_classes}; got values from {lo} to {hi}"
        )
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(
            f"{name} must hold integer class indices for num_classes={num_classes}; "
            "got non-integer values"
        )
