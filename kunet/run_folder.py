"""The run folder of ``kunet train``, kept consistent across kills, Ctrl-C and full disks.

    state.json      the record: epochs done, history rows, best score, the checkpoints' hashes
    plan.json       the settings of the run (:mod:`kunet.plan`), committed with its first state
    last.keras      the model after the latest committed epoch (optimizer state included)
    best.keras      the model with the best validation Dice so far (the latest epoch within
                    ``train.VALIDATION_NOISE`` of it; the latest epoch when nothing is held out)
    history.csv     the history rows of state.json, as a table (rewritten from it)
    history.png     loss and Dice curves (drawn at the end of a run)
    overlays/       validation images: truth | prediction (drawn at the end of a run)

**Commit.** At each epoch end the model is written to a temporary file and flushed to disk (and
hard-linked to a second temporary name when it is the new best); then ``state.json`` is replaced, in
one rename, by the new state, which names those temporary files as *pending*; then the pending files
are renamed into place, ``history.csv`` is rewritten from the state, and the state is written once
more without the pending list. A process killed at any instant therefore leaves either the previous
state (the temporary files are orphans: removed) or the new one with some renames left to do (done
by the next run: *rolled forward*). ``history.csv`` never holds an epoch the state does not.

**Recovery** (:meth:`RunFolder.recover`, under the folder's lock) rolls a cut-short commit forward,
removes kunet's temporary files (and kunet 0.1.0's ``.last-*.keras`` style ones), and rewrites
``history.csv`` from the state. :meth:`RunFolder.problems` lists what is wrong with a folder (empty:
consistent), which the fault-injection tests assert after every kill.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

from kunet import _failpoints
from kunet.io import DataError
from kunet.outputs import (
    LOCK_NAME,
    STAGING_PREFIX,
    TMP_PREFIX,
    _fsync_dir,
    _fsync_file,
    atomic_write_bytes,
    clean_stale,
    deferred_sigint,
    temporary_path,
)

__all__ = ["RunFolder", "RUN_FILES"]

STATE = "state.json"
RUN_FILES = ("state.json", "plan.json", "last.keras", "best.keras", "history.csv", "history.png")
OVERLAYS = "overlays"
CHECKPOINTS = ("last.keras", "best.keras")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def history_csv(rows):
    """The history rows as CSV text: ``epoch`` first, then the other keys sorted (CSVLogger's)."""
    keys = sorted({k for row in rows for k in row if k != "epoch"})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for row in rows:
        writer.writerow([row["epoch"], *(row.get(k, "") for k in keys)])
    return buffer.getvalue() if rows else ""


class RunFolder:
    """One run folder: read and validate its state, commit epochs, recover after a crash."""

    def __init__(self, path):
        self.path = Path(path)
        self.state_path = self.path / STATE

    # ------------------------------------------------------------------ reading
    def read_state(self):
        """The committed state (a dict), or None when there is no ``state.json``."""
        if not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text())
            state["epoch"] = int(state["epoch"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{self.state_path}: not a kunet run state file") from None
        if "history" not in state:  # written by kunet 0.1.0: history rows lived in history.csv
            state["history"] = self._legacy_history(state["epoch"])
        return state

    def _legacy_history(self, epochs):
        """kunet 0.1.0's history.csv rows for the committed epochs (an epoch logged twice or
        beyond the state, as a kill could leave it, is kept once or dropped)."""
        path = self.path / "history.csv"
        rows = {}
        if path.is_file():
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    with contextlib.suppress(KeyError, ValueError):
                        epoch = int(row.pop("epoch"))
                        if epoch < epochs:
                            rows[epoch] = {"epoch": epoch, **_numbers(row)}
        return [rows[e] for e in sorted(rows)]

    def holds_run(self):
        """The run files (and overlays) already in the folder."""
        present = [n for n in RUN_FILES if (self.path / n).exists()]
        overlays = self.path / OVERLAYS
        if overlays.is_dir():
            present += [f"{OVERLAYS}/{p.name}" for p in sorted(overlays.iterdir())]
        return present

    def started_before(self):
        """Whether a kunet process worked here before (a lock or temporary file it left)."""
        return any(
            p.name == LOCK_NAME or p.name.startswith((TMP_PREFIX, STAGING_PREFIX))
            for p in (self.path.iterdir() if self.path.is_dir() else ())
        )

    # ------------------------------------------------------------------ writing
    def _write_state(self, state):
        atomic_write_bytes(self.state_path, (json.dumps(state, indent=2) + "\n").encode())

    def _write_history(self, state):
        text = history_csv(state["history"])
        path = self.path / "history.csv"
        if not path.is_file() or path.read_text() != text:
            atomic_write_bytes(path, text.encode())

    def commit(self, model, state, improved=False, files=None):
        """Make ``state`` (already holding the new epoch count, history row and best score) and the
        model's checkpoint(s) the folder's committed state, as one unit (see the module docstring).
        ``files`` ({name: bytes}, e.g. the run's plan.json) are committed with them.
        """
        _failpoints.reached("commit:begin")
        pending = {}
        for name, data in (files or {}).items():
            tmp = temporary_path(self.path / name)
            tmp.write_bytes(data)
            _fsync_file(tmp)
            pending[name] = tmp.name
        last = temporary_path(self.path / "last.keras")
        model.save(last)
        _fsync_file(last)
        _failpoints.reached("commit:model-written")
        pending["last.keras"] = last.name
        checkpoints = dict(state.get("checkpoints") or {})
        digest = sha256(last)
        checkpoints["last.keras"] = {"epoch": state["epoch"], "sha256": digest}
        if improved:
            best = temporary_path(self.path / "best.keras")
            os.remove(best)
            try:
                os.link(last, best)  # the same bytes; a later rename of last.keras leaves it be
            except OSError:
                shutil.copyfile(last, best)
                _fsync_file(best)
            _failpoints.reached("commit:best-written")
            pending["best.keras"] = best.name
            checkpoints["best.keras"] = {"epoch": state["epoch"], "sha256": digest}
        state["checkpoints"] = checkpoints
        state["pending"] = pending
        self._write_state(state)
        _failpoints.reached("commit:state-published")
        self._publish(state)

    def _publish(self, state):
        """Rename the state's pending files into place, rewrite history.csv, drop the pending list."""
        with deferred_sigint():
            for target, source in (state.get("pending") or {}).items():
                if (self.path / source).exists():
                    os.replace(self.path / source, self.path / target)
                    _failpoints.reached(f"commit:renamed:{target}")
            _fsync_dir(self.path)
            self._write_history(state)
            if state.pop("pending", None) is not None:
                self._write_state(state)
            _failpoints.reached("commit:done")

    def recover(self):
        """Under the folder's lock: finish a commit that a kill cut short, remove stale temporary
        files, rewrite history.csv from the state. Returns what was done, as lines to print."""
        done = []
        state = self.read_state()
        if state is not None and state.get("pending"):
            waiting = [t for t, s in state["pending"].items() if (self.path / s).exists()]
            self._publish(state)
            if waiting:
                done.append(f"finished the commit of epoch {state['epoch']} ({', '.join(waiting)})")
        removed = clean_stale(self.path, legacy=True)
        if removed:
            done.append(f"removed {len(removed)} temporary file(s) of an interrupted run")
        if state is not None and "checkpoints" not in state:  # a kunet 0.1.0 run: record its files
            state["checkpoints"] = {
                name: {"epoch": state.get("best_epoch" if name == "best.keras" else "epoch"),
                       "sha256": sha256(self.path / name)}
                for name in CHECKPOINTS
                if (self.path / name).is_file()
            }  # fmt: skip
            self._write_state(state)
        if state is not None:
            self._write_history(state)
        return done

    def remove_run(self):
        """Delete the run's files (``--overwrite``); returns how many."""
        present = self.holds_run()
        for name in present:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        with contextlib.suppress(OSError):
            (self.path / OVERLAYS).rmdir()
        return len(present)

    # ------------------------------------------------------------------ checking
    def problems(self):
        """What is inconsistent in the folder (after :meth:`recover`): an empty list when the state,
        the checkpoints and history.csv agree and no temporary file is left (the lock file, which
        the next run takes over, does not count)."""
        found = []
        try:
            state = self.read_state()
        except DataError as e:
            return [str(e)]
        stray = [
            p.name for p in self.path.iterdir() if p.name.startswith((TMP_PREFIX, STAGING_PREFIX))
        ]
        if stray:
            found.append(f"temporary files left: {sorted(stray)}")
        if state is None:
            return found + ["no state.json"]
        epochs = [row.get("epoch") for row in state["history"]]
        if epochs != list(range(state["epoch"])):
            found.append(f"history epochs {epochs} for {state['epoch']} committed epoch(s)")
        csv_path = self.path / "history.csv"
        if csv_path.is_file() and csv_path.read_text() != history_csv(state["history"]):
            found.append("history.csv differs from the state's history")
        if state.get("pending"):
            found.append(f"pending renames {state['pending']}")
        for name in CHECKPOINTS:
            record = (state.get("checkpoints") or {}).get(name)
            path = self.path / name
            if record is None:
                if name == "last.keras" or path.exists():
                    found.append(f"{name} is not recorded in the state")
            elif not path.is_file():
                found.append(f"{name} is missing")
            elif sha256(path) != record["sha256"]:
                found.append(f"{name} is not the checkpoint of epoch {record['epoch']}")
        best = (state.get("checkpoints") or {}).get("best.keras")
        if best is not None and best["epoch"] != state.get("best_epoch"):
            found.append(
                f"best.keras is from epoch {best['epoch']}, state says {state['best_epoch']}"
            )
        return found


def _numbers(row):
    out = {}
    for k, v in row.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            out[k] = v
    return out
