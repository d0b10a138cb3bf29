"""Data-parallel training on the engines Keras has: JAX's ``keras.distribution.DataParallel`` (one
process or several) and TensorFlow's ``tf.distribute.MirroredStrategy``. kunet builds no engine of
its own; this module picks the devices, checks the request, keeps BatchNorm statistics global and
saved files portable, and splits kunet's datasets the way each engine needs.

>>> from kunet import distribute
>>> with distribute.data_parallel(2):                  # the first 2 devices (None: all of them)
...     model = kunet.UNet(num_classes=1, filters=(16, 32, 64))
...     model.fit(images, masks, batch_size=8)         # 8 images a step in all, 4 per device

Build (or load), compile and fit inside the block: the variables are laid out on the devices when
they are made. ``batch_size`` is the global batch: a step sees the same images as on one device, so
the run is the same optimization (the learning rate needs no scaling), split over the devices.

BatchNorm statistics:

* JAX: the training step is one program over the global batch, sharded by XLA, so the batch
  statistics (and the moving averages) are those of the global batch, as on one device. There is no
  per-replica mode.
* TensorFlow: each replica runs the step on its part of the batch. With ``sync_batchnorm=True``
  (default) every ``BatchNormalization`` made inside the block is synchronized (Keras'
  ``synchronized=True``: an all-reduce of the sums and counts), which sends kunet's DoubleConv to its
  plain Keras path (``kunet.explain`` says so); the layers' saved configs keep
  ``synchronized=False``, so a model saved inside the block loads on every backend. With
  ``sync_batchnorm=False`` each replica normalizes with its own statistics and each replica's copy of
  the moving statistics drifts apart (reading or saving the model gives the first replica's).
* PyTorch: Keras has no distribution for torch; :func:`data_parallel` raises (README.md,
  "Data-parallel training", says what works: torch DDP around your own loop).

Several processes (JAX): call :func:`initialize_processes` in every process before JAX starts, then
:func:`data_parallel`; each process feeds its own slice of every global batch
(:meth:`DataParallel.batches` cuts it from a ``keras.utils.PyDataset`` that yields the same global
batches in every process, as kunet's datasets do for one seed).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re

import keras

from kunet import dispatch

__all__ = [
    "DataParallel",
    "OneDevice",
    "ShardedBatches",
    "configure_cpu_devices",
    "data_parallel",
    "initialize_processes",
    "scope_for",
    "synchronize_batch_norm",
]

SUPPORTED_BACKENDS = ("jax", "tensorflow")
_README = "README.md, 'Data-parallel training'"
_strategies: dict = {}  # TensorFlow: one MirroredStrategy per device set and process (see _mirrored)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def _unsupported(what):
    backend = keras.backend.backend()
    return ValueError(
        f"{what} runs on KERAS_BACKEND=jax or tensorflow (Keras' data parallelism: "
        f"keras.distribution.DataParallel, tf.distribute.MirroredStrategy); KERAS_BACKEND is "
        f"{backend!r}. For PyTorch see {_README} (torch DDP around your own training loop)."
    )


def _jax_cpu_fix(count):
    return (
        f"kunet.distribute.configure_cpu_devices({count}) before JAX starts (its first "
        f"operation), or XLA_FLAGS=--xla_force_host_platform_device_count={count} set before "
        "Python starts"
    )


def _tensorflow_cpu_fix(count):
    return (
        f"kunet.distribute.configure_cpu_devices({count}) before TensorFlow starts (its first "
        f"operation), which splits the CPU into {count} logical devices "
        "(tf.config.set_logical_device_configuration)"
    )


# ---------------------------------------------------------------------------------- devices
def configure_cpu_devices(count):
    """Split this process's CPU into ``count`` devices, for data parallelism on a CPU (tests,
    trying it out; no faster than one device on a few cores: benchmarks/data_parallel.py).

    JAX: ``jax_num_cpu_devices`` (what ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
    does); TensorFlow: ``count`` logical CPU devices. Either must happen before the framework runs
    its first operation (importing kunet or Keras is fine): later, ``RuntimeError`` says so. GPUs
    are left alone. PyTorch: ``ValueError``.
    """
    count = _positive_int(count, "count")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if jax.config.jax_num_cpu_devices == count:
            return
        try:
            jax.config.update("jax_num_cpu_devices", count)
        except RuntimeError:
            raise RuntimeError(
                f"too late to split the CPU into {count} JAX devices: JAX has already run an "
                f"operation in this process. Call {_jax_cpu_fix(count)}."
            ) from None
    elif backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        current = tf.config.get_logical_device_configuration(cpu)
        if len(current or [cpu]) == count:
            return
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
            )
        except RuntimeError:
            raise RuntimeError(
                f"too late to split the CPU into {count} TensorFlow devices: TensorFlow has "
                "already run an operation in this process (its devices are fixed then). Call "
                f"{_tensorflow_cpu_fix(count)}, in a new process."
            ) from None
    else:
        raise _unsupported("configure_cpu_devices")


def _tensorflow_devices():
    """TensorFlow's devices to train on (logical GPUs, else logical CPUs) by name, and how to get
    more; counted from the configuration, without starting TensorFlow."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        count = sum(len(tf.config.get_logical_device_configuration(g) or [g]) for g in gpus)
        return [f"/gpu:{i}" for i in range(count)], "GPU", "a machine with more GPUs"
    cpu = tf.config.list_physical_devices("CPU")[0]
    count = len(tf.config.get_logical_device_configuration(cpu) or [cpu])
    return [f"/cpu:{i}" for i in range(count)], "CPU", None


