"""Hidden state that the first iteration does not show (docs/design.md §3).

Threads share the kernel's objects.  parloop runs the first iteration in the
kernel with the watched objects fingerprinted around it; an iteration after
it may still change one behind the log's back -- on a branch the first did
not take, or by writing a value that was already there.  Every chunk
compares the watched objects with the baseline at its end; on a change the
kernel stops the threads, puts the objects back and runs serially from the
first chunk that saw it.  Each case: the serial answer, bit for bit (these
gave other answers before: ``x`` pushed in another order, a generator drawn
from out of order, the last writer being another thread)."""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parloop
from helpers import differential
from parloop.fingerprint import fingerprint, restorable, restore, watch

MAGICS = [
    "%%threaded threads=2 progress=off",
    "%%threaded threads=4 chunksize=2 progress=off",
]

CASES = [
    (
        "last_writer_on_a_branch",
        "import operator, time\nd = {'last': None}\nout = {}",
        "for i in range(40):\n    time.sleep(0.005)\n    if i % 7 == 3:\n"
        "        operator.setitem(d, 'last', i)\n    out[i] = d['last']\n",
        ["d", "out"],
    ),
    (
        "heap_pushes_on_a_branch",
        "import heapq, time\nh = []",
        "for x in [5, 1, 8, 3, 9, 2, 7, 4] * 6:\n    time.sleep(0.003)\n    if x > 6:\n"
        "        heapq.heappush(h, x * 10 + len(h))\n",
        ["h"],
    ),
    (
        "generator_drawn_from_the_third_iteration",
        "import time, random\nrng = random.Random(4)\nout = {}",
        "for i in range(30):\n    time.sleep(0.003)\n    out[i] = rng.random() if i > 2 else 0.0\n",
        ["out"],
    ),
    (
        "first_iteration_writes_the_value_already_there",
        "import operator, time\nd = {'v': 0}\nout = {}",
        "for i in range(24):\n    time.sleep(0.003)\n    out[i] = d['v']\n"
        "    operator.setitem(d, 'v', i)\n",
        ["out", "d"],
    ),
    (
        "numpy_array_changed_by_a_ufunc_later",
        "import numpy as np, time\nacc = np.zeros(4)\nout = {}",
        "for i in range(20):\n    time.sleep(0.003)\n    if i >= 5:\n"
        "        np.add.at(acc, [i % 4], 1.0)\n    out[i] = float(acc.sum())\n",
        ["out", "acc.tolist()"],
    ),
]


@pytest.mark.parametrize("magic", MAGICS)
@pytest.mark.parametrize("name,setup,cell,checks", CASES, ids=[c[0] for c in CASES])
def test_a_later_iterations_hidden_write_gives_the_serial_answer(
    ip, magic, name, setup, cell, checks
):
    differential(ip, setup, cell, magic, checks)
    assert parloop.last_run.hidden, "the change was not noticed"


def test_objects_it_cannot_put_back_keep_the_loop_serial(ip):
    """A watched object whose state parloop could not restore (no ``__dict__``,
    not a container it knows) is not left to the threads at all."""
    differential(
        ip,
        "import array, time\nbuf = array.array('d', [0.0] * 4)\nout = {}",
        "for i in range(12):\n    time.sleep(0.002)\n    out[i] = buf.tolist()\n",
        "%%threaded threads=2 progress=off",
        ["out"],
    )
    assert parloop.last_run.hidden and "cannot be put back" in parloop.last_run.hidden
    assert parloop.last_run.serial_from == 0


def test_loops_that_change_nothing_keep_their_threads(ip):
    differential(
        ip,
        "import time\nclass Model:\n    def __init__(self):\n        self.w = 2.0\n"
        "    def predict(self, x):\n        return self.w * x\nm = Model()\nout = {}",
        "for i in range(40):\n    time.sleep(0.003)\n    out[i] = m.predict(i)\n",
        "%%threaded threads=2 progress=off",
        ["out"],
    )
    assert not parloop.last_run.hidden
    assert parloop.last_run.serial_from is None


# ---------------------------------------------------------------------------
# restore: the state comes back, in place
# ---------------------------------------------------------------------------
class Plain:
    def __init__(self) -> None:
        self.items = [1, 2]
        self.n = 3


class Slotted:
    __slots__ = ("x", "y")

    def __init__(self) -> None:
        self.x, self.y = 1, [2]


