"""The mutation-log format: one home for the entry kinds that the rewrite
emits, the worker runtime appends and the kernel replays.

A worker never writes to an object bound outside the iteration: it appends an
entry to its log, with every key, argument and value already evaluated, and
the kernel applies the entries in iteration order.  Entries are plain tuples
(one tuple and one ``list.append`` per write in the worker; they pickle
compactly when they come back from an engine) whose first item is one of the
opcodes below::

    (SET_ITEM, root, value, key)              root[key] = value
    (SET_ATTR, root, value, name)             root.name = value
    (CALL, root, method, args, kwargs|None)   root.method(*args, **kwargs)
    (REDUCE, root, op, value)                 root = OPS[op](root, value)   (a notebook name)
    (PATH, root, steps, final)                anything longer: see replay.apply_path
    (TARGET, n, name, obj, mutated)           the worker's copy of the loop target
                                              ``name`` at the end of the chunk's n-th
                                              iteration (engines: see replay)
    (TARGET_WRITE, n, name, entry)            a write through the loop target ``name``
                                              in the chunk's n-th iteration (engines):
                                              ``entry`` (its root None) is applied to
                                              the kernel's own item
    (FLUSH, k)                                write the iteration's captured output up
                                              to part k before what follows (a replayed
                                              ``plt.show()`` shows after the prints
                                              before it)
    (GROUP, compared, cmp, candidate, names, values)
                                              the argmax/argmin shape ``if s > best:
                                              best = s; best_k = k``: when
                                              ``CMP[cmp](candidate, compared)`` holds
                                              on the kernel's values, bind ``names``
                                              to ``values``

``steps`` is a tuple of ``(STEP_ITEM, key)``, ``(STEP_ATTR, name)`` and
``(STEP_CALL, args, kwargs)``; ``final`` is one of ``(FINAL_SET_ITEM, key,
value)``, ``(FINAL_SET_ATTR, name, value)``, ``(FINAL_DEL_ITEM, key)``,
``(FINAL_DEL_ATTR, name)``, ``(STEP_CALL, args, kwargs)``, ``(FINAL_AUG_ITEM,
key, op, value)``, ``(FINAL_AUG_ATTR, name, op, value)``.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Callable

SET_ITEM, SET_ATTR, CALL, REDUCE, PATH, TARGET, GROUP, TARGET_WRITE, FLUSH = range(9)

STEP_ITEM = "i"
STEP_ATTR = "a"
STEP_CALL = "c"

FINAL_SET_ITEM = "si"
FINAL_SET_ATTR = "sa"
FINAL_DEL_ITEM = "di"
FINAL_DEL_ATTR = "da"
FINAL_AUG_ITEM = "ri"
FINAL_AUG_ATTR = "ra"

#: the augmented assignments (``total += v``): in place, as Python does
INPLACE: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd,
    "-=": operator.isub,
    "*=": operator.imul,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    "%=": operator.imod,
    "**=": operator.ipow,
    "<<=": operator.ilshift,
    ">>=": operator.irshift,
    "|=": operator.ior,
    "^=": operator.ixor,
    "&=": operator.iand,
    "@=": operator.imatmul,
}

#: the binary operators of reductions written by rebinding (``acc = acc + v``:
#: a new object, not an in-place update, exactly as the expression makes one)
BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "**": operator.pow,
    "<<": operator.lshift,
    ">>": operator.rshift,
    "|": operator.or_,
    "^": operator.xor,
    "&": operator.and_,
    "@": operator.matmul,
}


def _flipped(f: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def flipped(acc: Any, v: Any) -> Any:
        return f(v, acc)

    return flipped


#: every REDUCE operator: ``OPS[op](accumulated, operand)``.  ``"r+"`` is
#: ``acc = v + acc`` (the accumulated value on the right: order matters for
#: str and list); ``"max"`` is ``m = max(m, v)`` and ``"rmax"`` ``m = max(v, m)``
#: (ties keep the first argument, as the builtin does)
OPS: dict[str, Callable[[Any, Any], Any]] = {
    **INPLACE,
    **BINARY,
    **{"r" + k: _flipped(f) for k, f in BINARY.items()},
    "=": lambda acc, v: v,
    "max": lambda acc, v: builtins.max(acc, v),
    "rmax": lambda acc, v: builtins.max(v, acc),
    "min": lambda acc, v: builtins.min(acc, v),
    "rmin": lambda acc, v: builtins.min(v, acc),
}

#: the comparisons of a GROUP entry: ``CMP[cmp](candidate, kept)``
CMP: dict[str, Callable[[Any, Any], Any]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}

#: value types that cannot be written through (a loop target bound to one is
#: never synced back)
SCALARS = (int, float, complex, str, bytes, bool, type(None))
