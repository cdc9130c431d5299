"""Replay of mutation-log entries (:mod:`parloop.log.entries`) on the
kernel's objects, in iteration order (the ordered commit of docs/design.md §3)."""

from __future__ import annotations

import contextlib
import io
import itertools
from typing import Any, Callable, Iterable, Iterator, MutableMapping

from .entries import (
    CALL,
    CMP,
    FINAL_AUG_ATTR,
    FINAL_AUG_ITEM,
    FINAL_DEL_ATTR,
    FINAL_DEL_ITEM,
    FINAL_SET_ATTR,
    FINAL_SET_ITEM,
    FLUSH,
    GROUP,
    INPLACE,
    OPS,
    PATH,
    REDUCE,
    SCALARS,
    SET_ATTR,
    SET_ITEM,
    STEP_ATTR,
    STEP_CALL,
    STEP_ITEM,
    TARGET,
    TARGET_WRITE,
)


def _walk(obj: Any, steps: Iterable[tuple]) -> Any:
    for step in steps:
        kind = step[0]
        if kind == STEP_ITEM:
            obj = obj[step[1]]
        elif kind == STEP_ATTR:
            obj = getattr(obj, step[1])
        else:
            obj = obj(*step[1], **(step[2] or {}))
    return obj


def apply_path(obj: Any, steps: tuple, final: tuple) -> None:
    """Evaluate the chain on the real object, then the final write or call."""
    obj = _walk(obj, steps)
    kind = final[0]
    if kind == FINAL_SET_ITEM:
        obj[final[1]] = final[2]
    elif kind == FINAL_SET_ATTR:
        setattr(obj, final[1], final[2])
    elif kind == STEP_CALL:
        obj(*final[1], **(final[2] or {}))
    elif kind == FINAL_DEL_ITEM:
        del obj[final[1]]
    elif kind == FINAL_DEL_ATTR:
        delattr(obj, final[1])
    elif kind == FINAL_AUG_ITEM:
        obj[final[1]] = INPLACE[final[2]](obj[final[1]], final[3])
    elif kind == FINAL_AUG_ATTR:
        setattr(obj, final[1], INPLACE[final[2]](getattr(obj, final[1]), final[3]))
    else:  # pragma: no cover - the rewrite emits only the kinds above
        raise ValueError(f"unknown final step {kind!r}")


def apply_entry(obj: Any, e: tuple) -> None:
    """Apply one entry whose root object is ``obj`` (not for REDUCE/TARGET)."""
    op = e[0]
    if op == SET_ITEM:
        obj[e[3]] = e[2]
    elif op == CALL:
        getattr(obj, e[2])(*e[3], **(e[4] or {}))
    elif op == SET_ATTR:
        setattr(obj, e[3], e[2])
    elif op == PATH:
        apply_path(obj, e[2], e[3])
    else:  # pragma: no cover
        raise ValueError(f"entry {op} has no single root object")


def _syncable(dst: Any, src: Any) -> bool:
    if type(dst) is not type(src) or isinstance(dst, SCALARS):
        return False
    return (
        isinstance(dst, (dict, list, set))
        or _is_array(dst)
        or (hasattr(dst, "__dict__") and not isinstance(dst, type) and not callable(dst))
    )


def _is_pandas(x: Any) -> bool:
    import sys

    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(x, (pd.DataFrame, pd.Series))


def _is_array(x: Any) -> bool:
    return type(x).__name__ == "ndarray" and hasattr(x, "__array_interface__")