def _mirrored(devices):
    """The MirroredStrategy of ``devices``, one per device set and process: a second strategy
    over the same devices reuses the collective instance keys of the first, and TensorFlow then
    mixes up their all-reduces (``Shape mismatch in the collective instance``)."""
    import tensorflow as tf

    if devices not in _strategies:
        _strategies[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _strategies[devices]


# ---------------------------------------------------------------------------------- processes
def initialize_processes(coordinator, num_processes, process_id):
    """Join a JAX job of ``num_processes`` processes; ``coordinator`` is ``"host:port"`` of process
    0 (which listens there), ``process_id`` this one's index (0 .. num_processes - 1).

    Calls ``keras.distribution.initialize`` (``jax.distributed.initialize``), with JAX's CPU
    collectives on gloo (TCP: loopback on one machine) so that CPU devices of different processes
    can all-reduce. Must run before JAX's first operation and before :func:`data_parallel`; every
    process must then build the model with the same seed (``keras.utils.set_random_seed``: JAX
    checks that the initial weights agree). Blocks until all processes have joined.
    """
    _check_processes(coordinator, num_processes, process_id)
    import jax

    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        keras.distribution.initialize(coordinator, num_processes, process_id)
    except RuntimeError as e:
        raise RuntimeError(
            f"could not join the JAX job as process {process_id} of {num_processes} at "
            f"{coordinator}: {e} (initialize_processes must run before JAX's first operation)"
        ) from None


def _check_processes(coordinator, num_processes, process_id):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        raise ValueError(
            "training across processes is implemented for KERAS_BACKEND=jax only (keras."
            "distribution with jax.distributed); on TensorFlow, train in one process "
            "(tf.distribute.MirroredStrategy over its devices: --devices N)"
        )
    if backend != "jax":
        raise _unsupported("training across processes")
    if not isinstance(coordinator, str) or not re.fullmatch(r"\[?[^\s]+\]?:\d{1,5}", coordinator):
        raise ValueError(f"coordinator must be 'host:port' of process 0; got {coordinator!r}")
    num_processes = _positive_int(num_processes, "num_processes")
    if isinstance(process_id, bool) or not isinstance(process_id, int):
        raise ValueError(f"process_id must be an int; got {process_id!r}")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must be in 0 .. {num_processes - 1} (num_processes={num_processes}); "
            f"got {process_id}"
        )


# ---------------------------------------------------------------------------------- BatchNorm
def synchronize_batch_norm(model_or_layer):
    """Make every ``BatchNormalization`` in ``model_or_layer`` (itself included) compute its batch
    statistics across the replicas of a TensorFlow strategy (``synchronized=True``), while its
    saved config keeps ``synchronized=False``: Keras refuses that option on JAX and PyTorch, and
    kunet models load on every backend. Needed only for a model built outside
    :meth:`DataParallel.scope` (inside, it happens as each layer is made); call it before the first
    training step."""
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "synchronized BatchNormalization is TensorFlow's (Keras' synchronized=True); on JAX "
            "the statistics are the global batch's already; KERAS_BACKEND is "
            f"{keras.backend.backend()!r}"
        )
    layers = [model_or_layer]
    if hasattr(model_or_layer, "_flatten_layers"):
        layers = list(model_or_layer._flatten_layers(include_self=True, recursive=True))
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            _synchronize(layer)
    dispatch.forget()  # a DoubleConv that already ran must look at its BNs again
    if getattr(model_or_layer, "train_function", None) is not None:
        model_or_layer.train_function = None  # traced with per-replica statistics: trace again
    return model_or_layer


