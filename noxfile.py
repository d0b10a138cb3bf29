"""Test matrix: ``nox`` runs lint, the test-suite under each Keras backend, and the fused kernels.

nox                       # everything (what .ci/run runs)
nox -s "tests(backend='jax')"
nox -s kernels
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests", "kernels"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
BACKENDS = ["tensorflow", "jax", "torch"]
CONSTRAINTS = ("-c", "constraints.txt")  # the CPU build of torch
TEST_DEPS = ("pytest>=8", "pytest-timeout>=2", "pytest-xdist>=3")
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


@nox.session(python=PYTHON)
def lint(session):
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
@nox.parametrize("backend", BACKENDS)
def tests(session, backend):
    """One tests/ tree under KERAS_BACKEND=backend.

    Every framework is installed in every session: the saving tests load a model saved under this
    backend in subprocesses of the other two (the three sessions together cover all six pairs), and
    tf.data / torch DataLoader inputs are tested under every backend.
    """
    session.install(*CONSTRAINTS, ".[all]", *TEST_DEPS)
    session.run(
        "pytest",
        "tests",
        "--ignore=tests/kernels",
        "-p",
        "no:cacheprovider",
        "--timeout=900",
        *session.posargs,
        env={"KERAS_BACKEND": backend, **QUIET_ENV},
    )


@nox.session(python=PYTHON)
def kernels(session):
    """Fused Triton DoubleConv: parity in Triton's CPU interpreter, then the sm_80/sm_90 AOT report."""
    session.install(*CONSTRAINTS, ".[triton]", *TEST_DEPS)
    # In session.env, not per command: Keras' torch backend imports triton, which reads
    # TRITON_INTERPRET at import, before any conftest could set it.
    session.env.update({"KERAS_BACKEND": "torch", "TRITON_INTERPRET": "1", **QUIET_ENV})
    session.run(
        "pytest", "tests/kernels", "-p", "no:cacheprovider", "--timeout=900", *session.posargs
    )
    session.run("python", "-m", "kunet.kernels.aot")
