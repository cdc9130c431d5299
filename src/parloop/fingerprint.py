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

import collections
import dis
import functools
import hashlib
import pickle
import random
import threading
import time
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
    if isinstance(value, types.FunctionType):
        return _function_state(value) is not None
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
        and not isinstance(
            v,
            (
                types.FunctionType,
                classmethod,
                staticmethod,
                property,
                # the slots' descriptors: pickled, they take the class by value,
                # which changes once copyreg caches __slotnames__ on it (at the
                # first pickle of an instance), and the digest with it
                types.MemberDescriptorType,
                types.GetSetDescriptorType,
            ),
        )
    }


@functools.lru_cache(maxsize=512)
def _rebinds_cells(code: types.CodeType) -> bool:
    """Whether the function (or code nested in it) rebinds one of its free
    variables (``nonlocal n; n += 1``)."""
    free = set(code.co_freevars)
    codes = [code]
    while codes:
        c = codes.pop()
        if any(
            i.opname in ("STORE_DEREF", "DELETE_DEREF") and i.argval in free
            for i in dis.get_instructions(c)
        ):
            return True
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return False


def _function_state(fn: types.FunctionType) -> tuple | None:
    """A notebook function's own state, None if it has none: what its
    closure cells hold (``nonlocal n; n += 1``), its attributes
    (``tick.calls += 1``) and its defaults (``def nxt(c=[0])``).  Calls
    change these behind the log's back, and a worker's copy of the function
    changes only its own.  Functions among them count by name: code is not
    state (by value they would take in their globals)."""
    if getattr(fn, "__module__", None) != "__main__":
        return None
    cells = []
    for c in fn.__closure__ or ():
        try:
            cells.append(c.cell_contents)
        except ValueError:  # a cell not bound yet
            cells.append(None)
    attrs = {k: v for k, v in vars(fn).items() if k != "__wrapped__"}
    defaults = list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values())
    if not (
        attrs
        or any(watchable(v) for v in cells + defaults)
        or (cells and _rebinds_cells(fn.__code__))
    ):
        return None  # a decorator's wrapper, say: its cells hold what never changes

    def named(v: Any) -> Any:
        return f"<function {v.__qualname__}>" if isinstance(v, types.FunctionType) else v

    return (
        "function",
        fn.__qualname__,
        [named(c) for c in cells],
        {k: named(v) for k, v in attrs.items()},
        [named(d) for d in defaults],
    )


def _state(value: Any) -> Any:
    """What of ``value`` is state: an instance of a notebook class is its
    attributes and its class's data attributes, a notebook class its data,
    a notebook function its closure, attributes and defaults."""
    cls = type(value)
    if isinstance(value, type):
        return ("class", value.__qualname__, _class_data(value))
    if isinstance(value, types.FunctionType):
        return _function_state(value)
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
    #: threads: the object's pickle at the same moment, to put its state back
    #: (:func:`restore`) when concurrent iterations changed it
    saved: bytes | None = None

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


def watch(label: str, obj: Any, keep: bool = False) -> Watched:
    try:
        w = Watched(label, obj, fingerprint(obj))
    except Unfingerprintable as e:
        return Watched(label, obj, f"cannot be fingerprinted ({e})")
    if keep:
        w.saved = cloudpickle.dumps(obj, protocol=5)
    return w


def watch_all(
    paths: tuple[tuple[str, ...], ...],
    names: dict[str, Any],
    skip: Callable[[Any], bool] = lambda obj: False,
    keep: bool = False,
) -> list[Watched]:
    """Fingerprint every watched object found in ``names`` (``skip``: objects
    watched some other way, e.g. arrays made read-only; ``keep``: also keep
    each object's pickle, for :func:`restore`)."""
    out = []
    for path in paths:
        label, obj = resolve(path, names)
        if obj is not _MISSING and not skip(obj):
            out.append(watch(label, obj, keep))
    return out


