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
    (TARGET, n, root, entry)                  entry written through the loop
                                              target of the chunk's n-th iteration

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


def replay(ns: MutableMapping[str, Any], log: list,
           target_env: Callable[[int], dict] | None = None, start: int = 0) -> None:
    """Apply a log to the namespace, in order.

    ``target_env(n)`` gives the kernel-side binding of the loop target for the
    chunk's n-th iteration (only needed when the log holds TARGET entries).  If
    an entry raises (``out[k] = v`` on a list too short, as serial would), the
    exception propagates with ``parloop_log_pos`` set to the entry's position,
    so the caller can tell which iteration it belongs to."""
    e: tuple = ()
    try:
        for e in (log if not start else itertools.islice(log, start, None)):
            op = e[0]
            if op == SET_ITEM:
                ns[e[1]][e[3]] = e[2]
            elif op == CALL:
                getattr(ns[e[1]], e[2])(*e[3], **(e[4] or {}))
            elif op == REDUCE:
                ns[e[1]] = INPLACE[e[2]](ns[e[1]], e[3])
            elif op == TARGET:
                assert target_env is not None
                apply_entry(target_env(e[1])[e[2]], e[3])
            else:
                apply_entry(ns[e[1]], e)
    except Exception as err:
        err.parloop_log_pos = next(i for i in range(start, len(log))  # type: ignore
                                   if log[i] is e)
        raise
