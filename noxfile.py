"""Test matrix: ``nox`` runs lint, the test-suite under each Keras backend, and the fused kernels.

nox                       # everything (what .ci/run runs)
nox -s "tests(backend='jax')"
nox -s kernels

The ``tests(backend)`` and ``kernels`` sessions need the same packages (TensorFlow, JAX, the CPU build
of torch, Triton), so they share one virtualenv, ``.nox/matrix``, instead of each building its own:
one copy is ~4.6 GB on disk where four came to ~12 GB, and a cold run downloads and installs the
frameworks once. Every session re-installs kunet itself into it (a non-editable install, so the
tests always run the working tree's code).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "kernels"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
BACKENDS = ["tensorflow", "jax", "torch"]
CONSTRAINTS = ("-c", "constraints.txt")  # the CPU build of torch
TEST_DEPS = ("pytest>=8", "pytest-timeout>=2")
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
MATRIX_VENV = Path(".nox") / "matrix"


def _python311(session) -> str:
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    found = shutil.which(f"python{PYTHON}")
    if found is None:
        session.error(f"Python {PYTHON} is needed for the test matrix (python{PYTHON} not found)")
    return found


def _matrix_env(session) -> tuple[str, dict]:
    """Create (once) and update the shared virtualenv: its python, and the environment activating it."""
    venv = MATRIX_VENV.resolve()
    python = str(venv / "bin" / "python")
    if not os.path.exists(python):
        session.run(
            sys.executable, "-m", "virtualenv", "-p", _python311(session), str(venv), external=True
        )
    session.run(
        python, "-m", "pip", "install", *CONSTRAINTS, ".[all,triton]", *TEST_DEPS, external=True
    )
    env = {
        "VIRTUAL_ENV": str(venv),
        "PATH": str(venv / "bin") + os.pathsep + os.environ.get("PATH", ""),
        **QUIET_ENV,
    }
    return python, env


@nox.session(python=PYTHON)
def lint(session):
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(venv_backend="none")
@nox.parametrize("backend", BACKENDS)
def tests(session, backend):
    """One tests/ tree under KERAS_BACKEND=backend.

    Every framework is installed: the saving tests load a model saved under this backend in
    subprocesses of the other two (the three sessions together cover all six pairs), and tf.data /
    torch DataLoader inputs are tested under every backend. Triton is installed too, without
    TRITON_INTERPRET: on a CPU the torch backend must fall back to the plain path by itself.
    """
    python, env = _matrix_env(session)
    session.run(
        python, "-m", "pytest", "tests", "--ignore=tests/kernels", "-p", "no:cacheprovider",
        "--timeout=900", "--durations=8", *session.posargs,
        env={**env, "KERAS_BACKEND": backend}, external=True,
    )  # fmt: skip


@nox.session(venv_backend="none")
@nox.parametrize("backend", BACKENDS)
def faults(session, backend):
    """The fault-injection suite alone (tests/test_faults.py, also part of ``tests``): kills and
    interrupts ``kunet train`` / ``predict`` at every write step and checks what they leave."""
    python, env = _matrix_env(session)
    session.run(
        python, "-m", "pytest", "tests/test_faults.py", "-p", "no:cacheprovider",
        "--timeout=900", "--durations=0", *session.posargs,
        env={**env, "KERAS_BACKEND": backend}, external=True,
    )  # fmt: skip


@nox.session(venv_backend="none")
def kernels(session):
    """Fused Triton DoubleConv: parity in Triton's CPU interpreter, then the sm_80/sm_90 AOT report."""
    # In the environment, not set by a conftest: Keras' torch backend imports triton, which reads
    # TRITON_INTERPRET at import, before any conftest could set it.
    python, env = _matrix_env(session)
    env.update({"KERAS_BACKEND": "torch", "TRITON_INTERPRET": "1"})
    session.run(
        python, "-m", "pytest", "tests/kernels", "tests/test_parity.py", "-k", "triton or kernels",
        "-p", "no:cacheprovider", "--timeout=900",
        *session.posargs, env=env, external=True,
    )  # fmt: skip
    session.run(python, "-m", "kunet.kernels.aot", env=env, external=True)
