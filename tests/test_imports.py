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


def _onednn_setting(preset, first="", backend=None):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update({"KERAS_BACKEND": backend or keras.backend.backend(), "TF_CPP_MIN_LOG_LEVEL": "3"})
    if preset is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = preset
    script = f"{first}import os, kunet; print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'))"
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_import_kunet_turns_on_tensorflow_onednn_unless_told_otherwise():
    """TensorFlow's oneDNN kernels (much faster on an AVX2 CPU, where TensorFlow leaves them off:
    benchmarks/README.md) are the default when kunet is imported before TensorFlow."""
    assert _onednn_setting(None) == "1"
    assert _onednn_setting("0") == "0"  # the user's choice stands
    # imported after TensorFlow: too late to matter, so left alone (under the TensorFlow backend:
    # TensorFlow and Keras' torch backend abort in one process)
    after_tf = _onednn_setting(None, first="import tensorflow; ", backend="tensorflow")
    assert after_tf == "None"
