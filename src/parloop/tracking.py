"""What a worker records of an iteration's reads of *shared* objects (outside
objects the loop both writes and reads), and the iteration's view of its own
writes to them.

The rewrite turns every read of a shared name into a call of a
:class:`Reader` method (``x[k]`` -> ``___R.item("x", x, k)``) and every
write into :meth:`Reader.write` (log the entry, as for any outside write,
and note it in the iteration's own-write overlay).  A read records its
location (:mod:`parloop.log.locations`) for the dependence test at commit,
and is served from the overlay when the iteration itself wrote that
location, so an iteration sees its own writes while no other iteration sees
them before they are committed.  Where the overlay cannot say what serial
execution would read (a whole-object read after the iteration changed the
object, a read through an element it changed in place), the read raises
:class:`NeedsKernel`: the iteration stops and is re-executed in the kernel
at its turn, on the committed state.

:class:`DirectReader` and :class:`ApplyingLog` are the same interface for
that re-execution in the kernel: reads go straight to the kernel's objects
and writes are applied at once (recording what they wrote, for the
iterations after it).
"""

from __future__ import annotations

import builtins
import collections
import copy
import threading
from typing import Any, Callable, MutableMapping

from .log.conflicts import WriteSet
from .log.entries import (
    CALL,
    FINAL_DEL_ITEM,
    FINAL_SET_ITEM,
    FLUSH,
    GROUP,
    PATH,
    REDUCE,
    SET_ATTR,
    SET_ITEM,
    STEP_ITEM,
    TARGET,
    TARGET_WRITE,
)
from .log.locations import (
    ATTR,
    LENGTH,
    WHOLE,
    attr_location,
    item_location,
    path_locations,
    write_locations,
)
from .log.replay import apply_entry, apply_path, group_into, reduce_into


class NeedsKernel(BaseException):
    """Raised inside an iteration that the worker cannot run as serial
    execution would (it must be re-executed in the kernel).  A BaseException,
    so that a ``try: ... except Exception`` in the body does not swallow it."""


class _Mark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> str:
        # pickled by name: the marker an engine sends back is the kernel's own
        return self.name


#: overlay markers: the iteration deleted the key; changed it in place (the
#: value cannot be known here); added it to a set
DELETED = _Mark("DELETED")
DIRTY = _Mark("DIRTY")
PRESENT = _Mark("PRESENT")
_MISSING = _Mark("MISSING")


def _dict_like(obj: Any) -> bool:
    return isinstance(obj, (dict, set, frozenset))