def sync_into(dst: Any, src: Any, _memo: set[int] | None = None) -> None:
    """Make the kernel's object ``dst`` equal to the worker's copy ``src`` in
    place, recursively, so that ``dst`` and the containers inside it keep
    their identity (``row is rows[-1]``, ``row["tags"] is tags_before``)."""
    if dst is src:
        return
    memo = _memo if _memo is not None else set()
    if id(dst) in memo:
        return
    memo.add(id(dst))
    if isinstance(dst, dict):
        same_order = list(dst) == list(src)
        merged = {}
        for k, v in src.items():
            old = dst.get(k, _MISSING)
            if old is not _MISSING and _syncable(old, v):
                sync_into(old, v, memo)
                merged[k] = old
            else:
                merged[k] = v
        if same_order:
            for k, v in merged.items():
                if dst[k] is not v:
                    dst[k] = v
        else:
            dst.clear()
            dst.update(merged)
    elif isinstance(dst, list):
        if len(dst) == len(src):
            for i, v in enumerate(src):
                if _syncable(dst[i], v):
                    sync_into(dst[i], v, memo)
                elif dst[i] is not v:
                    dst[i] = v
        else:
            dst[:] = src
    elif isinstance(dst, set):
        dst.clear()
        dst.update(src)
    elif type(dst) is tuple and type(src) is tuple and len(dst) == len(src):
        # a tuple stays itself: what changes is inside it (``heapify(t[1])``)
        for a, b in zip(dst, src):
            if _syncable(a, b):
                sync_into(a, b, memo)
    elif _is_array(dst):
        if dst.shape == src.shape and dst.dtype == src.dtype:
            dst[...] = src
    elif _is_pandas(dst):
        # a DataFrame's data lives in its block manager, not in Python
        # attributes: take the copy's manager whole
        object.__setattr__(dst, "_mgr", src._mgr)
        for attr in ("_attrs", "_name"):
            if attr in vars(src):
                object.__setattr__(dst, attr, vars(src)[attr])
        cache = vars(dst).get("_item_cache")
        if isinstance(cache, dict):
            cache.clear()
    elif hasattr(dst, "__dict__"):
        sync_into(vars(dst), vars(src), memo)
        for slot in getattr(type(dst), "__slots__", ()):
            if hasattr(src, slot):
                setattr(dst, slot, getattr(src, slot))


class _Missing:
    pass


_MISSING = _Missing()


def _substitute(v: Any, subst: dict[int, Any]) -> Any:
    """The kernel's item in place of the worker's copy of it (top level, and
    one level into tuples and lists: ``sel.append(row)``, ``out[i] = (i, row)``)."""
    hit = subst.get(id(v), _MISSING)
    if hit is not _MISSING:
        return hit
    if type(v) is tuple and any(id(x) in subst for x in v):
        return tuple(subst.get(id(x), x) for x in v)
    if type(v) is list and any(id(x) in subst for x in v):
        return [subst.get(id(x), x) for x in v]
    return v


def _substituted(e: tuple, subst: dict[int, Any]) -> tuple:
    op = e[0]
    if op == SET_ITEM or op == SET_ATTR:
        return (op, e[1], _substitute(e[2], subst), e[3])
    if op == CALL:
        kw = e[4] and {k: _substitute(v, subst) for k, v in e[4].items()}
        return (op, e[1], e[2], tuple(_substitute(a, subst) for a in e[3]), kw)
    if op == REDUCE:
        return (op, e[1], e[2], _substitute(e[3], subst))
    if op == GROUP:
        return (op, e[1], e[2], e[3], e[4], tuple(_substitute(v, subst) for v in e[5]))
    if op == TARGET_WRITE:
        return (op, e[1], e[2], _substituted(e[3], subst))
    if op == PATH:
        final = e[3]
        if final[0] in (FINAL_SET_ITEM, FINAL_SET_ATTR):
            final = (final[0], final[1], _substitute(final[2], subst))
        elif final[0] == STEP_CALL:
            kw = final[2] and {k: _substitute(v, subst) for k, v in final[2].items()}
            final = (STEP_CALL, tuple(_substitute(a, subst) for a in final[1]), kw)
        return (op, e[1], e[2], final)
    return e


def target_substitutions(log: list, target_env: Callable[[int], dict] | None) -> dict[int, Any]:
    """id(worker's copy of a loop item) -> the kernel's own item (engines)."""
    subst: dict[int, Any] = {}
    if target_env is not None:
        for e in log:
            if e[0] == TARGET:
                subst[id(e[3])] = target_env(e[1])[e[2]]
    return subst


class EntryFailed(Exception):
    """Replaying the log entry at ``pos`` raised ``exc`` in the kernel."""

    def __init__(self, pos: int, exc: Exception):
        super().__init__(pos, exc)
        self.pos, self.exc = pos, exc


