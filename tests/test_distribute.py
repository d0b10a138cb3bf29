"""Data-parallel training (kunet.distribute) on the engines Keras has, against one device.

Each training runs in a subprocess, since a framework fixes its devices when it starts: JAX's
DataParallel over 2 CPU devices of one process, and over 2 processes of 1 CPU device each (gloo
collectives on 127.0.0.1); TensorFlow's MirroredStrategy over 2 logical CPUs, with synchronized
and with per-replica BatchNorm statistics; PyTorch DDP around a custom loop (what the README says
works there). The model: UNet filters (4, 8), 32 px, BatchNorm momentum 0.5 (so that its moving
statistics move); the data: 8 images, one epoch of 2 steps of a global batch of 4, whose two
halves differ in brightness, so that statistics per replica (half a batch) differ from the
batch's. Compared: every variable (weights and BatchNorm moving statistics) and the predictions.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from kunet import distribute

ROOT = Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()
# |distributed - one device|, every variable after 2 steps (seen: JAX 5e-7 with 2 devices and with
# 2 processes, TensorFlow synchronized 1.2e-6)
MATCH = 1e-5
# and the predictions' logits (seen: JAX 1.8e-6, TensorFlow 6.7e-6)
MATCH_PREDICTIONS = 1e-4
# per-replica BatchNorm on TensorFlow, the same run (seen: 0.34 variables, 1.5 predictions)
DIFFERENT = 1e-3

COMMON = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import kunet, keras
    from kunet import distribute

    def data():
        rng = np.random.default_rng(0)
        x = rng.random((8, 32, 32, 1)).astype("float32")
        x += np.array([0, 0, 1, 1, 0, 0, 1, 1], "float32")[:, None, None, None]
        y = (rng.random((8, 32, 32)) > 0.5).astype("float32")
        return x, y

    class Batches(keras.utils.PyDataset):
        def __init__(self, x, y, batch_size):
            super().__init__(workers=1)
            self.x, self.y, self.batch_size = x, y, batch_size
        def __len__(self):
            return -(-len(self.x) // self.batch_size)
        def __getitem__(self, i):
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            return self.x[s], self.y[s]

    def unet(**kwargs):
        keras.utils.set_random_seed(0)
        return kunet.UNet(filters=(4, 8), input_shape=(None, None, 1), bn_momentum=0.5, **kwargs)

    def fit(dp=None):
        x, y = data()
        scope = dp.scope() if dp is not None else distribute.OneDevice().scope()
        with scope:
            model = unet()
            batches = Batches(x, y, 4)
            history = model.fit(dp.batches(batches) if dp else batches, epochs=1, verbose=0,
                                shuffle=False)
        return model, history.history["loss"]

    def variables(model):
        return [keras.ops.convert_to_numpy(v.value) for v in model.weights]
    """
)


def _env(backend, **extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    path = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(path), KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra)
    return env


