"""Loops whose serial meaning depends on changes the loop itself makes to
what it iterates over, or to names a notebook function reads: serial Python
sees those changes as it goes; parloop's iterations would not.  Each must end
with the serial answer or a ``LoopAnalysisError`` naming the line and the
name, with nothing run (docs/design.md §3).  Found by differential cases
from notebooks: they used to give other answers silently.

The property test builds loops over a list and a dict whose bodies write to
what they iterate in every supported way, and checks "serial answer, or
rejected with the namespace untouched" under both magics; the table checks
the exact decision for the forms that must stay accepted."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parloop
from helpers import deep_diff, differential, materialize, reset, run_cell, snapshot

THREADED = "%%threaded threads=3 chunksize=2 progress=off"
PARALLEL = "%%parallel processes=2 chunksize=2 progress=off"
BOTH = [THREADED, pytest.param(PARALLEL, marks=pytest.mark.cluster)]


def rejected(ip, setup: str, cell: str, magic: str, checks: list[str]) -> str:
    """Run ``setup``, then ``cell`` under ``magic``: it must raise a
    LoopAnalysisError and leave ``checks`` as they were; returns its message
    (its lines count the magic's line as the cell's first, as in Jupyter)."""
    reset(ip)
    _, err = run_cell(ip, setup)
    assert err is None, err
    before = materialize(snapshot(ip, checks))
    _, err = run_cell(ip, f"{magic}\n{cell}")
    assert isinstance(err, parloop.LoopAnalysisError), f"not rejected: {err!r}"
    after = materialize(snapshot(ip, checks))
    assert deep_diff(before, after) is None, "a rejected cell changed the namespace"
    return str(err)


# ------------------------------------------------------- what they iterate over
REJECTED_ITERATED = {
    "append_to_iterated_list": (
        "items = [1, 2, 3, 4]\nseen = []",
        "for x in items:\n    seen.append(x)\n    if x < 3:\n        items.append(x + 10)\n",
        "items",
        5,
    ),
    "del_from_iterated_dict": (
        "d = {k: k * k for k in range(6)}",
        "for k in d:\n    if k % 2:\n        del d[k]\n",
        "d",
        4,
    ),
    "new_key_in_iterated_dict_items": (
        "d = {1: 1, 2: 2}",
        "for k, v in d.items():\n    d[k + 10] = v\n",
        "d",
        3,
    ),
    "write_ahead_in_enumerated_list": (
        "xs = [1, 2, 3, 4, 5]\nout = []",
        "for i, x in enumerate(xs):\n    out.append(x)\n    if i + 1 < len(xs):\n"
        "        xs[i + 1] = x * 10\n",
        "xs",
        5,
    ),
    "iadd_to_iterated_list": (
        "xs = [1, 2]",
        "for x in xs:\n    if x < 3:\n        xs += [x + 10]\n",
        "xs",
        4,
    ),
    "iterated_through_zip": (
        "xs = [1, 2, 3]\nys = [4, 5, 6]",
        "for a, b in zip(xs, ys):\n    ys.insert(0, a)\n",
        "ys",
        3,
    ),
    "changed_by_a_notebook_function": (
        "xs = [1, 2, 3]\ndef grow(v):\n    xs.append(v)\nout = []",
        "for x in xs:\n    out.append(x)\n    if x < 3:\n        grow(x + 10)\n",
        "xs",
        2,
    ),
}


@pytest.mark.parametrize("magic", BOTH)
@pytest.mark.parametrize("name", list(REJECTED_ITERATED))
def test_a_loop_that_changes_what_it_iterates_is_rejected(ip, magic, name):
    setup, cell, root, line = REJECTED_ITERATED[name]
    names = sorted({n for n in ("items", "seen", "d", "xs", "ys", "out") if f"{n} =" in setup})
    msg = rejected(ip, setup, cell, magic, names)
    assert f"iterates over `{root}`" in msg and msg.startswith(f"line {line}: "), msg


ACCEPTED_ITERATED = {
    "replace_current_in_enumerate": (
        "xs = [1.5, 2.5, 3.5, 4.5, 5.5]",
        "for i, x in enumerate(xs):\n    xs[i] = x * 2\n",
        ["xs"],
    ),
    "replace_current_key_in_dict": (
        "d = {k: k for k in range(7)}",
        "for k in d:\n    d[k] = d[k] * 3\n",
        ["d"],
    ),
    "replace_current_key_in_items": (
        "d = {k: [k] for k in range(7)}",
        "for k, v in d.items():\n    d[k] = v + [0]\n",
        ["d"],
    ),
    "write_inside_the_items": (
        "rows = [{'a': i} for i in range(6)]",
        "for i, r in enumerate(rows):\n    rows[i]['b'] = r['a'] * 2\n",
        ["rows"],
    ),
    "iterate_a_copy": (
        "items = [1, 2, 3, 4]",
        "for x in list(items):\n    items.append(x * 10)\n",
        ["items"],
    ),
    "iterate_a_range_over_it": (
        "xs = [1, 2, 3, 4, 5, 6]",
        "for i in range(len(xs)):\n    xs[i] = xs[i] + 1\n",
        ["xs"],
    ),
}


# ------------------------------------------- names a notebook function reads
REJECTED_READS = {
    "rebound_by_a_reduction": (
        "scale = 1.0\ndef apply(v):\n    return v * scale\nout = {}",
        "for i in range(8):\n    out[i] = apply(i)\n    scale = scale * 2\n",
        "apply",
        "scale",
        3,
    ),
    "assigned_before_the_call": (
        "def shifted(v):\n    return v + offset\noffset = 0\nout = {}",
        "for i in range(8):\n    offset = i * 10\n    out[i] = shifted(i)\n",
        "shifted",
        "offset",
        4,
    ),
    "the_loop_target": (
        "def twice():\n    return 2 * i\ni = -1\nout = {}",
        "for i in range(6):\n    out[i] = twice()\n",
        "twice",
        "i",
        3,
    ),
    "two_calls_deep": (
        "def inner():\n    return k * 3\ndef outer():\n    return inner() + 1\nk = 0\nout = {}",
        "for k in range(6):\n    out[k] = outer()\n",
        "outer",
        "k",
        3,
    ),
    "a_closure": (
        "def make():\n    def f():\n        return level + 1\n    return f\nf = make()\n"
        "level = 0\nout = {}",
        "for j in range(5):\n    level = j\n    out[j] = f()\n",
        "f",
        "level",
        4,
    ),
}


@pytest.mark.parametrize("magic", BOTH)
@pytest.mark.parametrize("name", list(REJECTED_READS))
def test_a_function_reading_a_name_the_body_binds_is_rejected(ip, magic, name):
    setup, cell, fn, g, line = REJECTED_READS[name]
    msg = rejected(ip, setup, cell, magic, ["out"])
    assert f"`{fn}` (called by the loop)" in msg and f"reads the global `{g}`" in msg, msg
    assert msg.startswith(f"line {line}: "), msg


@pytest.mark.parametrize("magic", BOTH)
def test_a_function_reading_an_attribute_of_that_name_is_not_rejected(ip, magic):
    """``obj.scale`` in a function is an attribute, not the global ``scale``
    the body binds: the loop stays parallel."""
    differential(
        ip,
        "class C:\n    scale = 3\nobj = C()\ndef apply(v):\n    return v * obj.scale\nout = {}",
        "for i in range(8):\n    scale = i\n    out[i] = apply(scale)\n",
        magic,
        ["out", "scale"],
    )


# ------------------------------------------------ iterables that produce lazily
REJECTED_LAZY = {
    "generator_reads_what_the_body_appends": (
        "data = [1, 2]\ndef walk():\n    k = 0\n    while k < len(data) and k < 6:\n"
        "        yield data[k]\n        k += 1\nout = []",
        "for v in walk():\n    out.append(v)\n    data.append(v * 10)\n",
        ["data", "out"],
        "reads `data`",
    ),
    "generator_expression_over_changed_values": (
        "w = {k: 1.0 for k in range(5)}\nout = []",
        "for v in (w[k] for k in range(5)):\n    out.append(v)\n    w[len(out) % 5] = v * 2\n",
        ["w", "out"],
        "reads `w`",
    ),
    "iter_with_a_sentinel": (
        "queue = [None, 3, 2]\ndone = []",
        "for job in iter(queue.pop, None):\n    done.append(job)\n    if job > 1:\n"
        "        queue.append(job - 1)\n",
        ["queue", "done"],
        "reads `queue`",
    ),
    "generator_object_made_before": (
        "data = [1, 2, 3]\ndef each(xs):\n    for x in xs:\n        yield x\n"
        "it = each(data)\nout = []",
        "for v in it:\n    out.append(v)\n    if v < 3:\n        data.append(v + 10)\n",
        ["data", "out"],
        "reads `data`",
    ),
    "generator_that_prints": (
        "def produce(n):\n    for k in range(n):\n        print('producing', k)\n"
        "        yield k\nout = {}",
        "for k in produce(6):\n    out[k] = k * k\n",
        ["out"],
        "prints while it produces",
    ),
    "map_with_a_function_that_prints": (
        "def loud(v):\n    print(v)\n    return v\nout = []",
        "for v in map(loud, range(5)):\n    out.append(v)\n",
        ["out"],
        "prints while it produces",
    ),
}


@pytest.mark.parametrize("magic", BOTH)
@pytest.mark.parametrize("name", list(REJECTED_LAZY))
def test_a_lazy_iterable_that_reads_what_the_body_changes_is_rejected(ip, magic, name):
    setup, cell, checks, says = REJECTED_LAZY[name]
    msg = rejected(ip, setup, cell, magic, checks)
    assert msg.startswith("line 2: the loop's iterable") and says in msg, msg


ACCEPTED_LAZY = {
    "map_over_a_list": (
        "def sq(v):\n    return v * v\ndata = list(range(12))\nout = []",
        "for v in map(sq, data):\n    out.append(v + 1)\n",
        ["out"],
    ),
    "generator_expression": (
        "data = list(range(12))\nout = {}",
        "for k, v in ((k, v * 3) for k, v in enumerate(data)):\n    out[k] = v\n",
        ["out"],
    ),
    "generator_of_its_own_state": (
        "def squares(n):\n    for k in range(n):\n        yield k * k\nout = []",
        "for v in squares(10):\n    out.append(v)\n",
        ["out"],
    ),
    "zip_of_untouched_lists": (
        "a = [1, 2, 3, 4]\nb = [5, 6, 7, 8]\nout = []",
        "for x, y in zip(a, b):\n    out.append(x * y)\n",
        ["out"],
    ),
}


@pytest.mark.parametrize("magic", BOTH)
@pytest.mark.parametrize("name", [*ACCEPTED_ITERATED, *ACCEPTED_LAZY])
def test_what_the_loop_sees_unchanged_stays_parallel(ip, magic, name):
    """Replacing the visited item, iterating a copy, a lazy iterable of state
    the body leaves alone: the serial answer, in parallel."""
    setup, cell, checks = {**ACCEPTED_ITERATED, **ACCEPTED_LAZY}[name]
    differential(ip, setup, cell, magic, checks)


# ------------------------------------------------------- one file for all of them
FILE_SETUP = "import os, tempfile\nd = tempfile.mkdtemp()\npath = os.path.join(d, 'log.txt')\n"


@pytest.mark.parametrize("magic", BOTH)
@pytest.mark.parametrize(
    "setup,cell,where",
    [
        (
            "",
            "for i in range(10):\n    with open(path, 'a') as f:\n        f.write(f'{i}\\n')\n",
            "",
        ),
        ("", "for i in range(10):\n    open(path, mode='w').write(str(i))\n", ""),
        (
            "def log(msg):\n    with open(path, 'a') as fh:\n        fh.write(msg)\n",
            "for i in range(10):\n    log(str(i))\n",
            " in `log` (called by the loop)",
        ),
    ],
    ids=["append_in_body", "write_in_body", "append_in_a_function"],
)
def test_iterations_writing_one_file_are_rejected(ip, magic, setup, cell, where):
    """Serial Python writes the file in iteration order; parallel iterations
    would append in the order they run (seen: lines 0 1 2 3 6 7 4 5...)."""
    msg = rejected(ip, FILE_SETUP + setup, cell, magic, ["path"])
    assert f"{where} writes the same file in every iteration" in msg, msg


@pytest.mark.parametrize("magic", BOTH)
def test_a_file_written_on_some_paths_only_stays_parallel(ip, magic):
    """One iteration writes a fixed file (a checkpoint, a pid file): nothing
    says several do, so the loop is not rejected."""
    differential(
        ip,
        FILE_SETUP,
        "for i in range(10):\n    if i == 6:\n        with open(path, 'w') as f:\n"
        "            f.write(str(i))\ntext = open(path).read()\n",
        magic,
        ["text"],
    )


@pytest.mark.parametrize("magic", BOTH)
def test_a_file_per_iteration_stays_parallel(ip, magic):
    differential(
        ip,
        FILE_SETUP + "def save(k, text):\n    with open(os.path.join(d, f'{k}.txt'), 'w') as fh:\n"
        "        fh.write(text)\n",
        "for i in range(10):\n    with open(os.path.join(d, f'out_{i}.txt'), 'w') as f:\n"
        "        f.write(str(i * i))\n    save(i, str(i))\n"
        "texts = [open(os.path.join(d, f'out_{i}.txt')).read() for i in range(10)]\n",
        magic,
        ["texts"],
    )


# ------------------------------------------------------------------ property
EXAMPLES = int(os.environ.get("PARLOOP_PROPERTY_EXAMPLES", "25"))

#: statements of a body over ``xs`` (a list, target ``x``, index ``i``) or
#: ``d`` (a dict, key ``k``): writes to what the loop iterates in every form,
#: and writes elsewhere
LIST_STATEMENTS = [
    "out.append(x)",
    "xs[i] = x + 1",
    "xs[(i + 1) % len(xs)] = x * 2",
    "if len(xs) < 9:\n        xs.append(x)",
    "if xs:\n        xs.pop()",
    "xs[i] += 1",
    "out.append(len(xs))",
    "if i == 2:\n        xs.insert(0, -1)",
]
DICT_STATEMENTS = [
    "out.append(k)",
    "d[k] = v + 1",
    "d[k] += 2",
    "if k == 1:\n        d[k + 100] = 0",
    "if k == 2 and k in d:\n        del d[k]",
    "out.append(len(d))",
]


@st.composite
def loops(draw):
    if draw(st.booleans()):
        body = draw(st.lists(st.sampled_from(LIST_STATEMENTS), min_size=1, max_size=3))
        header = "for i, x in enumerate(xs):"
        setup = "xs = [3, 1, 4, 1, 5, 9]\nout = []"
    else:
        body = draw(st.lists(st.sampled_from(DICT_STATEMENTS), min_size=1, max_size=3))
        header = draw(st.sampled_from(["for k, v in d.items():", "for k in d:\n    v = d[k]"]))
        setup = "d = {0: 10, 1: 11, 2: 12, 3: 13}\nout = []"
    return setup, header + "\n" + "".join(f"    {s}\n" for s in body)


def serial_or_rejected(ip, magic: str, setup: str, cell: str) -> None:
    names = ["out", "xs" if "xs" in setup else "d"]
    reset(ip)
    run_cell(ip, setup)
    before = materialize(snapshot(ip, names))
    _, s_err = run_cell(ip, cell)
    serial = materialize(snapshot(ip, names))
    reset(ip)
    run_cell(ip, setup)
    _, m_err = run_cell(ip, f"{magic}\n{cell}")
    magic_state = materialize(snapshot(ip, names))
    if isinstance(m_err, parloop.LoopAnalysisError):
        assert deep_diff(before, magic_state) is None, "a rejected cell changed the namespace"
        return
    assert type(m_err) is type(s_err), f"serial raised {s_err!r}, the magic {m_err!r}"
    assert deep_diff(serial, magic_state) is None, deep_diff(serial, magic_state)


_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 25,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_SETTINGS
@given(case=loops())
def test_changing_what_is_iterated_threaded_is_serial_or_rejected(ip, case):
    serial_or_rejected(ip, THREADED, *case)


@pytest.mark.cluster
@_SETTINGS
@given(case=loops())
def test_changing_what_is_iterated_parallel_is_serial_or_rejected(ip, cluster, case):
    serial_or_rejected(ip, PARALLEL, *case)