def restore(w: Watched) -> bool:
    """Put ``w.obj``'s state back to what :func:`watch` saved, in place (the
    notebook's names and other objects keep referring to the same object).
    Returns False for an object whose state cannot be put back from outside.

    Threads share the kernel's objects: when iterations changed a watched
    object behind the log's back, iterations that ran at the same time may
    have changed it too, out of order; the kernel puts it back to its state
    after the last trusted iteration, then runs the rest serially (see
    parloop.run).  What the object holds comes back as copies: an object
    inside it that something else also refers to is a copy afterwards."""
    if w.saved is None:
        return False
    obj = w.obj
    try:
        old = pickle.loads(w.saved)
    except Exception:  # noqa: BLE001 - cannot be rebuilt: not restorable
        return False
    if type(old) is not type(obj):
        return False
    if isinstance(obj, type):
        for k, v in _class_data(old).items():
            setattr(obj, k, v)
        return True
    done = _restore_contents(obj, old)
    if done is False:
        return False
    if hasattr(obj, "__dict__"):
        try:
            obj.__dict__.clear()
            obj.__dict__.update(old.__dict__)
        except (AttributeError, TypeError):
            return False
        done = True
    for klass in type(obj).__mro__:
        for slot in getattr(klass, "__slots__", ()):
            if slot not in ("__dict__", "__weakref__") and hasattr(old, slot):
                setattr(obj, slot, getattr(old, slot))
                done = True
    return bool(done)


def restorable(w: Watched) -> bool:
    """Whether :func:`restore` could put ``w.obj`` back (checked before the
    threads start: an object it could not is never left to them)."""
    obj = w.obj
    if w.saved is None:
        return False
    if isinstance(obj, (type, dict, list, bytearray, set, collections.deque, random.Random)):
        return True
    if type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray":
        return bool(obj.flags.writeable)
    return (
        hasattr(obj, "__dict__")
        or hasattr(obj, "bit_generator")
        or any(getattr(k, "__slots__", ()) for k in type(obj).__mro__)
    )


def _restore_contents(obj: Any, old: Any) -> bool | None:
    """The contents of the containers and generators that hold state outside
    ``__dict__``: True when put back, False when they cannot be, None for
    other objects."""
    if isinstance(obj, dict):
        obj.clear()
        obj.update(old)
    elif isinstance(obj, (list, bytearray)):
        obj[:] = old
    elif isinstance(obj, set):
        obj.clear()
        obj.update(old)
    elif isinstance(obj, collections.deque):
        obj.clear()
        obj.extend(old)
    elif type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray":
        if obj.shape != old.shape or obj.dtype != old.dtype or not obj.flags.writeable:
            return False
        obj[...] = old
    elif isinstance(obj, random.Random):
        obj.setstate(old.getstate())
    elif hasattr(obj, "bit_generator") and hasattr(old, "bit_generator"):  # numpy Generator
        obj.bit_generator.state = old.bit_generator.state
    else:
        return None
    return True


class Baseline:
    """Threads: the watched objects as they were when the threads started,
    checked once for every chunk that finished before the check.

    A change behind the log's back stays until the kernel undoes it, so a
    check that finds every object as it was at time T vouches for every
    chunk that finished before T: none of them ran while an object was
    changed.  So the kernel need not fingerprint after each chunk: it holds
    finished chunks back until a check vouches for them, and checks at most
    every :data:`CHECK_SHARE` times a check's own cost (a fingerprint holds
    the GIL), or when nothing runs any more.  A check that finds a change
    sends the loop serial from the first chunk not vouched for, once the
    objects are put back (:meth:`put_back`)."""

    #: seconds between checks, as a multiple of what one check costs
    CHECK_SHARE = 10.0

    def __init__(self, watched: list[Watched], cost: float):
        self.watched = watched
        self.cost = cost
        #: the start of the last check that found nothing (perf_counter)
        self.vouched = time.perf_counter()
        self.checks = 0

    def vouches_for(self, finished: float) -> bool:
        return finished <= self.vouched

    def due(self) -> bool:
        return time.perf_counter() - self.vouched >= self.CHECK_SHARE * self.cost

    def check(self) -> str:
        """Why an object differs from the baseline, or "" (and every chunk
        that finished before now is vouched for)."""
        t = time.perf_counter()
        why = first_change(self.watched)
        self.cost = max(self.cost, time.perf_counter() - t)
        self.checks += 1
        if not why:
            self.vouched = t
        return why

    def put_back(self) -> str:
        """Put every changed object back; "" when all are as they were, else
        the label of one that could not be."""
        for w in self.watched:
            if w.change() and (not restore(w) or w.change()):
                return w.label
        return ""


def first_change(watched: list[Watched], who: str = "") -> str:
    for w in watched:
        why = w.change(who)
        if why:
            return why
    return ""
