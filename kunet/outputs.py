"""Writing without losing anything: atomic files, folder locks, stale-file cleanup, overwrite checks.

Every command that writes follows the same rules, and this module holds them once:

* A file appears whole or not at all: it is written to a temporary name in its own folder (prefix
  ``.kunet-tmp-``), flushed to disk, then renamed over the target (:func:`atomic_path`).
* An output folder is never one of the input folders, inside one, or holding one
  (:func:`check_separate`), and files already there are replaced only when the user asked for it
  (:func:`check_existing`, ``--overwrite``).
* One kunet process at a time writes into a folder (:class:`FolderLock`, an ``flock`` that the
  kernel releases even after ``kill -9``); whoever takes the lock removes what an earlier, killed
  process left behind (:func:`clean_stale`: only kunet's own hidden temporary names).
* A Ctrl-C arriving while a group of renames is under way waits until the group is done
  (:func:`deferred_sigint`); a command stopped by Ctrl-C at a safe point raises
  :class:`Interrupted`, saying where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from kunet import _failpoints
from kunet.io import DataError, _one_line, show

TMP_PREFIX = ".kunet-tmp-"
STAGING_PREFIX = ".kunet-staging-"
LOCK_NAME = ".kunet.lock"
# Temporary names of kunet 0.1.0 (``.last-k3j4_x9a.keras`` from mkstemp(prefix=".last-")), removed
# from run folders by the next run.
_LEGACY_TMP = re.compile(r"^\.(last|best|state|history)-[a-z0-9_]{8}\.(keras|json|png|csv)$")


def _fsync_dir(folder):
    with contextlib.suppress(OSError):  # not every file system (or OS) lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _umask_mode():
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_path(path, suffix=None):
    """A new, empty temporary file beside ``path`` (kunet's hidden prefix, so cleanup finds it)."""
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.stem}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _umask_mode())
    return Path(tmp)


def finish(tmp, path):
    """Flush ``tmp`` to disk and rename it over ``path`` (atomic: ``path`` is old or new, never torn)."""
    _fsync_file(tmp)
    _failpoints.reached(f"atomic:written:{Path(path).name}")
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    Whatever is written to the temporary path appears at ``path`` whole or not at all; on an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    tmp = temporary_path(path, suffix)
    try:
        yield str(tmp)
        finish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_save_model(model, path):
    """``model.save(path)`` through a temporary ``.keras`` file and ``os.replace`` (no torn file)."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


# ---------------------------------------------------------------------------------- folders
def check_writable(folder, what="output folder"):
    """Create ``folder`` if needed and check a file can be written in it; DataError otherwise.

    Returns True when the folder was created here (so a caller can remove it on failure).
    """
    folder = Path(folder)
    created = False
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{what} {folder} exists and is not a folder")
    if not folder.exists():
        try:
            folder.mkdir(parents=True)
            created = True
        except OSError as e:
            raise DataError(
                f"{what} {folder}: cannot create it ({_one_line(e.strerror)})"
            ) from None
    try:
        tmp = temporary_path(folder / "probe")
        os.remove(tmp)
    except OSError as e:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise DataError(f"{what} {folder} is not writable ({_one_line(e.strerror)})") from None
    return created


def check_separate(out, inputs, what="output folder"):
    """DataError when ``out`` is, is inside, or contains one of ``inputs`` ((label, folder) pairs).

    Writing there could replace or mix with the input files (an image called ``a.png`` and its
    predicted mask ``a.png``), so an output folder always stands apart from the inputs.
    """
    o = Path(out).resolve()
    for label, folder in inputs:
        p = Path(folder).resolve()
        if o == p:
            relation = "is"
        elif p in o.parents:
            relation = "is inside"
        elif o in p.parents:
            relation = "contains"
        else:
            continue
        raise DataError(
            f"{what} {out} {relation} the {label} folder {folder}: outputs could replace or mix with "
            "the inputs; choose an output folder outside it"
        )


def check_existing(folder, names, overwrite, what="output folder"):
    """The ``names`` (relative paths) that already exist in ``folder``.

    Without ``overwrite`` any of them existing is a DataError that says how many and which.
    """
    folder = Path(folder)
    present = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if present and not overwrite:
        raise DataError(
            f"{what} {folder} already holds {len(present)} of the {len(names)} files this would "
            f"write ({show(present)}); pass --overwrite to replace them, or choose another folder"
        )
    return present


def clean_stale(folder, legacy=False):
    """Remove what killed kunet processes left in ``folder``: ``.kunet-tmp-*`` files and
    ``.kunet-staging-*`` folders (and, with ``legacy``, kunet 0.1.0's temporary checkpoint names).
    Call it only while holding the folder's :class:`FolderLock`. Returns the names removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        name = entry.name
        ours = name.startswith((TMP_PREFIX, STAGING_PREFIX, ".kunet-probe-"))
        if not ours and not (legacy and _LEGACY_TMP.match(name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(name)
    return removed


class FolderLock:
    """An exclusive lock on a folder for one kunet process (``flock`` on ``FOLDER/.kunet.lock``).

    The kernel drops the lock when the process ends, however it ends, so a lock file left by a
    killed process is simply taken over. ``stale`` tells whether that happened (the lock file was
    there when the lock was taken). The lock file is removed on a normal exit. Where ``fcntl`` is
    missing (Windows) no lock is taken.
    """

    def __init__(self, folder, what="output folder"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.stale = False
        self._fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.stale = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataError(
                f"{self.what} {self.folder} is in use by another kunet process (pid {holder}); "
                "wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None
        return False


# ---------------------------------------------------------------------------------- Ctrl-C
class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped ``kunet train`` or ``kunet predict`` at a safe point; ``str()`` says where,
    and the folder is consistent (``train``: resume it; ``predict``: the files written are complete).
    ``epoch``: the epochs a stopped ``train`` saved (None for ``predict``)."""

    def __init__(self, message, epoch=None):
        super().__init__(message)
        self.epoch = epoch


def _can_handle_signals():
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred_sigint():
    """A Ctrl-C (SIGINT) inside the block is held back and raised as KeyboardInterrupt at its end,
    so a group of renames is never cut in half. A no-op off the main thread, or where SIGINT is
    already handled by something other than Python's default handler."""
    if (
        not _can_handle_signals()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


class SigintFlag:
    """Within ``with SigintFlag() as flag:``, the first Ctrl-C only sets ``flag.raised`` (the caller
    stops at its next safe point); a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self):
        if _can_handle_signals():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False
