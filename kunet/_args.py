"""Unknown keyword arguments: a ``TypeError`` naming each one and the closest valid argument.

Left to Keras, a misspelled keyword is dropped without a word by the functional ``keras.Model``,
rejected with a ``ValueError`` by ``keras.layers.Layer`` and with a ``TypeError`` of the base class
(``Loss.__init__() got an unexpected keyword argument ...``) by losses and metrics, none of which
names what was meant. kunet's classes check their ``**kwargs`` first with :func:`check_kwargs`.
"""

from __future__ import annotations

import difflib
import functools
import inspect

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def check_kwargs(owner, kwargs, base, *, also=(), defer=()):
    """Raise ``TypeError`` if ``kwargs`` holds a keyword that ``owner``'s class does not take.

    The valid keywords are the named parameters of every ``__init__`` along ``type(owner)``'s MRO
    from the class itself to ``base`` (Keras' ``Layer``, ``Loss``, ``Metric``, or the class for a
    model), read from their signatures so they follow Keras; an ``__init__`` without ``**kwargs``
    ends the walk early (it passes nothing further up). ``also`` adds what the base class reads from
    its own ``**kwargs``; keywords in ``defer`` are left for the base class to judge and never
    suggested.

    The message names the class the user called (``Tversky()``, not the base class that holds the
    parameters), every unknown keyword with the closest valid one (``difflib``), and lists the
    valid keywords when one of them has no close match.
    """
    unknown = [key for key in kwargs if key not in defer]
    if not unknown:
        return
    valid = _init_parameters(type(owner), base)
    valid += tuple(name for name in also if name not in valid)
    unknown = [key for key in unknown if key not in valid]
    if unknown:
        raise TypeError(_message(type(owner).__name__, unknown, valid))


@functools.cache
def _init_parameters(cls, base):
    """Named ``__init__`` parameters from ``cls`` up to ``base`` along the MRO, in order, no repeats."""
    names = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            parameters = list(inspect.signature(init).parameters.values())[1:]  # past self
            names += [p.name for p in parameters if p.kind in _NAMED and p.name not in names]
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
                break
        if klass is base:
            break
    return tuple(names)


def _message(owner, unknown, valid):
    close = {key: difflib.get_close_matches(key, valid, n=1) for key in unknown}
    if len(unknown) == 1:
        (key,) = unknown
        message = f"{owner}() got an unexpected keyword argument '{key}'"
        if close[key]:
            message += f"; did you mean '{close[key][0]}'?"
    else:
        named = [
            f"'{key}' (did you mean '{close[key][0]}'?)" if close[key] else f"'{key}'"
            for key in unknown
        ]
        listed = ", ".join(named[:-1]) + " and " + named[-1]
        message = f"{owner}() got unexpected keyword arguments {listed}"
    if not all(close.values()):
        message += f"; valid arguments: {', '.join(valid)}"
    return message
