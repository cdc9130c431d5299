"""Locations in shared objects: what an iteration reads and what a log entry
writes, in one vocabulary, so that the ordered commit can tell whether an
iteration read something an earlier iteration wrote (the run-time dependence
test, after LRPD: run speculatively as a do-all, test, re-execute what the
test refutes).

A location is a small tuple:

* ``(ITEM, key)``  one key of a dict or set, one index of a list (negative
  indices normalised), one row of a NumPy array, one column of a DataFrame;
* ``(ATTR, name)`` one instance attribute of a plain object;
* ``LENGTH``       the size of the object (``len(x)``);
* ``WHOLE``        anything else: the object as a whole (iterating it, passing
  it to a call, a slice, a method call, a key of an object parloop does not
  know).  A whole read conflicts with any write, a whole write with any read.

Granularity is chosen per type so that two different locations can never
alias: where parloop cannot be sure (a custom ``__getitem__``, a pandas
Series indexed by label or by position), the location is WHOLE.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from .entries import CALL, FINAL_SET_ITEM, PATH, SET_ATTR, SET_ITEM, STEP_ATTR, STEP_CALL, STEP_ITEM

ITEM, ATTR = 0, 1
LENGTH: tuple = (2,)
WHOLE: tuple = (3,)

#: methods that write one key of a dict / set (and may change its size)
_KEYED_METHODS = frozenset(
    {"setdefault", "pop", "add", "discard", "remove", "__setitem__", "__delitem__"}
)


def _is_array(obj: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def _is_frame(obj: Any) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(obj, pd.DataFrame)


def _int_index(key: Any) -> int | None:
    """``key`` as a plain int when it is an integer index (int, NumPy integer)."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    np = sys.modules.get("numpy")
    if np is not None and isinstance(key, np.integer):
        return int(key)
    return None


def item_location(obj: Any, key: Any) -> tuple:
    """The location ``obj[key]`` reads or writes."""
    if isinstance(obj, (dict, set, frozenset)):
        try:
            hash(key)
        except TypeError:
            return WHOLE
        return (ITEM, key)
    if isinstance(obj, (list, tuple)):
        i = _int_index(key)
        if i is None:
            return WHOLE
        return (ITEM, i + len(obj) if i < 0 else i)
    if _is_array(obj):
        first = key[0] if isinstance(key, tuple) and key else key
        i = _int_index(first)
        if i is None or obj.ndim == 0:
            return WHOLE
        return (ITEM, i + obj.shape[0] if i < 0 else i)
    if _is_frame(obj):
        if isinstance(key, (str, int, float, bytes)) and not isinstance(key, bool):
            return (ITEM, key)
        return WHOLE
    return WHOLE


def attr_location(obj: Any, name: str) -> tuple:
    """The location ``obj.name`` reads: one attribute of a plain instance; a
    property or a method may read anything."""
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict) and name in d and not isinstance(obj, type):
        return (ATTR, name)
    return WHOLE


def _sizes_change(obj: Any) -> bool:
    """Whether writing a key may change ``len(obj)`` (a new dict key does; a
    list index or an array row does not)."""
    return not (isinstance(obj, (list, tuple)) or _is_array(obj))


def write_locations(obj: Any, entry: tuple) -> Iterable[tuple]:
    """The locations a log entry on the shared object ``obj`` writes (called
    in the kernel, before the entry is applied)."""
    op = entry[0]
    if op == SET_ITEM:
        loc = item_location(obj, entry[3])
        if loc is WHOLE:
            return (WHOLE,)
        return (loc, LENGTH) if _sizes_change(obj) else (loc,)
    if op == SET_ATTR:
        return ((ATTR, entry[3]),) if hasattr(obj, "__dict__") else (WHOLE,)
    if op == CALL:
        method, args = entry[2], entry[3]
        if method in _KEYED_METHODS and args and isinstance(obj, (dict, set)):
            loc = item_location(obj, args[0])
            return (WHOLE,) if loc is WHOLE else (loc, LENGTH)
        return (WHOLE,)
    if op == PATH:
        return path_locations(obj, entry[2], entry[3])
    return (WHOLE,)


def path_locations(obj: Any, steps: tuple, final: tuple) -> Iterable[tuple]:
    """``obj[k]...`` writes inside the element at k (location k); ``obj.
    setdefault(k, d)...`` may add k; ``obj.a...`` writes inside attribute a."""
    if not steps:
        if final[0] == FINAL_SET_ITEM:
            return write_locations(obj, (SET_ITEM, None, final[2], final[1]))
        return (WHOLE,)
    first = steps[0]
    if first[0] == STEP_ITEM:
        return (item_location(obj, first[1]),)
    if first[0] == STEP_ATTR:
        if len(steps) > 1 and steps[1][0] == STEP_CALL:
            method, args = first[1], steps[1][1]
            if method in ("setdefault", "get") and args and isinstance(obj, dict):
                loc = item_location(obj, args[0])
                return (WHOLE,) if loc is WHOLE else (loc, LENGTH)
            return (WHOLE,)
        return (attr_location(obj, first[1]),)
    return (WHOLE,)
