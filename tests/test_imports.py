"""``import kunet`` imports no framework beyond what Keras itself imports for the active backend."""

from __future__ import annotations

import os
import subprocess
import sys

import keras

_SCRIPT = """
import sys
heavy = ("torch", "tensorflow", "jax", "triton", "PIL", "kunet.kernels")
import keras
before = {m for m in heavy if m in sys.modules}
import kunet, kunet.cli
after = {m for m in heavy if m in sys.modules}
print(sorted(after - before))
"""


def test_import_kunet_adds_no_framework():
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
