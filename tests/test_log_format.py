"""The mutation-log format (parloop.log.entries), statement by statement.

A worker never writes to an object bound outside the iteration: the rewritten
body appends one entry per write, and the kernel replays the entries in
iteration order.  For each statement form this checks the three steps of that
contract on their own, below the magics:

* statement -> entries: the exact tuples the rewritten body records, run the
  way a worker runs it (``rewrite.build_chunk_function`` compiled, then
  ``runtime.run_chunk``, as the thread and engine backends call them);
* the worker's namespace is left as it was (the writes are only recorded);
* entries -> effect: ``log.replay.replay`` on a fresh copy of the namespace
  leaves it strictly equal (helpers.deep_diff: types, order, bit-identical
  floats) to running the statement serially with plain ``exec``.

Hypothesis draws the keys and values of the common forms.  The magics' own
serial equivalence, whole cells at a time, is test_differential.py's.
"""

from __future__ import annotations

import ast
import copy
import keyword
import pickle
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import deep_diff
from parloop.analysis import analyse
from parloop.analysis.namespace import plain_roots
from parloop.log.commit import TargetBinder
from parloop.log.entries import (
    CALL,
    FINAL_AUG_ATTR,
    FINAL_AUG_ITEM,
    FINAL_DEL_ATTR,
    FINAL_DEL_ITEM,
    FINAL_SET_ATTR,
    FINAL_SET_ITEM,
    FLUSH,
    GROUP,
    PATH,
    REDUCE,
    SET_ATTR,
    SET_ITEM,
    STEP_ATTR,
    STEP_CALL,
    STEP_ITEM,
    TARGET,
    TARGET_WRITE,
)
from parloop.log.replay import replay
from parloop.rewrite import CHUNK_FN, build_chunk_function, classify_call_roots
from parloop.runtime import ChunkResult, OutputCapture, run_chunk

FILENAME = "<log-format cell>"


class Box:
    """An object with attributes, as a notebook's own classes are."""

    def __init__(self, **attrs: Any):
        self.__dict__.update(attrs)

    def __repr__(self) -> str:
        return f"Box({vars(self)!r})"


class Logger:
    """A call root whose method is not a known mutation (``logger.info``):
    the call is replayed in order, after what the iteration printed before it."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: Any) -> None:
        self.lines.append(str(msg))


# ------------------------------------------------------------------ the harness


class Recorded:
    """One loop cell run as a worker runs it: its plan, the chunk's result
    (``.log``: the entries) and the worker's namespace afterwards."""

    def __init__(self, cell: str, ns: dict[str, Any], engines: bool = False):
        tree = ast.parse(cell)
        plain, stateful = plain_roots(tree, ns)
        self.plan = analyse(tree, plain_roots=plain, stateful=stateful)
        worker_roots = classify_call_roots(self.plan, ns)
        # engines work on copies of the loop's items: what goes back to the
        # kernel's own items is recorded too (TARGET, TARGET_WRITE)
        sync = self.plan.target_roots | self.plan.stored_targets if engines else set()
        module = build_chunk_function(self.plan, worker_roots, sync_names=sync, hooked=False)
        # the worker's globals: a copy, so that "it wrote nothing" can be checked
        self.worker_ns = copy.deepcopy(ns)
        scratch: dict[str, Any] = {}
        exec(compile(module, FILENAME, "exec"), self.worker_ns, scratch)
        items = list(self._iterable(self.worker_ns))
        with OutputCapture():  # prints go to the chunk's parts, as in a run
            self.result: ChunkResult = run_chunk(
                scratch[CHUNK_FN], items, 0, "raise", frozenset(self.plan.private)
            )
        assert self.result.raised is None, self.result.raised
        assert self.result.done == len(items)

    def _iterable(self, ns: dict[str, Any]) -> Any:
        return eval(compile(ast.Expression(body=self.plan.loop.iter), FILENAME, "eval"), ns)

    @property
    def log(self) -> list:
        return self.result.log

    def target_env(self, kernel_ns: dict[str, Any]) -> Callable[[int], dict[str, Any]]:
        """The kernel's binding of the loop target in iteration n, from its
        own items (what the commit gives replay for TARGET entries)."""
        binder = TargetBinder(self.plan, FILENAME, kernel_ns)
        items = list(self._iterable(kernel_ns))
        return lambda n: binder.bind(items[n])