def _portable_config(layer):
    return {**type(layer).get_config(layer), "synchronized": False}


def _synchronize(layer):
    layer.synchronized = True
    # an instance attribute: Keras' serialization calls layer.get_config()
    layer.__dict__["get_config"] = functools.partial(_portable_config, layer)


@contextlib.contextmanager
def _synchronizing():
    """Inside: every BatchNormalization made (kunet's DoubleConv makes its own in ``build``,
    ``load_model`` rebuilds them) is synchronized (:func:`synchronize_batch_norm`) as it is built.

    The hook is the class's ``build``, which Keras binds to each layer when the layer is made (so
    a layer made inside and built later is synchronized too); ``__init__`` is not wrapped: Keras
    reads its signature to record a layer's arguments."""
    cls = keras.layers.BatchNormalization
    original = cls.build

    def build(self, input_shape):
        _synchronize(self)
        return original(self, input_shape)

    cls.build = build
    try:
        yield
    finally:
        cls.build = original


# ---------------------------------------------------------------------------------- datasets
class ShardedBatches(keras.utils.PyDataset):
    """``dataset``'s batches (a ``keras.utils.PyDataset``) as a JAX data-parallel step takes them:
    each cut to a multiple of ``multiple`` samples (the devices in all: JAX shards a batch evenly
    or not at all), and with several processes, this process's ``1/processes`` of it.

    Only the last batch of an epoch is usually cut (``len(batch) % multiple`` samples dropped; a
    last batch smaller than ``multiple`` is dropped, by probing its size once). With several
    processes, ``dataset`` must yield the same global batches in every process (kunet's
    PatchDataset and TileDataset do, for one seed). ``on_epoch_end`` and the dataset's other
    attributes are passed on.
    """

    def __init__(self, dataset, multiple, processes=1, process_id=0):
        super().__init__(
            workers=dataset.workers,
            use_multiprocessing=dataset.use_multiprocessing,
            max_queue_size=dataset.max_queue_size,
        )
        self.dataset = dataset
        self.multiple = _positive_int(multiple, "multiple")
        self.processes = _positive_int(processes, "processes")
        self.process_id = process_id
        if multiple % processes:
            raise ValueError(f"{multiple} devices do not split over {processes} processes")
        self._length = len(dataset)
        if self._length and _batch_size(dataset[self._length - 1]) < self.multiple:
            self._length -= 1

    def __len__(self):
        return self._length

    def __getitem__(self, index):
        if not 0 <= index < self._length:
            raise IndexError(index)
        batch = self.dataset[index]
        kept = _batch_size(batch) // self.multiple * self.multiple
        share = kept // self.processes
        start = self.process_id * share
        return keras.tree.map_structure(lambda a: a[start : start + share], batch)

    def on_epoch_end(self):
        self.dataset.on_epoch_end()

    def __getattr__(self, name):  # the dataset's own attributes (e.g. kunet's ``error``)
        dataset = self.__dict__.get("dataset")
        if dataset is None:
            raise AttributeError(name)
        return getattr(dataset, name)


def _batch_size(batch):
    return len(keras.tree.flatten(batch)[0])


