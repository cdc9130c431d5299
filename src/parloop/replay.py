"""Mutation-log entries and their replay on the kernel's objects.

A worker never writes to an object bound outside the iteration: it appends an
entry to its log, with every key, argument and value already evaluated, and
the kernel applies the entries in iteration order (DESIGN §3).  Entries are
plain tuples so that logging costs one tuple and one ``list.append`` in the
worker, and they pickle compactly when they come back from an engine.

Entry shapes (the first item is the opcode)::

    (SET_ITEM, root, value, key)              root[key] = value
    (SET_ATTR, root, value, name)             root.name = value
    (CALL, root, method, args, kwargs|None)   root.method(*args, **kwargs)
    (REDUCE, root, op, value)                 root op= value   (a notebook name)
    (PATH, root, steps, final)                anything longer: see apply_path
    (TARGET, n, name, obj, mutated)           the worker's copy of the loop target
                                              ``name`` at the end of the chunk's n-th
                                              iteration: the kernel's own item is
                                              synced to it when ``mutated``, and the
                                              copy stands for the kernel's item
                                              wherever the log stores it

``steps`` is a tuple of ``("i", key)`` (subscript), ``("a", name)`` (attribute)
and ``("c", args, kwargs)`` (call); ``final`` is one of ``("si", key, value)``,
``("sa", name, value)``, ``("di", key)``, ``("da", name)``, ``("c", args,
kwargs)``, ``("ri", key, op, value)``, ``("ra", name, op, value)``.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any, Callable, Iterable, MutableMapping

SET_ITEM, SET_ATTR, CALL, REDUCE, PATH, TARGET = range(6)

INPLACE: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul,
    "/=": operator.itruediv, "//=": operator.ifloordiv, "%=": operator.imod,
    "**=": operator.ipow, "<<=": operator.ilshift, ">>=": operator.irshift,
    "|=": operator.ior, "^=": operator.ixor, "&=": operator.iand, "@=": operator.imatmul,
}


def _walk(obj: Any, steps: Iterable[tuple]) -> Any:
    for step in steps:
        kind = step[0]
        if kind == "i":
            obj = obj[step[1]]
        elif kind == "a":
            obj = getattr(obj, step[1])
        else:
            obj = obj(*step[1], **(step[2] or {}))
    return obj


def apply_path(obj: Any, steps: tuple, final: tuple) -> None:
    """Evaluate the chain on the real object, then the final write or call."""
    obj = _walk(obj, steps)
    kind = final[0]
    if kind == "si":
        obj[final[1]] = final[2]
    elif kind == "sa":
        setattr(obj, final[1], final[2])
    elif kind == "c":
        obj(*final[1], **(final[2] or {}))
    elif kind == "di":
        del obj[final[1]]
    elif kind == "da":
        delattr(obj, final[1])
    elif kind == "ri":
        obj[final[1]] = INPLACE[final[2]](obj[final[1]], final[3])
    elif kind == "ra":
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


_SCALARS = (int, float, complex, str, bytes, bool, type(None))


def _syncable(dst: Any, src: Any) -> bool:
    if type(dst) is not type(src) or isinstance(dst, _SCALARS):
        return False
    return isinstance(dst, (dict, list, set)) or _is_array(dst) or (
        hasattr(dst, "__dict__") and not isinstance(dst, type) and not callable(dst))


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
    elif _is_array(dst):
        if dst.shape == src.shape and dst.dtype == src.dtype:
            dst[...] = src
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
    if op == PATH:
        final = e[3]
        if final[0] in ("si", "sa"):
            final = (final[0], final[1], _substitute(final[2], subst))
        elif final[0] == "c":
            kw = final[2] and {k: _substitute(v, subst) for k, v in final[2].items()}
            final = ("c", tuple(_substitute(a, subst) for a in final[1]), kw)
        return (op, e[1], e[2], final)
    return e


def replay(ns: MutableMapping[str, Any], log: list,
           target_env: Callable[[int], dict] | None = None, start: int = 0) -> None:
    """Apply a log to the namespace, in order.

    ``target_env(n)`` gives the kernel-side binding of the loop target for the
    chunk's n-th iteration (only needed when the log holds TARGET entries).  If
    an entry raises (``out[k] = v`` on a list too short, as serial would), the
    exception propagates with ``parloop_log_pos`` set to the entry's position,
    so the caller can tell which iteration it belongs to."""
    subst: dict[int, Any] = {}
    if target_env is not None:
        for e in log:
            if e[0] == TARGET:
                subst[id(e[3])] = target_env(e[1])[e[2]]
    e: tuple = ()
    try:
        for e in (log if not start else itertools.islice(log, start, None)):
            if subst:
                e2 = _substituted(e, subst)
            else:
                e2 = e
            op = e2[0]
            if op == SET_ITEM:
                ns[e2[1]][e2[3]] = e2[2]
            elif op == CALL:
                getattr(ns[e2[1]], e2[2])(*e2[3], **(e2[4] or {}))
            elif op == REDUCE:
                ns[e2[1]] = INPLACE[e2[2]](ns[e2[1]], e2[3])
            elif op == TARGET:
                if e2[4]:
                    sync_into(target_env(e2[1])[e2[2]], e2[3])  # type: ignore[misc]
            else:
                apply_entry(ns[e2[1]], e2)
    except Exception as err:
        err.parloop_log_pos = next(i for i in range(start, len(log))  # type: ignore
                                   if log[i] is e)
        raise