def _serial(cell: str, ns: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(ns)
    exec(compile(cell, FILENAME, "exec"), out)
    return out


def check(
    cell: str,
    ns: dict[str, Any],
    entries: list[tuple] | None = None,
    *,
    engines: bool = False,
    pickled: bool = False,
) -> tuple[Recorded, dict[str, Any]]:
    """Statement -> entries (equal to ``entries`` where given) -> replayed on
    a fresh copy of ``ns``: the same namespace as serial execution, outside
    the iteration's own names (those are committed from the chunk's snapshot,
    not by the log).  ``pickled``: replay the log after a pickle round trip,
    as it comes back from an engine.  Returns the recording and the replayed
    namespace."""
    rec = Recorded(cell, ns, engines=engines)
    if entries is not None:
        assert rec.log == entries
    own = set(rec.plan.private) | set(rec.plan.targets) | {"__builtins__"}
    if not engines:  # (an engine writes through the loop target on its copies)
        written = [k for k in ns if deep_diff(ns[k], rec.worker_ns[k], k) is not None]
        assert written == [], f"the worker wrote to {written}"

    kernel = copy.deepcopy(ns)
    log = pickle.loads(pickle.dumps(rec.log)) if pickled else rec.log
    replay(kernel, log, rec.target_env(kernel) if engines else None)
    serial = _serial(cell, ns)
    names = (set(serial) | set(kernel)) - own
    for name in sorted(names):
        assert name in kernel and name in serial, f"{name}: bound on one side only"
        d = deep_diff(serial[name], kernel[name], name)
        assert d is None, f"replay differs from serial: {d}"
    return rec, kernel


# ------------------------------------------------------------------ statement -> entries

#: (id, namespace before the loop, cell, the entries it records).  Each loop
#: runs its statement over a few iterations, so entries are checked in order.
FORMS: list[tuple[str, Callable[[], dict[str, Any]], str, list[tuple]]] = [
    (
        "set_item  out[i] = v",
        lambda: {"out": {}},
        "for i in range(3):\n    out[i] = i * 10",
        [(SET_ITEM, "out", 0, 0), (SET_ITEM, "out", 10, 1), (SET_ITEM, "out", 20, 2)],
    ),
    (
        "set_item  tuple key",
        lambda: {"grid": {}},
        "for i in range(2):\n    grid[i, -i] = i",
        [(SET_ITEM, "grid", 0, (0, 0)), (SET_ITEM, "grid", 1, (1, -1))],
    ),
    (
        "set_item  slice key",
        lambda: {"out": [0, 0, 0, 0]},
        "for i in range(0, 4, 2):\n    out[i : i + 2] = [i, i]",
        [
            (SET_ITEM, "out", [0, 0], slice(0, 2, None)),
            (SET_ITEM, "out", [2, 2], slice(2, 4, None)),
        ],
    ),
    (
        "set_item  two targets",
        lambda: {"a": {}, "b": {}},
        "for i in range(2):\n    a[i] = b[-i] = i + 1",
        [
            (SET_ITEM, "a", 1, 0),
            (SET_ITEM, "b", 1, 0),
            (SET_ITEM, "a", 2, 1),
            (SET_ITEM, "b", 2, -1),
        ],
    ),
    (
        "set_item  unpacking",
        lambda: {"lo": {}, "hi": {}},
        "for i in range(2):\n    lo[i], hi[i] = -i, i",
        [
            (SET_ITEM, "lo", 0, 0),
            (SET_ITEM, "hi", 0, 0),
            (SET_ITEM, "lo", -1, 1),
            (SET_ITEM, "hi", 1, 1),
        ],
    ),
    (
        "set_attr  obj.a = v",
        lambda: {"obj": Box(a=None)},
        "for i in range(3):\n    obj.a = i",
        [(SET_ATTR, "obj", 0, "a"), (SET_ATTR, "obj", 1, "a"), (SET_ATTR, "obj", 2, "a")],
    ),
    (
        "call  out.append(y)",
        lambda: {"out": []},
        "for i in range(3):\n    out.append(i * i)",
        [(CALL, "out", "append", (0,), None), (CALL, "out", "append", (1,), None)]
        + [(CALL, "out", "append", (4,), None)],
    ),
    (
        "call  keyword arguments",
        lambda: {"d": {}},
        "for i in range(2):\n    d.update(last=i)",
        [(CALL, "d", "update", (), {"last": 0}), (CALL, "d", "update", (), {"last": 1})],
    ),
    (
        "reduce  total += y",
        lambda: {"total": 0},
        "for i in range(3):\n    total += i",
        [(REDUCE, "total", "+=", 0), (REDUCE, "total", "+=", 1), (REDUCE, "total", "+=", 2)],
    ),
    (
        "reduce  acc = acc + [y]",
        lambda: {"acc": []},
        "for i in range(2):\n    acc = acc + [i]",
        [(REDUCE, "acc", "+", [0]), (REDUCE, "acc", "+", [1])],
    ),
    (
        "reduce  s = y + s (operand on the left)",
        lambda: {"s": ""},
        "for i in range(3):\n    s = str(i) + s",
        [(REDUCE, "s", "r+", "0"), (REDUCE, "s", "r+", "1"), (REDUCE, "s", "r+", "2")],
    ),
    (
        "reduce  m = max(m, y)",
        lambda: {"m": 0},
        "for i in [3, 1, 4]:\n    m = max(m, i)",
        [(REDUCE, "m", "max", 3), (REDUCE, "m", "max", 1), (REDUCE, "m", "max", 4)],
    ),
    (
        "path  d[k][j] = v",
        lambda: {"d": {"k": {}}},
        "for j in range(2):\n    d['k'][j] = -j",
        [
            (PATH, "d", ((STEP_ITEM, "k"),), (FINAL_SET_ITEM, 0, 0)),
            (PATH, "d", ((STEP_ITEM, "k"),), (FINAL_SET_ITEM, 1, -1)),
        ],
    ),
    (
        "path  obj.inner.a = v",
        lambda: {"obj": Box(inner=Box(a=0))},
        "for i in range(2):\n    obj.inner.a = i",
        [
            (PATH, "obj", ((STEP_ATTR, "inner"),), (FINAL_SET_ATTR, "a", 0)),
            (PATH, "obj", ((STEP_ATTR, "inner"),), (FINAL_SET_ATTR, "a", 1)),
        ],
    ),
    (
        "path  del d[k]",
        lambda: {"d": {1: "a", 2: "b", 3: "c"}},
        "for k in [3, 1]:\n    del d[k]",
        [(PATH, "d", (), (FINAL_DEL_ITEM, 3)), (PATH, "d", (), (FINAL_DEL_ITEM, 1))],
    ),
    (
        "path  del obj.a",
        lambda: {"obj": Box(a=1, b=2)},
        "for i in range(2):\n    if i:\n        del obj.a",
        [(PATH, "obj", (), (FINAL_DEL_ATTR, "a"))],
    ),
    (
        "path  out[i] += v",
        lambda: {"out": [1, 2]},
        "for i in range(2):\n    out[i] += 10",
        [
            (PATH, "out", (), (FINAL_AUG_ITEM, 0, "+=", 10)),
            (PATH, "out", (), (FINAL_AUG_ITEM, 1, "+=", 10)),
        ],
    ),
    (
        "path  obj.n *= v",
        lambda: {"obj": Box(n=1)},
        "for i in range(1, 4):\n    obj.n *= i",
        [(PATH, "obj", (), (FINAL_AUG_ATTR, "n", "*=", i)) for i in (1, 2, 3)],
    ),
    (
        "path  d[k].append(v)",
        lambda: {"d": {"k": []}},
        "for i in range(2):\n    d['k'].append(i)",
        [
            (PATH, "d", ((STEP_ITEM, "k"), (STEP_ATTR, "append")), (STEP_CALL, (i,), None))
            for i in (0, 1)
        ],
    ),
    (
        "group  if s > best: best = s; best_k = k",
        lambda: {"best": 1, "best_k": None},
        "for k in [0, 1, 2]:\n    if k * 2 > best:\n        best = k * 2\n        best_k = k",
        # the worker records the candidates that win against what it sees
        [(GROUP, "best", ">", 2, ("best", "best_k"), (2, 1))]
        + [(GROUP, "best", ">", 4, ("best", "best_k"), (4, 2))],
    ),
    (
        "flush  print, then a call that is not a known mutation",
        lambda: {"log": Logger()},
        "for i in range(2):\n    print(i)\n    log.info(i)",
        # FLUSH k: the iteration's output up to part k comes out before the call
        [(FLUSH, 2), (CALL, "log", "info", (0,), None), (FLUSH, 4)]
        + [(CALL, "log", "info", (1,), None)],
    ),
]


@pytest.mark.parametrize(
    "make_ns, cell, entries", [f[1:] for f in FORMS], ids=[f[0] for f in FORMS]
)
def test_statement_records_entries_whose_replay_is_serial(make_ns, cell, entries):
    check(cell, make_ns(), entries)


@pytest.mark.parametrize(
    "make_ns, cell, entries", [f[1:] for f in FORMS], ids=[f[0] for f in FORMS]
)
def test_entries_survive_the_trip_from_an_engine(make_ns, cell, entries):
    """Entries are plain tuples: pickled (as an engine sends them), they
    replay to the same effect."""
    check(cell, make_ns(), entries, pickled=True)


def test_marks_say_where_each_iteration_begins():
    """``marks[n]``: the position of iteration n's first entry (the commit
    cuts the log there when an iteration fails)."""
    rec = Recorded(
        "for i in range(4):\n    if i % 2:\n        out[i] = i\n        out[-i] = i", {"out": {}}
    )
    assert rec.result.marks == [0, 0, 2, 2]
    assert len(rec.log) == 4


def test_writes_through_the_loop_target_stay_out_of_the_log_under_threads():
    """Threads share the kernel's items: ``row['b'] = ...`` runs as written."""
    rec = Recorded("for row in rows:\n    row['b'] = 1", {"rows": [{"a": 0}, {"a": 1}]})
    assert rec.log == []


def test_engines_record_writes_through_the_loop_target_for_the_kernels_items():
    """Engines have copies of the items: the write is recorded as
    TARGET_WRITE (its root None) and replayed on the kernel's own item; an
    item a recorded call stores (``sel.append(row)``) comes back as TARGET,
    and replay stores the kernel's item, not the copy."""
    ns = {"rows": [{"a": 0}, {"a": 1}], "sel": []}
    cell = "for row in rows:\n    row['b'] = row['a'] * 2\n    sel.append(row)"
    rec, kernel = check(cell, ns, engines=True, pickled=True)
    ops = [e[0] for e in rec.log]
    assert ops == [TARGET_WRITE, CALL, TARGET] * 2
    assert rec.log[0] == (TARGET_WRITE, 0, "row", (SET_ITEM, None, 0, "b"))
    assert rec.log[2][:3] == (TARGET, 0, "row")
    assert all(s is r for s, r in zip(kernel["sel"], kernel["rows"]))


# ------------------------------------------------------------------ drawn keys and values

#: the same examples every run (no database), as test_dependence_property's default;
#: 40 each keep the module within seconds of the fast loop (make test-fast)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)

keys = st.one_of(
    st.integers(-5, 5),
    st.text(max_size=3),
    st.tuples(st.integers(0, 2), st.booleans()),
    st.none(),
)
values = st.one_of(
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=3),
    st.none(),
)
names = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n)
)


