"""Failpoints: named places where the crash-consistency tests stop the process, as ``kill -9`` would.

Production code calls :func:`reached` at each step of a write protocol (a temporary file written, a
state file published, a rename done, a training batch ended). It costs one global lookup unless a test
turned failpoints on, in one of two ways:

* ``KUNET_FAILPOINT="NAME@N"`` (environment, for a subprocess): at the N-th time ``NAME`` is reached
  (``*`` matches every name, so ``"*@7"`` is the 7th failpoint of the run), the process sends itself
  ``SIGKILL`` (or the signal named by ``KUNET_FAILPOINT_SIGNAL``, e.g. ``INT`` for a Ctrl-C at an
  exact point). ``KUNET_FAILPOINT_LOG=FILE`` appends every name reached to FILE, one per line.
* :func:`set_hook` (in-process): ``hook(name)`` is called at every failpoint, e.g. to copy the run
  folder as a kill at that instant would leave it (a file written through a still-open Python file
  object is no more visible to the copy than to a process that was killed).
"""

from __future__ import annotations

import os
import signal

_hook = None
_hits: dict[str, int] = {}


def set_hook(hook):
    """Call ``hook(name)`` at every failpoint (None: off). Returns the previous hook."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def active() -> bool:
    """Whether failpoints are on (a hook, or the environment variables)."""
    return _hook is not None or bool(
        os.environ.get("KUNET_FAILPOINT") or os.environ.get("KUNET_FAILPOINT_LOG")
    )


def reached(name: str) -> None:
    if _hook is not None:
        _hook(name)
        return
    spec = os.environ.get("KUNET_FAILPOINT")
    log = os.environ.get("KUNET_FAILPOINT_LOG")
    if not spec and not log:
        return
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target not in ("*", name):
        return
    _hits[target] = _hits.get(target, 0) + 1
    if _hits[target] == int(nth or 1):
        signum = getattr(signal, "SIG" + os.environ.get("KUNET_FAILPOINT_SIGNAL", "KILL"))
        os.kill(os.getpid(), signum)
