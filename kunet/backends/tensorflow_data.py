"""Array inputs as a ``tf.data`` pipeline without autotuning, for ``kunet.UNet`` on TensorFlow.

``model.fit(x, y)`` with NumPy arrays makes Keras build a ``tf.data`` pipeline with autotuned
prefetching and a parallel ``map``. On a machine with few cores, tf.data's autotuning threads compete
with the training step itself: on 2 CPU cores the same ``predict`` call ran at either ~145 or ~75 img/s
from one call to the next, and ``fit`` at 18 to 31 img/s (benchmarks/README.md). Feeding in-memory
arrays needs no tuning: this pipeline gathers each batch by index (as Keras does) with autotuning
off and one batch prefetched, and ran at ~145 img/s every time.

Same batches as Keras' array adapter: batches of ``batch_size`` in order (the last one partial), or a
fresh permutation every epoch with ``shuffle=True``; float64 arrays are cast to ``keras.config.floatx()``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


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