def _mutations():
    return [
        ({"a": 1}, lambda o: o.update(z=9)),
        ([1, 2], lambda o: o.append(9)),
        ({1, 2}, lambda o: o.add(9)),
        (collections.deque([1]), lambda o: o.appendleft(0)),
        (bytearray(b"ab"), lambda o: o.extend(b"cd")),
        (np.arange(6.0), lambda o: o.__setitem__(2, 99.0)),
        (random.Random(3), lambda o: o.random()),
        (np.random.default_rng(1), lambda o: o.random()),
        (Plain(), lambda o: (o.items.append(7), setattr(o, "extra", 1))),
        (Slotted(), lambda o: (setattr(o, "x", 5), o.y.append(3))),
    ]


@pytest.mark.parametrize(
    "obj,mutate", _mutations(), ids=[type(o).__name__ for o, _ in _mutations()]
)
def test_restore_puts_the_state_back_in_place(obj, mutate):
    w = watch("`x`", obj, keep=True)
    assert restorable(w)
    before = id(obj)
    mutate(obj)
    assert fingerprint(obj) != w.print
    assert restore(w)
    assert id(obj) == before and fingerprint(obj) == w.print


def test_a_slotted_instances_fingerprint_does_not_drift():
    """Pickling an instance caches ``__slotnames__`` on its class; the digest
    of the same state must not change with it (it did: a false "hidden
    state", the loop serial for nothing)."""
    import cloudpickle

    class Fresh:  # a class no instance of which was pickled yet
        __slots__ = ("x",)

        def __init__(self) -> None:
            self.x = 1

    Fresh.__module__ = "__main__"  # as a notebook class is (its state is fingerprinted)
    obj = Fresh()
    before = fingerprint(obj)
    cloudpickle.dumps(obj)
    assert fingerprint(obj) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.dictionaries(st.text(max_size=3), st.integers() | st.lists(st.integers(), max_size=3)),
    edits=st.lists(
        st.tuples(st.text(max_size=3), st.integers() | st.none()), min_size=1, max_size=6
    ),
)
def test_restore_any_edits_of_a_dict(start, edits):
    """Property: whatever a run does to a dict (sets, deletes, nested lists
    grown), restore brings back an equal dict, as the same object."""
    d = {k: (list(v) if isinstance(v, list) else v) for k, v in start.items()}
    w = watch("`d`", d, keep=True)
    for k, v in edits:
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
            for val in d.values():
                if isinstance(val, list):
                    val.append(v)
    assert restore(w)
    assert d == start and fingerprint(d) == w.print


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    branch=st.lists(st.booleans(), min_size=6, max_size=24),
    threads=st.sampled_from([2, 3, 4]),
)
def test_property_hidden_writes_on_random_branches(ip, branch, threads):
    """Property: a library call that changes a watched list on the
    iterations a random pattern picks (the first iteration may or may not)
    gives the serial answer under threads."""
    setup = f"import time, bisect\nlog = []\nbranch = {branch!r}\nout = {{}}"
    cell = (
        f"for i in range({len(branch)}):\n    time.sleep(0.001)\n    if branch[i]:\n"
        "        bisect.insort(log, (len(log), i))\n    out[i] = len(log)\n"
    )
    differential(
        ip, setup, cell, f"%%threaded threads={threads} chunksize=1 progress=off", ["log", "out"]
    )


@pytest.mark.parametrize("end", ["break", "raise"])
def test_iterations_after_a_break_or_failure_leave_no_hidden_change(ip, end):
    """Chunks after a ``break`` (or a failed iteration) ran on while it was
    committed, and changed a watched object behind the log's back: the
    kernel puts it back, as serial execution never ran them (the check before
    the chunk's commit sees the change here; the one after the run catches
    a change made between that check and the threads' stop)."""
    setup = "import operator, time\nclass Stop(Exception):\n    pass\nd = {'k': 0}\nout = {}"
    stop = "break" if end == "break" else "raise Stop(i)"
    cell = (
        "for i in range(60):\n    time.sleep(0.003)\n    if i > 20:\n"
        "        operator.setitem(d, 'k', i)\n    out[i] = i\n"
        f"    if i == 20:\n        {stop}\n"
    )
    if end == "break":
        differential(ip, setup, cell, "%%threaded threads=2 progress=off", ["d", "out"])
        return
    from helpers import reset, run_cell

    reset(ip)
    run_cell(ip, setup)
    _, err = run_cell(ip, "%%threaded threads=2 progress=off\n" + cell)
    assert type(err).__name__ == "Stop"
    assert ip.user_ns["d"] == {"k": 0}
    assert ip.user_ns["out"] == {i: i for i in range(21)}
