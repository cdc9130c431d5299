"""The run-time dependence test (docs/design.md §3): how often iterations run, what
is recorded, and what ``parloop.last_run`` and ``explain`` say."""

from __future__ import annotations

import pytest

import parloop
from helpers import differential, reset, run_cell

MAGICS = [
    "%%threaded threads=3 chunksize=2 progress=off",
    "%%parallel processes=2 chunksize=2 progress=off",
]
#: MAGICS as a parametrisation: the %%parallel runs start the managed cluster
BOTH = [MAGICS[0], pytest.param(MAGICS[1], marks=pytest.mark.cluster)]

COUNTED = """
import threading
runs = threading.Semaphore(0)    # a counter parloop does not take for state
def f(i, v):
    runs.release()
    return v * 1.5 + 1
x = [1.0] + [0.0] * 40
"""


def _serial_x() -> list[float]:
    out = [1.0]
    for _ in range(40):
        out.append(out[-1] * 1.5 + 1)
    return out


def test_fully_dependent_loop_runs_each_iteration_at_most_twice_threads(ip):
    """``x[i + 1] = f(x[i])``: every iteration conflicts; speculation stops
    early and the rest runs serially in the kernel, so the iterations run
    about once each, never more than twice in all."""
    reset(ip)
    run_cell(ip, COUNTED)
    _, err = run_cell(ip, MAGICS[0] + "\nfor i in range(40):\n    x[i + 1] = f(i, x[i])\n")
    assert err is None, err
    rec = parloop.last_run
    assert rec.serial_from is not None, rec.notes
    assert ip.user_ns["runs"]._value <= 2 * 40
    assert ip.user_ns["x"] == _serial_x()
    assert any("ran in the kernel" in n for n in rec.notes), rec.notes


@pytest.mark.cluster
def test_fully_dependent_loop_on_engines(ip):
    """The same on engines: what the workers ran (their chunk records) and
    what the kernel re-ran add up to at most about twice the loop."""
    reset(ip)
    run_cell(ip, "def f(i, v):\n    return v * 1.5 + 1\nx = [1.0] + [0.0] * 40")
    _, err = run_cell(ip, MAGICS[1] + "\nfor i in range(40):\n    x[i + 1] = f(i, x[i])\n")
    assert err is None, err
    rec = parloop.last_run
    assert rec.serial_from is not None, rec.notes
    ran = sum(c.count for c in rec.chunks)
    assert ran <= 2 * 40 + 8, [(c.start, c.count, c.worker) for c in rec.chunks]
    assert ip.user_ns["x"] == _serial_x()


@pytest.mark.parametrize("magic", BOTH)
def test_no_shared_objects_no_reads_recorded(ip, magic):
    reset(ip)
    run_cell(ip, "out = {}\nsrc = list(range(30))")
    _, err = run_cell(ip, magic + "\nfor i in src:\n    out[i] = src[i] * 2\n")
    assert err is None, err
    assert parloop.last_run.reads == 0
    assert parloop.last_run.reruns == []


@pytest.mark.parametrize("magic", BOTH)
def test_memo_fill_reruns_only_repeats(ip, magic):
    """A memo table with repeated keys: only iterations that read a key an
    earlier one of the same run wrote are re-run."""
    reset(ip)
    run_cell(ip, "keys = [k for k in range(20)] + [3, 7]\ncache = {}\nres = {}")
    _, err = run_cell(
        ip,
        magic
        + """
for i, k in enumerate(keys):
    if k not in cache:
        cache[k] = k * k
    res[i] = cache[k]
""",
    )
    assert err is None, err
    rec = parloop.last_run
    assert rec.reads > 0
    assert set(rec.reruns) <= {20, 21}, rec.reruns
    assert ip.user_ns["res"] == {i: k * k for i, k in enumerate(ip.user_ns["keys"])}