def replay(
    ns: MutableMapping[str, Any],
    log: list,
    target_env: Callable[[int], dict] | None = None,
    start: int = 0,
    stop: int | None = None,
    subst: dict[int, Any] | None = None,
    flush: Callable[[int], None] | None = None,
    quiet: frozenset[str] = frozenset(),
) -> None:
    """Apply a log to the namespace, in order.

    ``quiet``: names (``private=`` copies) whose writes the worker already
    made on its own copy, capturing what they printed: the kernel's object
    goes through them silently.

    ``target_env(n)`` gives the kernel-side binding of the loop target for the
    chunk's n-th iteration (only needed when the log holds TARGET entries).  If
    an entry raises (``out[k] = v`` on a list too short, as serial would),
    :class:`EntryFailed` says which entry (so the caller can tell which
    iteration it belongs to) and carries the exception, untouched."""
    if subst is None:
        subst = target_substitutions(log, target_env)
    e: tuple = ()
    try:
        for e in log if not start and stop is None else itertools.islice(log, start, stop):
            if subst:
                e2 = _substituted(e, subst)
            else:
                e2 = e
            op = e2[0]
            if op == SET_ITEM:
                ns[e2[1]][e2[3]] = e2[2]
            elif op == CALL:
                if e2[1] in quiet:
                    with _silenced():
                        getattr(ns[e2[1]], e2[2])(*e2[3], **(e2[4] or {}))
                else:
                    getattr(ns[e2[1]], e2[2])(*e2[3], **(e2[4] or {}))
            elif op == REDUCE:
                reduce_into(ns, e2)
            elif op == GROUP:
                group_into(ns, e2)
            elif op == TARGET:
                if e2[4]:
                    sync_into(target_env(e2[1])[e2[2]], e2[3])  # type: ignore[misc]
            elif op == TARGET_WRITE:
                # the worker made this write on its copy of the item, and
                # what that printed is in the chunk's output already: the
                # kernel's item goes through it silently (printed once, as
                # in serial)
                with _silenced():
                    apply_entry(target_env(e2[1])[e2[2]], e2[3])  # type: ignore[misc]
            elif op == FLUSH:
                if flush is not None:
                    flush(e2[1])
            elif e2[1] in quiet:
                with _silenced():
                    apply_entry(ns[e2[1]], e2)
            else:
                apply_entry(ns[e2[1]], e2)
    except Exception as err:  # noqa: BLE001 - the iteration raised it, as serial would
        pos = next(i for i in range(start, len(log) if stop is None else stop) if log[i] is e)
        raise EntryFailed(pos, err) from None


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Output of a write replayed in the kernel that the worker already made
    (and whose output it captured) goes nowhere -- this thread's only: while
    a run is on, sys.stdout routes each thread's writes by a context variable
    (runtime.OutputCapture), so worker threads printing meanwhile are not
    touched."""
    from ..runtime import _parts_var

    if _capturing():
        token = _parts_var.set([])
        try:
            yield
        finally:
            _parts_var.reset(token)
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _capturing() -> bool:
    """A run's output routing is installed (runtime.OutputCapture)."""
    from ..runtime import OutputCapture

    return OutputCapture._depth > 0


def reduce_into(ns: MutableMapping[str, Any], e: tuple) -> None:
    """``root = OPS[op](root, value)`` on a notebook name; an unbound name is
    the NameError serial Python raises."""
    if e[2] == "=":
        ns[e[1]] = e[3]
        return
    try:
        acc = ns[e[1]]
    except KeyError:
        raise NameError(f"name {e[1]!r} is not defined", name=e[1]) from None
    ns[e[1]] = OPS[e[2]](acc, e[3])


def group_into(ns: MutableMapping[str, Any], e: tuple) -> None:
    """The argmax/argmin shape: bind the names together when the candidate
    wins against the kernel's current value (ties as serial)."""
    try:
        kept = ns[e[1]]
    except KeyError:
        raise NameError(f"name {e[1]!r} is not defined", name=e[1]) from None
    if CMP[e[2]](e[3], kept):
        for name, value in zip(e[4], e[5]):
            ns[name] = value