def _start(code, backend, *args, **env):
    return subprocess.Popen(
        [sys.executable, "-c", COMMON + textwrap.dedent(code), *map(str, args)],
        env=_env(backend, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _result(proc, timeout=300):
    """The JSON the subprocess printed last; its standard error on failure."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{err[-3000:]}") from None
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _results(procs, timeout=300):
    """:func:`_result` of each process; the others are stopped when one fails (a job's processes
    would otherwise wait for their peer until their own time-outs)."""
    try:
        return [_result(p, timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a, b):
    assert len(a) == len(b)
    return max(
        float(np.abs(np.asarray(u) - np.asarray(v)).max()) for u, v in zip(a, b, strict=True)
    )


def _load(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


# ---------------------------------------------------------------------------------- JAX
_JAX_ONE_PROCESS = """
    out = sys.argv[1]
    dp = distribute.scope_for(2)          # splits the CPU into 2 JAX devices, before JAX starts
    one, one_loss = fit()                 # no distribution: device 0
    two, two_loss = fit(dp)
    x, _ = data()
    np.savez(f"{out}/one.npz", *variables(one))
    np.savez(f"{out}/two.npz", *variables(two))
    try:
        dp.check_batch_size(5)
        odd = None
    except ValueError as e:
        odd = str(e)
    print(json.dumps({
        "describe": dp.describe(), "replicas": dp.replicas, "odd": odd,
        "one_loss": one_loss, "two_loss": two_loss,
        "kernel_devices": len(two.weights[0].value.sharding.device_set),
        "predictions": float(np.abs(one.predict(x, verbose=0) - two.predict(x, verbose=0)).max()),
    }))
"""


@pytest.mark.jax
def test_jax_two_devices_match_one_device(jax_runs):
    """keras.distribution.DataParallel over 2 CPU devices: the step is one XLA program over the
    global batch, so BatchNorm's statistics are the whole batch's and the run is one device's."""
    out, (r, *_) = jax_runs
    assert r["replicas"] == 2 and r["kernel_devices"] == 2  # the variables live on both devices
    assert "global batch" in r["describe"]
    assert _max_diff(_load(out / "one.npz"), _load(out / "two.npz")) <= MATCH
    np.testing.assert_allclose(r["two_loss"], r["one_loss"], rtol=1e-5)
    assert r["predictions"] <= MATCH_PREDICTIONS
    assert "batch size 5 does not split evenly over 2 devices" in r["odd"] and "4 or 6" in r["odd"]


_JAX_PROCESS = """
    process, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    distribute.configure_cpu_devices(1)
    distribute.initialize_processes(f"127.0.0.1:{port}", 2, process)
    dp = distribute.data_parallel()        # every process's devices: 2 in all
    x, y = data()
    local = dp.batches(Batches(x, y, 4))[0][0].shape[0]
    model, loss = fit(dp)
    np.savez(f"{out}/process{process}.npz", *variables(model))
    print(json.dumps({"replicas": dp.replicas, "processes": dp.processes, "local_batch": local,
                      "loss": loss, "describe": dp.describe()}))
"""


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory):
    """The one-process run (one device, then two) and the two processes' run, started together:
    the processes mostly wait on each other's compilations, so the three share 2 cores well."""
    out = tmp_path_factory.mktemp("jax")
    port = _free_port()
    procs = [_start(_JAX_ONE_PROCESS, "jax", out)]
    procs += [_start(_JAX_PROCESS, "jax", i, port, out) for i in range(2)]
    return out, _results(procs)


@pytest.mark.jax
def test_jax_two_processes_match_one_device(jax_runs):
    """Two processes of one CPU device each, joined over 127.0.0.1 (jax.distributed, gloo
    collectives), each feeding its half of every batch: the same run as one device's."""
    out, (one, *processes) = jax_runs
    for r in processes:
        assert (r["replicas"], r["processes"], r["local_batch"]) == (2, 2, 2)
        assert "in 2 processes" in r["describe"]
        np.testing.assert_allclose(r["loss"], one["one_loss"], rtol=1e-5)
    reference = _load(out / "one.npz")
    for i in range(2):
        assert _max_diff(reference, _load(out / f"process{i}.npz")) <= MATCH


# ---------------------------------------------------------------------------------- TensorFlow
_TENSORFLOW = """
    out = sys.argv[1]
    synchronized = distribute.scope_for(2)   # 2 logical CPUs, before TensorFlow starts
    per_replica = distribute.data_parallel(2, sync_batchnorm=False)
    x, y = data()
    result = {"describe": [synchronized.describe(), per_replica.describe()]}
    runs = {"one": fit(), "sync": fit(synchronized), "replica": fit(per_replica)}
    for name, (model, loss) in runs.items():
        np.savez(f"{out}/{name}.npz", *variables(model))
        np.save(f"{out}/{name}.npy", model.predict(x, verbose=0))
        result[name] = {
            "loss": loss,
            "paths": sorted({row[2] for row in kunet.explain(model).rows if row[1] == "DoubleConv"}),
        }
    # saved inside the scope: the file must load where synchronized=True does not exist
    model = runs["sync"][0]
    with synchronized:
        model.save(f"{out}/unet.keras")
        plain = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(),
                                  keras.layers.Dense(1)])
        plain.compile("sgd", "mse")
        plain.fit(np.ones((4, 3)), np.ones((4, 1)), verbose=0)
        plain.save(f"{out}/plain.keras")
    np.save(f"{out}/unet.npy", model.predict(x, verbose=0))
    np.save(f"{out}/plain.npy", plain.predict(np.ones((4, 3)), verbose=0))
    result["plain_synchronized"] = [plain.layers[0].synchronized,
                                    plain.layers[0].get_config()["synchronized"]]
    print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def tensorflow_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tensorflow")
    return out, _result(_start(_TENSORFLOW, "tensorflow", out))


@pytest.mark.tensorflow
def test_tensorflow_synchronized_batch_norm_matches_one_device(tensorflow_runs):
    """MirroredStrategy over 2 logical CPUs with sync_batchnorm=True (default): each
    BatchNormalization all-reduces its sums and counts, which sends the DoubleConvs to their plain
    Keras path (TensorFlow's fused batch norm has no cross-replica form): one device's run."""
    out, r = tensorflow_runs
    assert "synchronized across replicas" in r["describe"][0]
    assert _max_diff(_load(out / "one.npz"), _load(out / "sync.npz")) <= MATCH
    np.testing.assert_allclose(r["sync"]["loss"], r["one"]["loss"], rtol=1e-5)
    assert np.abs(np.load(out / "one.npy") - np.load(out / "sync.npy")).max() <= MATCH_PREDICTIONS
    assert r["sync"]["paths"] == ["keras"] and r["one"]["paths"] == ["tensorflow"]


@pytest.mark.tensorflow
def test_tensorflow_per_replica_batch_norm_differs(tensorflow_runs):
    """sync_batchnorm=False: each replica normalizes its half batch with its own statistics (on
    kunet's fused path), so the same run ends elsewhere: what the comparison above would catch."""
    out, r = tensorflow_runs
    assert "per replica" in r["describe"][1]
    assert _max_diff(_load(out / "one.npz"), _load(out / "replica.npz")) > DIFFERENT
    assert np.abs(np.load(out / "one.npy") - np.load(out / "replica.npy")).max() > DIFFERENT
    assert r["replica"]["paths"] == ["tensorflow"]


_LOAD = """
    folder = sys.argv[1]
    x, _ = data()
    unet = keras.models.load_model(f"{folder}/unet.keras")
    plain = keras.models.load_model(f"{folder}/plain.keras")
    print(json.dumps({
        "unet": float(np.abs(unet.predict(x, verbose=0) - np.load(f"{folder}/unet.npy")).max()),
        "plain": float(np.abs(plain.predict(np.ones((4, 3)), verbose=0)
                              - np.load(f"{folder}/plain.npy")).max()),
    }))
"""


@pytest.mark.tensorflow
def test_tensorflow_synchronized_models_load_on_every_backend(tensorflow_runs):
    """Saved inside the synchronized scope (a UNet, and a plain Keras model whose
    BatchNormalization's own config is saved): the layers compute synchronized statistics, their
    configs say synchronized=False, and the files load and predict alike under JAX and PyTorch."""
    out, r = tensorflow_runs
    assert r["plain_synchronized"] == [True, False]
    procs = {backend: _start(_LOAD, backend, out) for backend in ("jax", "torch")}
    for backend, loaded in zip(procs, _results(list(procs.values())), strict=True):
        assert loaded["unet"] <= MATCH_PREDICTIONS and loaded["plain"] <= 1e-5, backend


# ---------------------------------------------------------------------------------- every backend
needs_engine = pytest.mark.skipif(BACKEND == "torch", reason="no data parallelism on torch")


@needs_engine
def test_more_devices_than_present_is_an_error_naming_both_and_the_fix():
    fix = {"jax": "XLA_FLAGS=--xla_force_host_platform_device_count=64",
           "tensorflow": "configure_cpu_devices(64)"}  # fmt: skip
    with pytest.raises(ValueError, match="devices=64, but") as error:
        distribute.data_parallel(64)
    present = 1 if BACKEND == "tensorflow" else len(__import__("jax").local_devices())
    assert f"has {present} CPU device(s)" in str(error.value)
    assert fix[BACKEND] in str(error.value)
    if BACKEND == "jax":  # nothing started
        assert keras.distribution.distribution() is None
    else:
        import tensorflow as tf

        assert not tf.distribute.has_strategy() and not distribute._strategies


@needs_engine
def test_splitting_the_cpu_after_the_framework_started_is_an_error():
    keras.ops.convert_to_numpy(keras.ops.ones(1))  # the framework has started
    with pytest.raises(RuntimeError, match="too late to split the CPU into 5") as error:
        distribute.configure_cpu_devices(5)
    assert "configure_cpu_devices(5) before" in str(error.value)


@pytest.mark.torch
def test_torch_names_the_backends_that_can_and_the_readme():
    for call in (distribute.data_parallel, lambda: distribute.scope_for(2)):
        with pytest.raises(ValueError, match="KERAS_BACKEND=jax or tensorflow") as error:
            call()
        assert "'torch'" in str(error.value) and "README.md" in str(error.value)
        assert "DDP" in str(error.value)


def test_one_device_is_no_distribution():
    one = distribute.scope_for(None)
    assert isinstance(distribute.scope_for(1), distribute.OneDevice)
    with one.scope():
        assert one.check_batch_size(3) == 3 and one.batches([1]) == [1]
    with pytest.raises(ValueError, match="go together"):
        distribute.scope_for(2, coordinator="127.0.0.1:1234")


def test_sharded_batches_cut_each_batch_to_the_devices_and_this_process():
    class Batches(keras.utils.PyDataset):
        epochs = 0

        def __len__(self):
            return 3

        def __getitem__(self, i):  # sizes 4, 4, 3: samples numbered
            x = np.arange(4 * i, min(4 * i + 4, 11))
            return x, -x

        def on_epoch_end(self):
            self.epochs += 1

    data = Batches()
    cut = distribute.ShardedBatches(data, 2)
    assert len(cut) == 3 and [list(cut[i][0]) for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                      [8, 9]]  # fmt: skip
    assert len(distribute.ShardedBatches(data, 4)) == 2  # a last batch of 3 on 4 devices: dropped
    second = distribute.ShardedBatches(data, 4, processes=2, process_id=1)
    assert [list(second[i][0]) for i in range(2)] == [[2, 3], [6, 7]]
    assert list(second[1][1]) == [-6, -7]
    second.on_epoch_end()
    assert data.epochs == 1


# ---------------------------------------------------------------------------------- PyTorch
_TORCH_DDP = """
    import torch, torch.distributed as dist
    rank, out = int(os.environ["RANK"]), sys.argv[1]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    x, y = data()

    def train(batch_norm, ddp):
        model = unet(batch_norm=batch_norm)
        net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        loss_fn = kunet.losses.CEDice()
        for step in range(2):
            xs, ys = x[4 * step: 4 * step + 4], y[4 * step: 4 * step + 4]
            if ddp:  # this rank's half of the global batch
                xs, ys = xs[2 * rank: 2 * rank + 2], ys[2 * rank: 2 * rank + 2]
            optimizer.zero_grad()
            loss = loss_fn(torch.from_numpy(ys), net(torch.from_numpy(xs), training=True))
            loss.backward()  # DDP: gradients averaged over the ranks (gloo all-reduce)
            optimizer.step()
        return model

    for batch_norm in (False, True):
        model = train(batch_norm, ddp=True)
        np.savez(f"{out}/ddp{int(batch_norm)}_{rank}.npz", *variables(model))
        if rank == 0:
            np.savez(f"{out}/one{int(batch_norm)}.npz", *variables(train(batch_norm, ddp=False)))
    print(json.dumps({"trainable": [v.trainable for v in model.weights]}))
"""


@pytest.mark.torch
def test_torch_ddp_around_a_custom_loop(tmp_path):
    """What works on PyTorch: DistributedDataParallel (gloo, 2 processes) around a kunet UNet in
    your own loop averages the gradients, so without BatchNorm it is one process's run; Keras'
    BatchNormalization is not torch's (SyncBatchNorm cannot replace it), so with BatchNorm each rank
    normalizes with its own half batch and keeps its own moving statistics."""
    job = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [_start(_TORCH_DDP, "torch", tmp_path, RANK=str(i), **job) for i in range(2)]
    trainable = _results(procs, timeout=200)[0]["trainable"]
    ranks = [_load(tmp_path / f"ddp0_{i}.npz") for i in range(2)]
    assert _max_diff(ranks[0], ranks[1]) == 0.0
    assert _max_diff(_load(tmp_path / "one0.npz"), ranks[0]) <= MATCH
    ranks = [_load(tmp_path / f"ddp1_{i}.npz") for i in range(2)]
    same = [t for t, a, b in zip(trainable, *ranks, strict=True) if np.array_equal(a, b)]
    assert all(same) and len(same) == sum(trainable)  # the trainable weights agree, and only they
    assert _max_diff(_load(tmp_path / "one1.npz"), ranks[0]) > DIFFERENT
