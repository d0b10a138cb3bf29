"""Array inputs as a ``tf.data`` pipeline without autotuning, for ``kunet.UNet`` on TensorFlow.

Registered as ``UNet inputs`` "tensorflow" (:mod:`kunet.dispatch`): ``UNet.fit`` / ``evaluate`` /
``predict`` feed NumPy arrays through :func:`array_dataset` where the arguments allow it.

``model.fit(x, y)`` with NumPy arrays makes Keras build a ``tf.data`` pipeline with autotuned
prefetching and a parallel ``map``. On a machine with few cores, tf.data's autotuning threads compete
with the training step itself, and the same ``predict`` call ran at either of two very different
speeds from one call to the next (benchmarks/README.md). Feeding in-memory arrays needs no tuning:
this pipeline gathers each batch by index (as Keras does) with autotuning off and one batch
prefetched, and ran at the faster speed every time.

Same batches as Keras' array adapter: batches of ``batch_size`` in order (the last one partial), or a
fresh permutation every epoch with ``shuffle=True``; float64 arrays are cast to ``keras.config.floatx()``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kunet import dispatch


def _tensor(array):
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(keras.config.floatx())
    return tf.convert_to_tensor(array)


def array_dataset(arrays, batch_size, shuffle=False):
    """A ``tf.data.Dataset`` of batches of ``arrays`` (a tuple of equally long arrays).

    Yields a single tensor for one array (``predict``), else a tuple (``(x, y)``, ``(x, y, w)``).
    """
    tensors = tuple(_tensor(a) for a in arrays)
    n = int(tensors[0].shape[0])
    indices = tf.data.Dataset.range(n)
    if shuffle:
        indices = indices.shuffle(n, reshuffle_each_iteration=True)
    indices = indices.batch(batch_size)
    data = tf.data.Dataset.from_tensors(tensors).repeat()

    def take(i, data):
        batch = tuple(tf.gather(t, i) for t in data)
        return batch[0] if len(batch) == 1 else batch

    dataset = tf.data.Dataset.zip((indices, data)).map(take)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    return dataset.with_options(options).prefetch(1)


def _arrays(*values):
    """The values when all are NumPy arrays of one non-zero length (None entries are dropped)."""
    arrays = tuple(v for v in values if v is not None)
    if not arrays or not all(isinstance(a, np.ndarray) and a.ndim >= 1 for a in arrays):
        return None
    if len({len(a) for a in arrays}) != 1 or len(arrays[0]) == 0:
        return None
    return arrays


@dispatch.register(
    "UNet inputs",
    "tensorflow",
    rank=20,
    backends=("tensorflow",),
    description="NumPy arrays as a tf.data pipeline without autotuning threads",
    spatial_dims=(2, 3),
)
def feed_arrays(model, method, args) -> bool:
    """Replace array ``x`` / ``y`` / ``sample_weight`` (and ``validation_data``) in Keras' bound
    ``args`` by the equivalent ``tf.data`` pipeline. False, and nothing changed, where Keras' own
    array handling is needed (``validation_split``, ``class_weight``, ``steps``, ``shuffle="batch"``,
    non-array inputs)."""
    get = args.get
    if (get("kwargs") or {}).get("_use_cached_eval_dataset"):
        return False  # fit's own validation pass: Keras reuses the iterator it built
    if method == "predict":
        arrays = _arrays(get("x"))
        shuffle = False
    else:
        if get("y") is None:
            return False
        arrays = _arrays(get("x"), get("y"), get("sample_weight"))
        shuffle = get("shuffle", True) if method == "fit" else False
    if arrays is None or shuffle not in (True, False):
        return False
    if any(get(k) for k in ("steps", "steps_per_epoch", "validation_split", "class_weight")):
        return False
    batch_size = get("batch_size") or 32
    validation = get("validation_data")
    if validation is not None:
        val_arrays = _arrays(*validation) if isinstance(validation, (tuple, list)) else None
        if val_arrays is None or len(val_arrays) < 2 or get("validation_steps"):
            return False
        val_batch = get("validation_batch_size") or batch_size
        args["validation_data"] = array_dataset(val_arrays, val_batch)
        args["validation_batch_size"] = None
    args["x"] = array_dataset(arrays, batch_size, shuffle=shuffle)
    for key in ("y", "sample_weight", "batch_size"):
        if key in args:
            args[key] = None
    if method == "fit":
        args["shuffle"] = False  # the pipeline shuffles; Keras would warn about a dataset
    return True