class Reader:
    """Per worker chunk: the reads of shared objects (``reads``: ``(name,
    location)`` in order; the chunk control marks where each iteration's
    begin) and the current iteration's own writes."""

    __slots__ = (
        "reads",
        "objects",
        "log",
        "lock",
        "stuck",
        "unrecorded",
        "_own",
        "_whole",
        "_copied",
    )

    def __init__(
        self,
        objects: MutableMapping[str, Any],
        log: list,
        lock: Any = None,
        unrecorded: frozenset[str] = frozenset(),
    ) -> None:
        self.reads: list[tuple[str, tuple]] = []
        #: same-key objects: their reads are not recorded (see LoopShape)
        self.unrecorded = unrecorded
        self.objects = objects  # the snapshot: the chunk function's globals
        self.log = log
        self.lock = lock if lock is not None else _NoLock()
        self._own: dict[str, dict[tuple, Any]] = {}
        self._whole: set[str] = set()  # names the iteration wrote as a whole
        self._copied: set[tuple[str, tuple]] = set()
        #: the current iteration raised NeedsKernel (even if the body caught
        #: it): the shared object's name
        self.stuck: str | bool = False

    def _needs(self, name: str = "") -> NeedsKernel:
        self.stuck = name or True
        return NeedsKernel(name)

    def begin(self) -> None:
        """A new iteration: forget the previous one's writes."""
        self.stuck = False
        if self._own:
            self._own.clear()
        if self._whole:
            self._whole.clear()
        if self._copied:
            self._copied.clear()

    # -- writes ------------------------------------------------------------------
    def write(self, entry: tuple, objects: Any = None) -> None:
        """``___wr(entry)``: note the write in the overlay, then log it
        (``objects``: where the root's name is bound, when not in the chunk
        function's globals: a notebook function's own, on an engine)."""
        name = entry[1]
        obj = (objects if objects is not None else self.objects).get(name, _MISSING)
        op = entry[0]
        if obj is _MISSING:
            self._whole.add(name)
        elif op == SET_ITEM:
            self._set(name, item_location(obj, entry[3]), entry[2])
        elif op == SET_ATTR:
            self._set(name, (ATTR, entry[3]), entry[2])
        elif op == CALL and _dict_like(obj) and entry[3]:
            loc = item_location(obj, entry[3][0])
            method = entry[2]
            if method == "add":
                self._set(name, loc, PRESENT)
            elif method in ("discard", "remove", "pop", "__delitem__"):
                self._set(name, loc, DELETED)
            elif method == "__setitem__" and len(entry[3]) > 1:
                self._set(name, loc, entry[3][1])
            else:
                self._set(name, loc, DIRTY)
        elif op == PATH:
            self._path(name, obj, entry[2], entry[3])
        else:
            self._whole.add(name)
        self.log.append(entry)

    def _set(self, name: str, loc: tuple, value: Any) -> None:
        if loc == WHOLE:
            self._whole.add(name)
        else:
            self._own.setdefault(name, {})[loc] = value

    def _path(self, name: str, obj: Any, steps: tuple, final: tuple) -> None:
        if not steps:
            key = final[1]
            loc = item_location(obj, key)
            if final[0] == FINAL_SET_ITEM:
                self._set(name, loc, final[2])
                return
            if final[0] == FINAL_DEL_ITEM and _dict_like(obj):
                self._set(name, loc, DELETED)
                return
            own = self._own.get(name, {}).get(loc, _MISSING)
            if (
                loc != WHOLE
                and not isinstance(own, _Mark)
                and own is not _MISSING
                and final[0] != FINAL_DEL_ITEM
            ):
                # out[k] = v; out[k] += w: the kernel does the same in order
                tmp = {0: copy.deepcopy(own)}
                apply_path(tmp, (), (final[0], 0, *final[2:]))
                self._set(name, loc, tmp[0])
                return
            self._set(name, loc if final[0] != FINAL_DEL_ITEM else WHOLE, DIRTY)
            return
        if steps[0][0] == STEP_ITEM:
            loc = item_location(obj, steps[0][1])
            own = self._own.get(name, {}).get(loc, _MISSING)
            if loc != WHOLE and not isinstance(own, _Mark) and own is not _MISSING:
                # a write inside an element this iteration set (out[k] = [];
                # out[k].append(v)): change a copy, so that the logged value
                # stays as it was when it was logged
                if (name, loc) not in self._copied:
                    own = copy.deepcopy(own)
                    self._copied.add((name, loc))
                    self._set(name, loc, own)
                apply_path(own, steps[1:], final)
                return
        for loc in path_locations(obj, steps, final):
            self._set(name, loc, DIRTY)

    # -- reads -------------------------------------------------------------------
    def _own_value(self, name: str, loc: tuple) -> Any:
        if name in self._whole:
            raise self._needs(name)
        own = self._own.get(name)
        if not own:
            return _MISSING
        if loc == WHOLE:
            raise self._needs(name)
        v = own.get(loc, _MISSING)
        if v is DIRTY:
            raise self._needs(name)
        return v

    def item(self, name: str, obj: Any, key: Any) -> Any:
        loc = item_location(obj, key)
        v = self._own_value(name, loc)
        if v is not _MISSING:
            if v is DELETED:
                raise KeyError(key)
            if v is PRESENT:
                raise self._needs(name)
            return v
        if name not in self.unrecorded:
            self.reads.append((name, loc))
        with self.lock:
            if type(obj) is collections.defaultdict and loc != WHOLE and key not in obj:
                # reading a missing key inserts it: a write, replayed in order
                if obj.default_factory is None:
                    raise KeyError(key)
                value = obj.default_factory()
                self.write((SET_ITEM, name, value, key))
                return value
            return obj[key]

    def get(self, name: str, obj: Any, key: Any, *default: Any) -> Any:
        if not isinstance(obj, dict):
            return self.whole(name, obj).get(key, *default)
        loc = item_location(obj, key)
        v = self._own_value(name, loc)
        if v is not _MISSING:
            if v is DELETED:
                return default[0] if default else None
            if v is PRESENT:
                raise self._needs(name)
            return v
        self.reads.append((name, loc))
        with self.lock:
            return obj.get(key, *default)

    def has(self, name: str, obj: Any, key: Any) -> bool:
        if not _dict_like(obj):
            return key in self.whole(name, obj)
        loc = item_location(obj, key)
        v = self._own_value(name, loc)
        if v is not _MISSING:
            return v is not DELETED
        self.reads.append((name, loc))
        with self.lock:
            return key in obj

    def length(self, name: str, obj: Any, len_: Callable[[Any], int]) -> int:
        if len_ is not builtins.len:
            return len_(self.whole(name, obj))
        if name in self._whole:
            raise self._needs(name)
        own = self._own.get(name)
        self.reads.append((name, LENGTH))
        with self.lock:
            n = len(obj)
            if own and _dict_like(obj):
                for loc, v in own.items():
                    if loc[0] != 0:
                        continue
                    self.reads.append((name, loc))
                    n += (v is not DELETED) - (loc[1] in obj)
        return n

    def attr(self, name: str, obj: Any, attr: str) -> Any:
        loc = attr_location(obj, attr)
        v = self._own_value(name, loc)
        if v is not _MISSING:
            if isinstance(v, _Mark):
                raise self._needs(name)
            return v
        self.reads.append((name, loc))
        return getattr(obj, attr)

    def whole(self, name: str, obj: Any) -> Any:
        if name in self._whole or self._own.get(name):
            raise self._needs(name)
        self.reads.append((name, WHOLE))
        return obj


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class DirectReader:
    """The reads of an iteration re-executed in the kernel: the committed
    state is the serial state, so every read goes straight to the object."""

    __slots__ = ()

    @staticmethod
    def item(name: str, obj: Any, key: Any) -> Any:
        return obj[key]

    @staticmethod
    def get(name: str, obj: Any, key: Any, *default: Any) -> Any:
        return obj.get(key, *default)

    @staticmethod
    def has(name: str, obj: Any, key: Any) -> bool:
        return key in obj

    @staticmethod
    def length(name: str, obj: Any, len_: Callable[[Any], int]) -> int:
        return len_(obj)

    @staticmethod
    def attr(name: str, obj: Any, attr: str) -> Any:
        return getattr(obj, attr)

    @staticmethod
    def whole(name: str, obj: Any) -> Any:
        return obj


