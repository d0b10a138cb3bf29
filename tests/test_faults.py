"""Fault injection: ``kunet train`` and ``kunet predict`` stopped at every step of their writes.

A run is stopped in two ways:

* **In-process kill images.** A failpoint hook (:mod:`kunet._failpoints`) copies the output folder
  at every failpoint of one uninterrupted run: each copy is exactly what ``kill -9`` at that instant
  would leave on disk (written bytes are visible, nothing else happens). A seeded selection of them
  (every kind of failpoint at least once) is then resumed, and the result must equal the
  uninterrupted run's.
* **Real signals** to a ``kunet`` subprocess: SIGKILL at failpoints drawn from a seeded schedule
  and after a seeded delay, and SIGINT (Ctrl-C) mid-epoch and during a checkpoint commit.

After each: the folder validates (:meth:`kunet.run_folder.RunFolder.problems`), no epoch is
duplicated or lost, no temporary file or lock remains, and the final weights equal the
uninterrupted run's (training is deterministic on one machine: same data order, same seeds).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_cli import make_folder

from kunet import _failpoints
from kunet.cli import main
from kunet.run_folder import RunFolder

EPOCHS = 2
TINY = ["--patch-size", "32", "--batch-size", "4", "--filters", "4", "8", "--quiet"]
SEED = 20261202
RESUMED_IMAGES = 1  # in-process kill images resumed per backend besides one per failpoint


def _train_argv(data, out, *extra):
    return [
        "train", "--images", data / "images", "--masks", data / "masks", "--out", out,
        "--epochs", str(EPOCHS), *TINY, *extra,
    ]  # fmt: skip


def _run(*argv):
    return main([str(a) for a in argv])


def _weights(path):
    """Every array in a .keras file's weights, in file order."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read("model.weights.h5")
    arrays = []
    with h5py.File(io.BytesIO(data)) as f:
        f.visititems(lambda n, o: arrays.append(o[()]) if isinstance(o, h5py.Dataset) else None)
    return arrays


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb, strict=True):
        np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), atol=1e-6, rtol=0)


def _assert_complete_run(out, reference):
    """The folder of a finished run: consistent, every epoch once, nothing stray, same weights."""
    run = RunFolder(out)
    assert run.problems() == []
    state = run.read_state()
    assert state["epoch"] == EPOCHS
    assert [row["epoch"] for row in state["history"]] == list(range(EPOCHS))
    with open(out / "history.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["0", "1"]
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [], hidden  # no temporary file, staging folder or lock left
    _same_weights(out / "last.keras", reference / "last.keras")
    assert (out / "best.keras").is_file() and (out / "history.png").is_file()


class _Snapshots:
    """A failpoint hook copying ``folder`` at every failpoint: what a kill there would leave."""

    def __init__(self, folder, into):
        self.folder, self.into, self.taken = Path(folder), Path(into), []

    def __call__(self, name):
        target = self.into / f"{len(self.taken):03d}"
        if self.folder.exists():
            shutil.copytree(self.folder, target, symlinks=True)
        else:
            target.mkdir(parents=True)
        self.taken.append((name, target))


def _kind(name):
    """A failpoint's name, the overlays' file names taken as one."""
    return "atomic:written:<overlay>" if name.startswith("atomic:written:im") else name


def _select(taken, extra, seed=SEED):
    """The first kill image of every failpoint, plus ``extra`` more drawn with a seeded RNG."""
    chosen, kinds = [], set()
    for i, (name, _) in enumerate(taken):
        if _kind(name) not in kinds:
            kinds.add(_kind(name))
            chosen.append(i)
    rest = [i for i in range(len(taken)) if i not in chosen]
    chosen += random.Random(seed).sample(rest, min(extra, len(rest)))
    return sorted(chosen)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted training run, with a kill image of its run folder at every failpoint."""
    root = tmp_path_factory.mktemp("faults")
    data = make_folder(root / "data", n=4)[0].parent
    out = root / "reference"
    snapshots = _Snapshots(out, root / "kill-images")
    previous = _failpoints.set_hook(snapshots)
    try:
        assert _run(*_train_argv(data, out)) == 0
    finally:
        _failpoints.set_hook(previous)
    return data, out, snapshots.taken


def test_every_failpoint_is_reached(uninterrupted):
    _, _, taken = uninterrupted
    names = {name for name, _ in taken}
    for expected in (
        "data:read",
        "train:batch",
        "commit:begin",
        "commit:model-written",
        "commit:best-written",
        "atomic:written:state.json",
        "commit:state-published",
        "commit:renamed:last.keras",
        "commit:renamed:best.keras",
        "atomic:written:history.csv",
        "commit:done",
        "atomic:written:history.png",
    ):
        assert expected in names, (expected, sorted(names))


def _folder_state(folder):
    """What a resumed run can see of a folder: its files and their contents (the lock's only by
    its presence: it holds a pid)."""
    return tuple(
        (str(p.relative_to(folder)), "" if p.name == ".kunet.lock" else _digest(p))
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    )


def test_train_resumes_from_a_kill_at_any_write_step(uninterrupted, tmp_path, capsys):
    data, reference, taken = uninterrupted
    chosen = _select(taken, RESUMED_IMAGES)
    outcomes, resumed = {}, set()
    for i in chosen:
        name, image = taken[i]
        outcomes[_kind(name)] = outcomes.get(_kind(name), 0) + 1
        if _folder_state(image) in resumed:
            continue  # the same files as a kill image resumed already: the same resumed run
        resumed.add(_folder_state(image))
        out = tmp_path / f"run{i:03d}"
        shutil.copytree(image, out, symlinks=True)
        code = _run(*_train_argv(data, out, "--resume"))
        err = capsys.readouterr().err
        if not (image / "state.json").exists():
            # killed before the first commit: --resume says so precisely; a new run starts clean
            assert code == 2 and "without --resume" in err, (name, err)
            assert _run(*_train_argv(data, out)) == 0
            capsys.readouterr()
        else:
            assert code == 0, (name, err)
        _assert_complete_run(out, reference)
    assert set(outcomes) == {_kind(name) for name, _ in taken}
    print(
        f"{len(chosen)} of {len(taken)} kill images ({len(resumed)} distinct) resumed: {outcomes}"
    )


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUNET_FAILPOINT")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _kunet(argv, env=None):
    return subprocess.run(
        [sys.executable, "-m", "kunet.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=600,
        preexec_fn=_default_sigint,  # never inherit an ignored SIGINT from how pytest was started
    )


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _python_sigint():
    """Python's own Ctrl-C handler while a test runs, however pytest was started (a shell starts a
    background job with SIGINT ignored). Both SIGINT tests once saw exit 0 in a background run."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _resume_in_process(data, out, capsys):
    code = _run(*_train_argv(data, out, "--resume"))
    err = capsys.readouterr().err
    assert code == 0, err