@SETTINGS
@given(pairs=st.lists(st.tuples(keys, values), max_size=8))
def test_set_item_drawn(pairs):
    """``out[k] = v``: one SET_ITEM per iteration, with the evaluated key and
    value; repeated keys overwrite in order, dict order as serial."""
    ns = {"pairs": pairs, "out": {}}
    check(
        "for k, v in pairs:\n    out[k] = v",
        ns,
        [(SET_ITEM, "out", v, k) for k, v in pairs],
    )


@SETTINGS
@given(name=names, vals=st.lists(values, min_size=1, max_size=5))
def test_set_attr_drawn(name, vals):
    """``obj.<name> = v``: SET_ATTR with the attribute's name; the last value wins."""
    check(
        f"for v in vals:\n    obj.{name} = v",
        {"vals": vals, "obj": Box()},
        [(SET_ATTR, "obj", v, name) for v in vals],
    )


@SETTINGS
@given(
    method=st.sampled_from(["append", "insert0", "extend", "remove"]),
    ys=st.lists(st.integers(-3, 3), max_size=6),
)
def test_list_methods_drawn(method, ys):
    """``out.<method>(y)``: CALL entries, replayed in iteration order (``remove``
    of a value an earlier iteration put there included)."""
    start = list(ys)  # remove() finds every value it is given
    stmt = {
        "append": "out.append(y)",
        "insert0": "out.insert(0, y)",
        "extend": "out.extend([y, -y])",
        "remove": "out.remove(y)",
    }[method]
    args = {
        "append": lambda y: (y,),
        "insert0": lambda y: (0, y),
        "extend": lambda y: ([y, -y],),
        "remove": lambda y: (y,),
    }[method]
    name = "insert" if method == "insert0" else method
    check(
        f"for y in ys:\n    {stmt}",
        {"ys": ys, "out": start},
        [(CALL, "out", name, args(y), None) for y in ys],
    )