class ApplyingLog:
    """The log of an iteration re-executed in the kernel: each entry is
    applied at once (the iteration sees its own writes, as in serial), and
    the locations it writes in shared objects go to the run's WriteSet."""

    __slots__ = ("ns", "shared", "writes", "index", "lock", "count")

    def __init__(
        self, ns: MutableMapping[str, Any], shared: frozenset[str], writes: WriteSet, lock: Any
    ) -> None:
        self.ns = ns
        self.shared = shared
        self.writes = writes
        self.index = 0  # the iteration being run (set by the caller)
        self.lock = lock if lock is not None else _NoLock()
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def append(self, e: tuple) -> None:
        op = e[0]
        self.count += 1
        if op == TARGET or op == TARGET_WRITE or op == FLUSH:
            return
        with self.lock:
            if op == REDUCE:
                reduce_into(self.ns, e)
                return
            if op == GROUP:
                group_into(self.ns, e)
                return
            obj = self.ns[e[1]]
            if e[1] in self.shared:
                self.writes.add(e[1], write_locations(obj, e), self.index)
            if op == SET_ITEM:
                obj[e[3]] = e[2]
            elif op == CALL:
                getattr(obj, e[2])(*e[3], **(e[4] or {}))
            else:
                apply_entry(obj, e)


def run_lock() -> threading.RLock:
    """The lock that keeps a worker thread's read of a shared object apart
    from the kernel's replay into it (threads share the objects)."""
    return threading.RLock()