CASES = [
    (
        "break_in_nested_if",
        "items = list(range(50))\nout = {}",
        """
for i in items:
    out[i] = i * 2
    if i * i > 300:
        hit = i
        break
else:
    hit = None
""",
        ["out", "hit", "i"],
    ),
    (
        "break_never",
        "out = []",
        """
for i in range(12):
    if i > 100:
        break
    out.append(i)
else:
    done = True
""",
        ["out", "done", "i"],
    ),
    (
        "own_write_then_read",
        "out = {}",
        """
for k in range(10):
    out[k] = [k]
    out[k].append(len(out[k]))
    print(k, out[k])
""",
        ["out", "k"],
    ),
    (
        "counter_in_list",
        "counts = [0] * 5\nlog = []",
        """
for i in range(30):
    counts[i % 5] = counts[i % 5] + i
    log.append(counts[i % 5])
""",
        ["counts", "log"],
    ),
    (
        "argmin_ties",
        "vals = [5, 3, 3, 8, 1, 1, 9]\nbest = 99\nat = None",
        """
for j, v in enumerate(vals):
    if v <= best:
        best = v
        at = j
""",
        ["best", "at"],
    ),
    (
        "str_rebind_right",
        "s = ''",
        """
for ch in 'abcdef':
    s = ch + s
""",
        ["s"],
    ),
    (
        "conditional_private_first_unbound",
        "",
        """
for i in range(8):
    if i % 3 == 1:
        last = i
    if i > 1:
        seen = last
""",
        ["last", "seen"],
    ),
    (
        "numpy_row_recurrence",
        "import numpy as np\nA = np.ones((12, 3))",
        """
for i in range(1, 12):
    A[i] = A[i - 1] * 2 + i
""",
        ["A"],
    ),
    (
        "negative_index_reads_the_grown_end",
        "out = [0, 1]",
        """
for i in range(10):
    out[i % 2] = out[-1] + out[-2] + i
""",
        ["out"],
    ),
    (
        "defaultdict_read_inserts",
        "from collections import defaultdict\nd = defaultdict(list)\nsizes = {}",
        """
for w in 'abcab':
    sizes[w] = len(d[w])
    d[w].append(1)
""",
        ["d", "sizes"],
    ),
    (
        "get_or_default_chain",
        "first = {}\nlast = {}",
        """
for i, w in enumerate('the cat the hat a cat'.split()):
    first[w] = first.get(w, i)
    last[w] = i
""",
        ["first", "last"],
    ),
    (
        "attribute_counter",
        "class Box:\n    pass\nb = Box()\nb.n = 0\nb.tag = 'x'\nout = {}",
        """
for i in range(9):
    out[i] = b.tag + str(b.n)
    b.n = b.n + i
""",
        ["out", "b.n", "b.tag"],
    ),
    (
        "numpy_1d_prange_recurrence",
        "import numpy as np\na = np.arange(20.0)",
        """
for i in range(1, 20):
    a[i] = a[i - 1] + i
""",
        ["a"],
    ),
    (
        "index_by_first_seen_len",
        "index = {}",
        """
for w in 'the cat the dog a cat the end'.split():
    if w not in index:
        index[w] = len(index)
""",
        ["index"],
    ),
    (
        "counter_subscript_aug",
        "from collections import Counter\nc = Counter()\nseen_at = {}",
        """
for i, w in enumerate('a b a c b a d'.split()):
    c[w] += 1
    seen_at[i] = c[w]
""",
        ["c", "seen_at"],
    ),
    (
        "results_until_enough",
        "results = []",
        """
for x in range(30):
    results.append(x * x)
    if len(results) > 5:
        break
""",
        ["results", "x"],
    ),
    (
        "comprehension_reads_shared",
        "d = {k: k for k in range(5)}",
        """
for i in range(5, 12):
    d[i] = sum(d[k] for k in range(i - 3, i))
""",
        ["d"],
    ),
    (
        "lambda_reads_shared",
        "d = {0: 1}",
        """
for i in range(1, 8):
    get = lambda k: d[k]
    d[i] = get(i - 1) * 2
""",
        ["d"],
    ),
    (
        "attr_aug_then_read",
        "class O:\n    pass\no = O()\no.count = 0\nlog = []",
        """
for i in range(6):
    o.count += i
    log.append(o.count)
""",
        ["log", "o.count"],
    ),
    (
        "del_key_then_membership",
        "d = {k: k for k in range(10)}\nhits = []",
        """
for k in [1, 3, 1, 5, 3, 7]:
    if k in d:
        hits.append(k)
        del d[k]
""",
        ["d", "hits"],
    ),
    (
        "set_membership_and_add",
        "seen = set()\nkept = []",
        """
for k in [1, 2, 1, 3, 2, 4, 1, 5]:
    if k not in seen:
        seen.add(k)
        kept.append(k)
""",
        ["seen", "kept"],
    ),
]


@pytest.mark.parametrize("magic", BOTH)
@pytest.mark.parametrize("name,setup,cell,checks", CASES, ids=[c[0] for c in CASES])
def test_dependent_loops_equal_serial(ip, magic, name, setup, cell, checks):
    differential(ip, setup, cell, magic, checks)