def _spawn(argv, env):
    return subprocess.Popen(
        [sys.executable, "-m", "kunet.cli", *map(str, argv)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_train_survives_real_sigkill(uninterrupted, tmp_path, capsys):
    """SIGKILL from the kernel, at a seeded write step and after a seeded delay, then --resume
    (the two killed runs go side by side)."""
    data, reference, taken = uninterrupted
    rng = random.Random(SEED)
    commit_points = [i for i, (n, _) in enumerate(taken) if n.startswith(("commit", "atomic"))]
    point = f"*@{rng.choice(commit_points) + 1}"  # the n-th failpoint of the run, counted from 1
    at_point, timed = tmp_path / "at_point", tmp_path / "timed"
    killed = _spawn(_train_argv(data, at_point), _env(KUNET_FAILPOINT=point))
    proc = _spawn(_train_argv(data, timed), _env())
    deadline = time.monotonic() + 300
    while not (timed / "state.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0))  # somewhere in the first epochs
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert killed.wait(timeout=300) == -signal.SIGKILL, (point, killed.stderr.read()[-2000:])
    for out in (at_point, timed):
        _resume_in_process(data, out, capsys)
        _assert_complete_run(out, reference)


class _SignalAt:
    """A failpoint hook sending this process ``signum`` at the ``nth`` time ``name`` is reached."""

    def __init__(self, name, nth, signum=signal.SIGINT):
        self.name, self.nth, self.signum, self.hits = name, nth, signum, 0

    def __call__(self, name):
        if name == self.name:
            self.hits += 1
            if self.hits == self.nth:
                os.kill(os.getpid(), self.signum)


def _with_hook(hook, *argv):
    previous = _failpoints.set_hook(hook)
    try:
        return _run(*argv)
    finally:
        _failpoints.set_hook(previous)


def test_train_ctrl_c_mid_epoch_stops_cleanly_and_resumes(uninterrupted, tmp_path, capsys):
    """SIGINT in the first epoch: the epoch is dropped, one line, exit 130, then --resume."""
    data, reference, _ = uninterrupted
    out = tmp_path / "run"
    code = _with_hook(_SignalAt("train:batch", 3), *_train_argv(data, out))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 130
    assert last.startswith("kunet: interrupted at epoch 1 (0 epoch(s) saved); resume with: "), last
    assert last.endswith(" --resume") and " kunet train " in f" {last}"
    assert RunFolder(out).problems() == [] and not (out / ".kunet.lock").exists()
    _resume_in_process(data, out, capsys)
    _assert_complete_run(out, reference)


def test_train_ctrl_c_during_a_commit_finishes_it_first(uninterrupted, tmp_path, capsys):
    data, reference, _ = uninterrupted
    out = tmp_path / "run"
    code = _with_hook(_SignalAt("commit:state-published", 2), *_train_argv(data, out))  # epoch 1's
    assert code == 130
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("kunet: interrupted at epoch 2 (1 epoch(s) saved); resume with: kunet train ")
    )
    assert (out / "history.png").is_file() and list((out / "overlays").iterdir())  # still drawn
    assert RunFolder(out).problems() == [] and RunFolder(out).read_state()["epoch"] == 1
    _resume_in_process(data, out, capsys)
    _assert_complete_run(out, reference)


# ---------------------------------------------------------------------------------- predict
def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digests(folder):
    return {p.name: _digest(p) for p in Path(folder).iterdir() if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def predicted(uninterrupted, tmp_path_factory):
    data, reference, _ = uninterrupted
    root = tmp_path_factory.mktemp("predict")
    out = root / "pred"
    snapshots = _Snapshots(out, root / "kill-images")
    previous = _failpoints.set_hook(snapshots)
    try:
        assert _run("predict", "--model", reference / "best.keras", "--images",
                    data / "images", "--out", out, "--quiet") == 0  # fmt: skip
    finally:
        _failpoints.set_hook(previous)
    return data, reference, out, snapshots.taken


def test_predict_outputs_are_complete_or_absent_at_every_kill(predicted, tmp_path, capsys):
    data, reference, out, taken = predicted
    want = _digests(out)
    assert len(want) == 8 and any(n.startswith("predict:published") for n, _ in taken)
    rerun = 0
    for i, (name, image) in enumerate(taken):
        got = _digests(image)
        assert all(got[n] == want[n] for n in got), name  # never a partial or different file
        masks = {n for n in got if not n.endswith("_overlay.png")}
        assert all(n.replace(".png", "_overlay.png") in got for n in masks), name  # overlay first
        if i % 3:
            continue
        rerun += 1
        # The next run on the folder removes the leftovers and, with --overwrite, finishes the job.
        again = tmp_path / f"again{i}"
        shutil.copytree(image, again, symlinks=True)
        argv = ["predict", "--model", reference / "best.keras", "--images", data / "images",
                "--out", again, "--quiet"]  # fmt: skip
        code = _run(*argv)
        err = capsys.readouterr().err
        if got:
            assert code == 2 and "--overwrite" in err, err
            assert _run(*argv, "--overwrite") == 0
            assert f"replaced {len(got)} existing file(s)" in capsys.readouterr().err
        else:
            assert code == 0, err
        assert _digests(again) == want
        assert sorted(p.name for p in again.iterdir() if p.name.startswith(".")) == []
    print(f"predict: {len(taken)} kill images checked, {rerun} run again to completion")


def _predict_argv(data, reference, out):
    return ["predict", "--model", reference / "best.keras", "--images", data / "images",
            "--out", out]  # fmt: skip


def _assert_first_two_published(target, want):
    got = _digests(target)
    assert sorted(got) == ["im0.png", "im0_overlay.png", "im1.png", "im1_overlay.png"]
    assert all(got[n] == want[n] for n in got)
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == []


def test_predict_ctrl_c_keeps_the_finished_files(predicted, tmp_path, capsys):
    data, reference, out, _ = predicted
    target = tmp_path / "pred"
    code = _with_hook(_SignalAt("predict:staged", 3), *_predict_argv(data, reference, target))
    captured = capsys.readouterr()
    assert code == 130
    assert captured.err.strip().splitlines()[-1] == (
        f"kunet: interrupted after 2 of 4 image(s); the files written to {target} are complete"
    )
    assert len([line for line in captured.out.splitlines() if " -> " in line]) == 2
    _assert_first_two_published(target, _digests(out))


@pytest.mark.slow
def test_predict_command_under_real_sigint(predicted, tmp_path):
    """The installed command, Ctrl-C'd for real: no traceback, one line, exit 130."""
    data, reference, out, _ = predicted
    target = tmp_path / "pred"
    env = _env(KUNET_FAILPOINT="predict:staged@3", KUNET_FAILPOINT_SIGNAL="INT")
    proc = _kunet(_predict_argv(data, reference, target), env=env)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"kunet: interrupted after 2 of 4 image(s); the files written to {target} are complete"
    )
    # a file is printed once it is published, and only then
    assert len([line for line in proc.stdout.splitlines() if " -> " in line]) == 2
    _assert_first_two_published(target, _digests(out))