# ---------------------------------------------------------------------------------- the plan
class DataParallel:
    """Data parallelism over ``devices`` (see :func:`data_parallel`, which makes it).

    ``with dp:`` (or ``with dp.scope():``) is where a model is built, compiled and fitted.
    Attributes: ``backend``, ``devices`` (names, every process's), ``replicas`` (devices in all),
    ``processes``, ``process_id``, ``sync_batchnorm``, and the engine's object: ``distribution``
    (JAX, a ``keras.distribution.DataParallel``) or ``strategy`` (TensorFlow, a
    ``tf.distribute.MirroredStrategy``).
    """

    def __init__(self, devices=None, *, sync_batchnorm=True):
        backend = keras.backend.backend()
        if backend not in SUPPORTED_BACKENDS:
            raise _unsupported("kunet.distribute.data_parallel")
        if not isinstance(sync_batchnorm, bool):
            raise ValueError(f"sync_batchnorm must be True or False; got {sync_batchnorm!r}")
        self.backend = backend
        self.sync_batchnorm = sync_batchnorm
        self.distribution = self.strategy = None
        self.processes, self.process_id = 1, 0
        self._stack = None
        if backend == "jax":
            if not sync_batchnorm:
                raise ValueError(
                    "sync_batchnorm=False (per-replica BatchNorm statistics) exists on TensorFlow "
                    "only: JAX's data-parallel step computes the statistics over the global batch"
                )
            self._init_jax(devices)
        else:
            self._init_tensorflow(devices)
        self.replicas = len(self.devices)

    def _init_jax(self, devices):
        import jax

        local = jax.local_devices()
        count = len(local) if devices is None else devices
        if not isinstance(count, int):  # names, e.g. ["cpu:0", "cpu:1"]: Keras checks them
            self.devices = [str(d) for d in count]
        else:
            count = _positive_int(count, "devices")
            if count > len(local):
                kind = local[0].platform.upper()
                more = _jax_cpu_fix(count) if kind == "CPU" else "a machine with more devices"
                raise ValueError(
                    f"devices={count}, but JAX has {len(local)} {kind} device(s) here "
                    f"({', '.join(str(d) for d in local)}); for more: {more}"
                )
            wanted = {d.id for d in local[:count]}
            by_process = {}
            for d in jax.devices():  # every process's, in order: the mesh's
                by_process.setdefault(d.process_index, []).append(d)
            self.devices = [
                f"{d.platform}:{d.id}"
                for p, ds in sorted(by_process.items())
                for d in ds[:count]
                if p != jax.process_index() or d.id in wanted
            ]
        self.processes, self.process_id = jax.process_count(), jax.process_index()
        # each process feeds its own part of the batch (self.batches): no auto-sharding
        self.distribution = keras.distribution.DataParallel(
            devices=self.devices, auto_shard_dataset=False
        )

    def _init_tensorflow(self, devices):
        names, kind, more = _tensorflow_devices()
        if devices is None:
            chosen = names
        elif isinstance(devices, int):
            count = _positive_int(devices, "devices")
            if count > len(names):
                raise ValueError(
                    f"devices={count}, but TensorFlow has {len(names)} {kind} device(s) here; "
                    f"for more: {more or _tensorflow_cpu_fix(count)}"
                )
            chosen = names[:count]
        else:
            chosen = [str(d) for d in devices]
        self.devices = chosen
        self.strategy = _mirrored(tuple(chosen))

    # ------------------------------------------------------------------ scope
    @contextlib.contextmanager
    def scope(self):
        """Where the model is built (or loaded), compiled and fitted."""
        if self.backend == "jax":
            with self.distribution.scope():
                yield self
            return
        with self.strategy.scope():
            if self.sync_batchnorm:
                with _synchronizing():
                    yield self
            else:
                yield self

    def __enter__(self):
        if self._stack is not None:
            raise RuntimeError("this DataParallel is already entered")
        self._stack = contextlib.ExitStack()
        return self._stack.enter_context(self.scope())

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        return stack.__exit__(*exc)

    # ------------------------------------------------------------------ batches
    def check_batch_size(self, batch_size):
        """``ValueError`` unless the global ``batch_size`` splits evenly over the devices."""
        if batch_size % self.replicas:
            lower = batch_size // self.replicas * self.replicas
            options = " or ".join(str(b) for b in (lower, lower + self.replicas) if b > 0)
            raise ValueError(
                f"batch size {batch_size} does not split evenly over {self.replicas} devices; "
                f"use a multiple of {self.replicas} (e.g. {options}): the batch size is the "
                f"global one, each device takes batch size / {self.replicas}"
            )
        return batch_size // self.replicas

    def batches(self, dataset):
        """``dataset`` (a ``keras.utils.PyDataset`` of global batches, or None) as this engine
        takes it: JAX: a :class:`ShardedBatches` (batches cut to a multiple of the devices; with
        several processes, this process's slice); TensorFlow splits batches itself: ``dataset``."""
        if dataset is None or self.backend != "jax":
            return dataset
        return ShardedBatches(dataset, self.replicas, self.processes, self.process_id)

    def describe(self):
        """One line: the engine, the devices and how BatchNorm statistics are combined."""
        where = f"{self.replicas} devices ({', '.join(self.devices)})"
        if self.processes > 1:
            where += f" in {self.processes} processes (this one: {self.process_id})"
        if self.backend == "jax":
            return f"JAX DataParallel on {where}; BatchNorm statistics over the global batch"
        stats = "synchronized across replicas" if self.sync_batchnorm else "per replica"
        return f"TensorFlow MirroredStrategy on {where}; BatchNorm statistics {stats}"

    def __repr__(self):
        return f"<kunet.distribute.DataParallel: {self.describe()}>"


