"""The kunet command's start-up: the frameworks' log lines kept out of the user's terminal.

Importing TensorFlow (Keras' default backend) writes C++ log lines to standard error before a
command prints anything: ``WARNING: All log messages before absl::InitializeLog() is called are
written to STDERR``, ``I0000 ... cudart_stub.cc ...``, and, where its devices are first listed on a
machine without a GPU, ``E0000 ... cuda_platform.cc ... failed call to cuInit``. absl writes them
before it reads ``TF_CPP_MIN_LOG_LEVEL``, so that setting alone does not silence them.

When this process is the kunet command (the ``kunet`` script, ``python -m kunet.cli``),
:func:`quiet_start` imports Keras (and with it the backend's framework, whose devices it then
lists) with ``TF_CPP_MIN_LOG_LEVEL=3`` and file descriptor 2 sent to a temporary file, then restores
it; if the import fails, what was captured is printed before the error. It leaves everything as it
is when the user set ``TF_CPP_MIN_LOG_LEVEL`` or gave the command ``--verbose``. The package's
``__init__`` calls it before its own imports, since they import Keras.

Standard library only: it runs before Keras is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

__all__ = ["command_args", "wants_quiet", "quiet_start", "stderr_captured"]


def command_args():
    """The command-line arguments of the kunet command when this process is it, else None.

    The ``kunet`` script runs with ``sys.argv[0]`` naming it. Under ``python -m kunet.cli``, while
    the package is imported ``sys.argv[0]`` is ``"-m"`` and ``sys.orig_argv`` names the module just
    before the arguments.
    """
    argv = list(getattr(sys, "argv", ()))
    if not argv:
        return None
    if os.path.splitext(os.path.basename(argv[0]))[0] == "kunet":
        return argv[1:]
    orig = list(getattr(sys, "orig_argv", ()))
    if argv[0] == "-m" and len(orig) >= len(argv):
        module = orig[len(orig) - len(argv)]
        if module in ("kunet.cli", "-mkunet.cli"):
            return argv[1:]
    return None


def wants_quiet(args, environ=None):
    """Whether to hide the frameworks' start-up output for a command with ``args``: not when the
    user set ``TF_CPP_MIN_LOG_LEVEL`` or asked for ``--verbose`` (or a prefix of it, as argparse
    takes)."""
    environ = os.environ if environ is None else environ
    if "TF_CPP_MIN_LOG_LEVEL" in environ:
        return False
    for arg in args:
        if arg == "--":
            break
        if len(arg) > 2 and "--verbose".startswith(arg):
            return False
    return True


@contextlib.contextmanager
def stderr_captured():
    """File descriptor 2 (where C++ libraries and Python's ``sys.stderr`` write) goes to a
    temporary file inside the block, and back after it. Should the block raise (other than a
    Ctrl-C), what was captured is written to the restored standard error before the exception goes
    on. Without a usable descriptor 2, a plain block."""
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as capture:
        try:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                if sys.stderr is not None:
                    sys.stderr.flush()
                os.dup2(saved, 2)
        except Exception:
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            if text and sys.stderr is not None:
                sys.stderr.write(text)
                sys.stderr.flush()
            raise
        finally:
            os.close(saved)


def _import_frameworks():
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.list_physical_devices()  # where a GPU-less machine logs cuInit's failure


def quiet_start():
    """For the kunet command (see :func:`command_args`), import Keras and its backend with their
    start-up log lines kept out of the terminal, unless :func:`wants_quiet` says not to. A no-op for
    any other process, and once Keras is imported."""
    if "keras" in sys.modules:
        return
    args = command_args()
    if args is None or not wants_quiet(args):
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with stderr_captured():
        _import_frameworks()