@pytest.mark.parametrize("magic", BOTH)
def test_collected_errors_with_dependences(ip, magic):
    """on_error=collect: an iteration that fails on its own (not because of a
    conflict) is collected; the others commit in order."""
    reset(ip)
    run_cell(ip, "acc = {0: 1}")
    _, err = run_cell(
        ip,
        magic.replace("progress=off", "progress=off on_error=collect")
        + """
for i in range(1, 10):
    if i == 4:
        raise ValueError(i)
    acc[i] = acc[i - 1] * 2 if i != 5 else 7
""",
    )
    assert err is None, err
    assert [e.index for e in parloop.last_run.errors] == [3]  # i == 4
    expected = {0: 1}
    for i in range(1, 10):
        if i == 4:
            continue
        expected[i] = expected[i - 1] * 2 if i != 5 else 7
    assert ip.user_ns["acc"] == expected


def test_explain_names_shared_objects(ip):
    reset(ip)
    run_cell(ip, "x = [1.0] * 5")
    out, err = run_cell(ip, "%%threaded explain\nfor i in range(4):\n    x[i + 1] = x[i] * 2\n")
    assert err is None, err
    assert "shared" in out and "re-run in the kernel" in out


def test_conflict_note_suggests_private(ip):
    reset(ip)
    run_cell(
        ip,
        """
class M:
    def __init__(self):
        self.w = 0
    def fit(self, xs):
        self.w = sum(xs)
    def predict(self, x):
        return self.w * x
model = M()
preds = {}
""",
    )
    _, err = run_cell(
        ip,
        "%%threaded chunksize=1 progress=off\nfor f in range(6):\n"
        "    model.fit([f, f])\n    preds[f] = model.predict(2)\n",
    )
    assert err is None, err
    assert ip.user_ns["preds"] == {f: 4 * f for f in range(6)}
    assert any("private=model" in n for n in parloop.last_run.notes), parloop.last_run.notes


@pytest.mark.parametrize("magic", BOTH)
def test_same_key_objects_record_no_reads(ip, magic):
    """``acc[k] = acc[k] * 2 + v``: every access at the one key expression;
    no reads are recorded, only a repeated key conflicts."""
    setup = "pairs = [(n % 7, n) for n in range(40)]\nacc = {k: 1 for k in range(7)}"
    cell = "for k, v in pairs:\n    acc[k] = acc[k] * 2 + v\n"
    differential(ip, setup, cell, magic, ["acc", "k", "v"])
    rec = parloop.last_run
    assert rec.reads == 0
    assert rec.reruns, "repeated keys must conflict"
    differential(
        ip,
        "pairs = [(n, n) for n in range(40)]\nacc = {k: 1 for k in range(40)}",
        cell,
        magic,
        ["acc"],
    )
    assert parloop.last_run.reruns == [] and parloop.last_run.reads == 0


def test_setattr_and_getattr_of_constant_names_are_attribute_writes_and_reads(ip):
    """``setattr(o, "x", v)`` / ``getattr(o, "x")`` mean ``o.x = v`` / ``o.x``:
    the dependence test sees them (before, ``o`` was only an object handed to
    code, and under threads a first iteration that wrote the value already
    there hid the writes: a wrong answer depending on timing)."""
    import ast

    import parloop
    from parloop.analysis.desugar import desugar

    tree = desugar(ast.parse('setattr(o, "x", 1)\ny = getattr(o, "x")\nz = getattr(o, "x", 0)'), {})
    assert ast.unparse(tree) == "o.x = 1\ny = o.x\nz = getattr(o, 'x', 0)"
    # a cell (or notebook) with its own setattr is left alone
    kept = 'setattr = print\nsetattr(o, "x", 1)'
    assert ast.unparse(desugar(ast.parse(kept), {})) == "setattr = print\nsetattr(o, 'x', 1)"
    assert "setattr(o" in ast.unparse(desugar(ast.parse('setattr(o, "x", 1)'), {"setattr": 1}))

    reset(ip)
    run_cell(ip, "class O:\n    pass\no = O()")
    for _ in range(10):
        run_cell(ip, "o.x = 0\nseen = {}")
        _, err = run_cell(
            ip,
            "%%threaded threads=3 chunksize=2 progress=off\nfor i in range(6):\n"
            '    seen[i] = getattr(o, "x")\n    setattr(o, "x", i * 2)\n',
        )
        assert err is None
        assert ip.user_ns["seen"] == {0: 0, 1: 0, 2: 2, 3: 4, 4: 6, 5: 8}
    assert parloop.last_run.roles["o"] == "shared"