@SETTINGS
@given(
    op=st.sampled_from(["+=", "-=", "*=", "|=", "^=", "&="]),
    start=st.integers(-50, 50),
    ys=st.lists(st.integers(-50, 50), max_size=8),
)
def test_int_reductions_drawn(op, start, ys):
    """``total <op> y``: REDUCE entries, applied by the same operator in order."""
    check(
        f"for y in ys:\n    total {op} y",
        {"ys": ys, "total": start},
        [(REDUCE, "total", op, y) for y in ys],
    )


@SETTINGS
@given(ys=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=10))
def test_float_sum_is_bit_identical(ys):
    """Floating-point addition is not associative: replayed in iteration
    order, the sum is bit for bit the serial one."""
    check("for y in ys:\n    acc += y * 0.1", {"ys": ys, "acc": 0.0})


@SETTINGS
@given(cells=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3), values), max_size=8))
def test_nested_set_item_drawn(cells):
    """``d[k][j] = v``: PATH entries whose step ``d[k]`` is looked up at
    replay, on the kernel's object."""
    ns = {"cells": cells, "d": {k: {} for k in "abc"}}
    check(
        "for k, j, v in cells:\n    d[k][j] = v",
        ns,
        [(PATH, "d", ((STEP_ITEM, k),), (FINAL_SET_ITEM, j, v)) for k, j, v in cells],
    )


@SETTINGS
@given(d=st.dictionaries(keys, values, max_size=8), data=st.data())
def test_del_item_drawn(d, data):
    """``del d[k]`` of some of the keys, in a drawn order."""
    gone = data.draw(st.permutations(list(d)).map(lambda ks: ks[: len(ks) // 2 + 1]))
    check(
        "for k in gone:\n    del d[k]",
        {"gone": gone, "d": d},
        [(PATH, "d", (), (FINAL_DEL_ITEM, k)) for k in gone],
    )
