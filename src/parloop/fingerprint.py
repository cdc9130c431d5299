"""Fingerprints of objects an iteration could change through a path the log
does not hold (a method call inside an expression, a library call that
updates its argument, a notebook function writing a global): compared before
and after, a difference means hidden state, and the loop runs serially in the
kernel from there (docs/design.md §3).

A fingerprint is a BLAKE2b digest of the object's pickle (cloudpickle, so
instances of notebook classes and the class attributes of those classes are
covered), with the out-of-band buffers of NumPy arrays hashed in place (no
copy).  Objects that cannot change are never fingerprinted (see
:func:`watchable`).
"""

from __future__ import annotations

import hashlib
import pickle
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle

#: values that cannot be changed in place (or whose changes are not state the
#: loop's answer depends on: locks and other synchronisation primitives)
_IMMUTABLE = (
    int,
    float,
    complex,
    str,
    bytes,
    bool,
    type(None),
    range,
    frozenset,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    type,
)
_SYNC = tuple(type(x) for x in (threading.Lock(), threading.RLock())) + (
    threading.Semaphore,
    threading.Condition,
    threading.Event,
    threading.Barrier,
)


def watchable(value: Any) -> bool:
    """Whether ``value`` could carry hidden state (a tuple of ints cannot; a
    class defined in the notebook can, in its class attributes)."""
    if isinstance(value, type):
        return getattr(value, "__module__", None) == "__main__"
    if isinstance(value, _IMMUTABLE) or isinstance(value, _SYNC):
        return False
    if type(value) is tuple:
        return any(watchable(v) for v in value)
    return True


class Unfingerprintable(Exception):
    """The object cannot be pickled (a generator, an open file): whether an
    iteration changed it cannot be told."""


def _class_data(cls: type) -> dict[str, Any]:
    """A notebook class's data attributes (its methods are code, not state:
    pickling them by value would take in the globals they use, which the
    loop's log may legitimately change)."""
    return {
        k: v
        for k, v in vars(cls).items()
        if not k.startswith("__")
        and not isinstance(v, (types.FunctionType, classmethod, staticmethod, property))
    }


def _state(value: Any) -> Any:
    """What of ``value`` is state: an instance of a notebook class is its
    attributes and its class's data attributes, a notebook class its data."""
    cls = type(value)
    if isinstance(value, type):
        return ("class", value.__qualname__, _class_data(value))
    if getattr(cls, "__module__", None) == "__main__":
        slots = {
            s: getattr(value, s)
            for k in cls.__mro__
            for s in getattr(k, "__slots__", ())
            if hasattr(value, s)
        }
        return (
            "instance",
            cls.__qualname__,
            getattr(value, "__dict__", None),
            slots,
            _class_data(cls),
        )
    return value


def fingerprint(value: Any) -> bytes:
    """A digest that changes when ``value``'s state changes."""
    h = hashlib.blake2b(digest_size=16)
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = cloudpickle.dumps(_state(value), protocol=5, buffer_callback=buffers.append)
    except Exception as e:  # noqa: BLE001 - anything unpicklable
        raise Unfingerprintable(f"{type(value).__name__}: {e}") from None
    h.update(data)
    for b in buffers:
        h.update(b.raw())
    return h.digest()


@dataclass
class Watched:
    """One watched object and its fingerprint when watching began (or why
    none could be taken)."""

    label: str  # for messages: "`net`", "`SEEN` (a global of `record`)"
    obj: Any
    print: bytes | str  # the digest, or why there is none

    def change(self, who: str = "") -> str:
        """Why the object may have changed since (``who``: "iteration 0"),
        or "" when its fingerprint is the same."""
        if isinstance(self.print, str):
            return f"{self.label} {self.print}: whether an iteration changes it cannot be told"
        try:
            now = fingerprint(self.obj)
        except Unfingerprintable:
            now = b""
        if now == self.print:
            return ""
        if who:
            return f"{who} changed {self.label} through a path the log does not hold"
        return f"{self.label} changed through a path the log does not hold"


_MISSING = object()


def resolve(path: tuple[str, ...], names: dict[str, Any]) -> tuple[str, Any]:
    """(label, object) of a watched path: ``(name,)`` an input, ``(function,
    name)`` a global of a notebook function (looked up in the function's own
    globals: on an engine they are not the chunk function's)."""
    obj = names.get(path[0], _MISSING)
    if len(path) == 1:
        return f"`{path[0]}`", obj
    return (
        f"`{path[1]}` (a global of `{path[0]}`)",
        getattr(obj, "__globals__", {}).get(path[1], _MISSING),
    )


def watch(label: str, obj: Any) -> Watched:
    try:
        return Watched(label, obj, fingerprint(obj))
    except Unfingerprintable as e:
        return Watched(label, obj, f"cannot be fingerprinted ({e})")


def watch_all(
    paths: tuple[tuple[str, ...], ...],
    names: dict[str, Any],
    skip: Callable[[Any], bool] = lambda obj: False,
) -> list[Watched]:
    """Fingerprint every watched object found in ``names`` (``skip``: objects
    watched some other way, e.g. arrays made read-only)."""
    out = []
    for path in paths:
        label, obj = resolve(path, names)
        if obj is not _MISSING and not skip(obj):
            out.append(watch(label, obj))
    return out


def first_change(watched: list[Watched], who: str = "") -> str:
    for w in watched:
        why = w.change(who)
        if why:
            return why
    return ""