class OneDevice:
    """What :func:`scope_for` returns for one device: the same interface, doing nothing."""

    backend = None
    devices = ()
    replicas = processes = 1
    process_id = 0
    sync_batchnorm = True

    def scope(self):
        return contextlib.nullcontext(self)

    def check_batch_size(self, batch_size):
        return batch_size

    def batches(self, dataset):
        return dataset

    def describe(self):
        return "one device"


def data_parallel(devices=None, *, sync_batchnorm=True):
    """Data parallelism on this backend's engine: a :class:`DataParallel` to build, compile and fit
    a model in (``with kunet.distribute.data_parallel(2): ...``).

    Args:
        devices: None (every device of this process: GPUs, else CPUs), an int (the first that
            many; more than there are is a ``ValueError`` saying how to get more, e.g.
            :func:`configure_cpu_devices` on a CPU), or device names (JAX ``"cpu:0"``,
            TensorFlow ``"/gpu:0"``). With several JAX processes (:func:`initialize_processes`):
            per process, and the mesh takes every process's.
        sync_batchnorm: TensorFlow: BatchNorm statistics across the replicas (True, default) or
            per replica (False). JAX has only the first (the global batch's): False is a
            ``ValueError`` there.

    Raises ``ValueError`` on PyTorch (Keras has no distribution for it).
    """
    return DataParallel(devices, sync_batchnorm=sync_batchnorm)


def _cpu_only(backend):
    """Whether ``backend`` can only have CPU devices here, found without starting it (JAX: no
    accelerator plugin installed; TensorFlow: no physical GPU)."""
    if backend == "jax":
        plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")
        return not any(importlib.util.find_spec(name) for name in plugins)
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU")


def scope_for(devices=None, *, coordinator=None, num_processes=None, process_id=None):
    """What ``kunet train --devices N [--coordinator HOST:PORT --num-processes N --process-id I]``
    trains in, set up before anything runs: :class:`OneDevice` for ``devices`` None or 1 in one
    process, else a :class:`DataParallel` (joining the JAX job first, and splitting the CPU into
    ``devices`` devices where the backend has no GPU). Errors are ``ValueError`` / ``RuntimeError``
    saying what to change."""
    several = (coordinator, num_processes, process_id)
    if any(v is not None for v in several) and any(v is None for v in several):
        raise ValueError(
            "--coordinator, --num-processes and --process-id go together (every process: the "
            "same coordinator HOST:PORT and number of processes, its own id)"
        )
    if devices is not None:
        devices = _positive_int(devices, "--devices")
    if coordinator is None and devices in (None, 1):
        return OneDevice()
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise _unsupported("--devices / --num-processes")
    if coordinator is not None:
        _check_processes(coordinator, num_processes, process_id)  # before changing anything
    if devices is not None and devices > 1:
        cores = os.cpu_count() or 1
        if devices > cores and _cpu_only(backend):
            raise ValueError(
                f"--devices {devices}: there is no GPU here, and data parallelism on a CPU splits "
                f"its {cores} cores into devices: at most {cores}"
            )
        if backend == "jax":
            configure_cpu_devices(devices)  # the CPU client's: no effect on GPUs
        else:
            import tensorflow as tf

            if not tf.config.list_physical_devices("GPU"):
                configure_cpu_devices(devices)
    if coordinator is not None:
        initialize_processes(coordinator, num_processes, process_id)
    return DataParallel(devices)
