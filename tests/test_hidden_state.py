"""State the cell's text does not show (docs/design.md §3): notebook functions that
write globals, method calls that change their object, arguments changed by
the code they are handed to, aliases, loop-target DataFrames, stored inputs,
submodules, pyplot.  Each case: the serial answer under both magics (run
serially in the kernel where parloop cannot do better), never a silent
difference; ``explain`` says what it found."""

from __future__ import annotations

import ast

import pytest

import parloop
from helpers import differential, reset, run_cell

MAGICS = [
    "%%threaded threads=3 chunksize=2 progress=off",
    "%%parallel processes=2 chunksize=2 progress=off",
]
#: MAGICS as a parametrisation: the %%parallel runs start the managed cluster
BOTH = [MAGICS[0], pytest.param(MAGICS[1], marks=pytest.mark.cluster)]

CASES = [
    (
        "helpers_two_calls_deep",
        """
SEEN = {}
def deeper(x):
    SEEN[x] = x * x
def record(x):
    deeper(x)
    return x + 1
out = {}
""",
        """
for i in range(10):
    out[i] = record(i)
""",
        ["out", "SEEN"],
    ),
    (
        "class_attribute_memo",
        """
class Memo:
    cache = {}
    def get(self, k):
        if k not in Memo.cache:
            Memo.cache[k] = k * 3
        return Memo.cache[k]
m = Memo()
res = {}
""",
        """
for i in range(12):
    res[i] = m.get(i % 5)
""",
        ["res", "Memo.cache"],
    ),
    (
        "torch_shaped_trainer",
        """
class Param:
    def __init__(self, v):
        self.v = v
        self.grad = 0.0
class Loss:
    def __init__(self, model, x):
        self.model, self.x = model, x
    def backward(self):
        self.model.w.grad = 2 * (self.model.w.v * self.x - 1) * self.x
    def item(self):
        return round((self.model.w.v * self.x - 1) ** 2, 12)
class Model:
    def __init__(self):
        self.w = Param(0.1)
    def __call__(self, x):
        return Loss(self, x)
class SGD:
    def __init__(self, p, lr):
        self.p, self.lr = p, lr
    def step(self):
        self.p.v -= self.lr * self.p.grad
model = Model()
opt = SGD(model.w, 0.05)
losses = {}
""",
        """
for epoch in range(10):
    loss = model(1.5)
    loss.backward()
    opt.step()
    losses[epoch] = loss.item()
""",
        ["losses", "model.w.v"],
    ),
    (
        "pandas_inplace_on_input",
        """
import numpy as np
import pandas as pd
frames = [pd.DataFrame({"a": [1.0, np.nan, 3.0]}) for _ in range(4)]
sums = {}
""",
        """
for i, f in enumerate(frames):
    f.fillna(i, inplace=True)
    sums[i] = float(f["a"].sum())
""",
        ["sums", "frames"],
    ),
    (
        "rng_object_without_seed",
        """
import numpy as np
rng = np.random.default_rng(3)
draws = {}
""",
        """
for i in range(10):
    draws[i] = float(rng.normal())
""",
        ["draws"],
    ),
    (
        "setattr_then_read",
        """
class O:
    pass
o = O()
o.x = 0
seen = {}
""",
        """
for i in range(6):
    seen[i] = o.x
    setattr(o, "x", i * 2)
""",
        ["seen", "o.x"],
    ),
    (
        "heapq_push",
        """
import heapq
h = []
tops = {}
""",
        """
for i in [5, 3, 8, 1, 9, 2]:
    heapq.heappush(h, i)
    tops[i] = h[0]
""",
        ["h", "tops"],
    ),
    (
        "shared_list_iterator",
        """
it = iter([10, 20, 30, 40, 50, 60, 70])
out = {}
""",
        """
for i in range(6):
    out[i] = next(it) + i
""",
        ["out"],
    ),
    (
        "numpy_copyto_argument",
        """
import numpy as np
buf = np.zeros(4)
snap = {}
""",
        """
for i in range(5):
    np.copyto(buf, buf + i)
    snap[i] = float(buf.sum())
""",
        ["buf", "snap"],
    ),
    (
        "argument_changed_by_library",
        """
import numpy as np
arrs = [np.zeros(3) for _ in range(6)]
def bump(a, v):
    a += v
""",
        """
for i in range(6):
    bump(arrs[i], i)
""",
        ["arrs"],
    ),
    # a notebook function's own state: its calls change it, and a worker's
    # copy of the function changes only its own (these gave other answers
    # under %%parallel until the function's closure, attributes and
    # defaults were fingerprinted)
    (
        "closure_counter",
        """
def make_counter():
    n = 0
    def inc():
        nonlocal n
        n += 1
        return n
    return inc
inc = make_counter()
out = {}
""",
        """
for i in range(8):
    out[i] = inc()
""",
        ["out", "inc()"],
    ),
    (
        "closure_cell_list",
        """
def make_log():
    seen = []
    def log(v):
        seen.append(v)
        return len(seen)
    return log
log = make_log()
out = {}
""",
        """
for i in range(8):
    out[i] = log(i * i)
""",
        ["out"],
    ),
    (
        "function_attribute_counter",
        """
def tick(x):
    tick.calls += 1
    return x * tick.calls
tick.calls = 0
out = {}
""",
        """
for i in range(10):
    out[i] = tick(i)
""",
        ["out", "tick.calls"],
    ),
    (
        "mutable_default_counter",
        """
def nxt(c=[0]):
    c[0] += 1
    return c[0]
out = {}
""",
        """
for i in range(10):
    out[i] = nxt()
""",
        ["out", "nxt()"],
    ),
    # the loop's items changed behind the log's back on engines (each
    # worker has copies): a changed item goes back and the kernel's item
    # takes its state (these were lost before)
    (
        "item_extended_in_place",
        "\nlists = [[i] for i in range(6)]\n",
        "\nfor lst in lists:\n    lst += [lst[0] * 10]\n",
        ["lists"],
    ),
    (
        "array_row_scaled_in_place",
        "\nimport numpy as np\narr = np.arange(12.0).reshape(6, 2)\n",
        "\nfor row in arr:\n    row *= 2\n",
        ["arr"],
    ),
    (
        "item_changed_through_an_alias",
        "\nrows = [[i] for i in range(6)]\n",
        "\nfor row in rows:\n    r = row\n    r.append(len(r))\n",
        ["rows"],
    ),
    (
        "item_handed_to_a_library",
        "\nimport heapq\nlists = [[5, 3, 9, 1], [8, 2, 7], [4, 6, 1, 0], [9, 9, 1], [3, 2, 1], [7, 5, 3]]\n",
        "\nfor lst in lists:\n    heapq.heapify(lst)\n",
        ["lists"],
    ),
    (
        "item_handed_to_a_notebook_function",
        "\ndef bump(r):\n    r['n'] = r['n'] * 3\nrecs = [{'n': i} for i in range(6)]\n",
        "\nfor rec in recs:\n    bump(rec)\n",
        ["recs"],
    ),
    (
        "items_only_read_by_a_function",
        "\ndef total(r):\n    return sum(r)\nrows = [[i, i + 1] for i in range(8)]\nout = {}\n",
        "\nfor i, row in enumerate(rows):\n    out[i] = total(row)\n",
        ["rows", "out"],
    ),
    (
        "item_inside_a_tuple_handed_to_a_library",
        "\nimport heapq\npairs = [(k, [5 - k, 9, k, 1]) for k in range(6)]\n",
        "\nfor p in pairs:\n    heapq.heapify(p[1])\n",
        ["pairs"],
    ),
    (
        "item_name_rebound_after_handing_it_on",
        "\nlists = [[3, 1, 2], [9, 7, 8], [6, 5, 4], [2, 0, 1]]\nout = []\n",
        "\nfor x in lists:\n    x = sorted(x)\n    out.append(x[0])\n",
        ["lists", "out", "x"],
    ),
]


@pytest.mark.parametrize("magic", BOTH)
@pytest.mark.parametrize("name,setup,cell,checks", CASES, ids=[c[0] for c in CASES])
def test_hidden_state_equals_serial(ip, magic, name, setup, cell, checks):
    differential(ip, setup, cell, magic, checks)


@pytest.mark.parametrize("magic", BOTH)
def test_hidden_state_note_names_object(ip, magic):
    reset(ip)
    run_cell(
        ip,
        "class C:\n    def __init__(self):\n        self.n = 0\n"
        "    def bump(self):\n        self.n += 1\n        return self.n\n"
        "c = C()\nout = {}",
    )
    _, err = run_cell(ip, magic + "\nfor i in range(6):\n    out[i] = c.bump()\n")
    assert err is None, err
    assert ip.user_ns["out"] == {i: i + 1 for i in range(6)}
    notes = " ".join(parloop.last_run.notes)
    assert "`c`" in notes and "serially" in notes, notes


@pytest.mark.parametrize("magic", BOTH)
def test_notebook_function_writes_are_replayed_in_parallel(ip, magic):
    """A notebook function that writes notebook globals runs as a copy whose
    writes are logged: the loop stays parallel, nothing re-runs, the globals
    end as serially (insertion order included)."""
    setup = (
        "SEEN = {}\nLOG = []\nTOTAL = 0\ndef note(x):\n    LOG.append(x)\n"
        "def record(x):\n    global TOTAL\n    SEEN[x] = x * x\n    note(f'saw {x}')\n"
        "    TOTAL += x\n    return x + 1\nout = {}"
    )
    cell = "for i in range(16):\n    out[i] = record(i)\n"
    differential(ip, setup, cell, magic, ["out", "SEEN", "LOG", "TOTAL"])
    rec = parloop.last_run
    assert not rec.hidden and rec.reruns == [], rec.notes
    assert any(c.worker != "kernel" for c in rec.chunks)


@pytest.mark.parametrize("magic", BOTH)
def test_notebook_function_reads_what_the_loop_writes(ip, magic):
    """A helper's read of a global the loop (through the helper) writes takes
    part in the dependence test."""
    setup = (
        "cache = {}\ndef memo(k):\n    if k not in cache:\n        cache[k] = k * 10\n"
        "    return cache[k]\nres = {}"
    )
    cell = "for i in range(20):\n    res[i] = memo(i % 6)\n"
    differential(ip, setup, cell, magic, ["res", "cache"])


@pytest.mark.parametrize("magic", BOTH)
def test_notebook_function_rebinding_a_global(ip, magic):
    differential(
        ip,
        "last = None\ndef keep(x):\n    global last\n    if x % 3:\n        last = x\n",
        "for i in range(8):\n    keep(i)\n",
        magic,
        ["last"],
    )


def test_notebook_function_reading_its_global_is_rejected(ip):
    reset(ip)
    run_cell(ip, "n = 0\ndef count(x):\n    global n\n    n += 1\n    return n\nout = {}")
    _, err = run_cell(ip, MAGICS[0] + "\nfor i in range(4):\n    out[i] = count(i)\n")
    assert isinstance(err, parloop.LoopAnalysisError), err
    assert "count" in str(err) and "`n`" in str(err)


def test_a_decorators_wrapper_is_not_watched(ip):
    """A closure whose cells hold only what cannot change (the wrapped
    function) has no state of its own: no hidden-state probe for it."""
    from parloop.fingerprint import watchable

    reset(ip)
    run_cell(
        ip,
        "import functools\n"
        "def logged(f):\n"
        "    @functools.wraps(f)\n"
        "    def wrapper(*a):\n"
        "        return f(*a)\n"
        "    return wrapper\n"
        "@logged\n"
        "def double(x):\n"
        "    return 2 * x\n",
    )
    assert not watchable(ip.user_ns["double"])
    run_cell(
        ip,
        "def make():\n    n = 0\n    def f():\n        nonlocal n\n        n += 1\n    return f\ng = make()",
    )
    assert watchable(ip.user_ns["g"])


def test_explain_states_hidden_state(ip):
    reset(ip)
    run_cell(
        ip,
        "SEEN = {}\ndef record(x):\n    SEEN[x] = 1\n    return x\n"
        "out = {}\nclass Net:\n    def step(self):\n        return 1\nnet = Net()",
    )
    out, err = run_cell(
        ip, "%%parallel explain\nfor i in range(6):\n    out[i] = record(i) + net.step()\n"
    )
    assert err is None, err
    assert "hidden state" in out and "`SEEN`" in out and "`net`" in out, out
    assert "serially in the kernel" in out


def test_no_hidden_state_no_probe(ip):
    """A loop that hands nothing to code pays nothing: no fingerprints, no
    iteration run in the kernel first."""
    reset(ip)
    run_cell(ip, "src = list(range(20))\nout = {}")
    _, err = run_cell(ip, MAGICS[0] + "\nfor i in src:\n    out[i] = src[i] * 2\n")
    assert err is None, err
    assert not parloop.last_run.hidden
    assert all(c.worker != "kernel" for c in parloop.last_run.chunks)


PYPLOT_SETUP = """
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.close("all")
cols = ["a", "b", "c", "d"]
def figures():
    out = []
    for n in plt.get_fignums():
        f = plt.figure(n)
        out.append((n, [(ax.get_title(), [list(map(float, l.get_ydata())) for l in ax.lines])
                        for ax in f.axes]))
    return out
"""


@pytest.mark.parametrize("magic", BOTH)
def test_pyplot_figures_as_serial(ip, magic):
    """pyplot's calls in the body are replayed in the kernel in order: the
    same figures, the same artists, prints in their places."""
    pytest.importorskip("matplotlib")
    differential(
        ip,
        PYPLOT_SETUP,
        """
for i, c in enumerate(cols):
    print("drawing", c)
    plt.figure()
    plt.plot([0, 1, 2], [i, i * 2, i * 3])
    plt.title(c)
    print("drawn", c)
figs = figures()
""",
        magic,
        ["figs"],
    )


def test_pyplot_result_needed_is_rejected(ip):
    pytest.importorskip("matplotlib")
    reset(ip)
    run_cell(ip, PYPLOT_SETUP)
    _, err = run_cell(
        ip, MAGICS[0] + "\nfor c in cols:\n    ax = plt.subplot(1, 1, 1)\n    ax.set_title(c)\n"
    )
    assert isinstance(err, parloop.LoopAnalysisError)
    assert "plt.subplots" in str(err) and "line 3" in str(err)


@pytest.mark.cluster
@pytest.mark.parametrize("use_private", [False, True])
def test_sklearn_cross_validation(ip, use_private):
    """A real scikit-learn cross-validation loop (fit, then score, per fold),
    with and without ``private=clf``: the serial scores and the serial model."""
    pytest.importorskip("sklearn")
    setup = """
import numpy as np
from sklearn.linear_model import LogisticRegression
rng = np.random.default_rng(0)
X = rng.normal(size=(120, 4))
y = (X[:, 0] + X[:, 1] * 0.5 > 0).astype(int)
folds = np.array_split(np.arange(120), 5)
clf = LogisticRegression()
scores = {}
"""
    cell = """
for k, test in enumerate(folds):
    train = np.setdiff1d(np.arange(120), test)
    clf.fit(X[train], y[train])
    scores[k] = float(clf.score(X[test], y[test]))
coef = clf.coef_.tolist()
"""
    opt = " private=clf" if use_private else ""
    for magic in MAGICS:
        differential(ip, setup, cell, magic + opt, ["scores", "coef"])


@pytest.mark.cluster
@pytest.mark.parametrize(
    "kind", ["np.random.default_rng(5)", "np.random.RandomState(5)", "random.Random(5)"]
)
def test_seeded_generator_objects_draw_per_iteration(ip, kind):
    """``seed=`` with a generator object from outside: every iteration draws
    from its own stream derived from (seed, index): the same numbers under
    both magics, with any number of workers, never a repeated stream."""
    draw = "float(rng.random())"
    setup = f"import random\nimport numpy as np\nrng = {kind}\ndraws = {{}}"
    cell = f"for i in range(24):\n    draws[i] = {draw}\n"
    got = []
    for magic in (
        "%%threaded threads=3 chunksize=2 progress=off seed=11",
        "%%parallel processes=2 chunksize=5 progress=off seed=11",
        "%%threaded threads=1 progress=off seed=11",
    ):
        reset(ip)
        run_cell(ip, setup)
        _, err = run_cell(ip, magic + "\n" + cell)
        assert err is None, err
        got.append(dict(ip.user_ns["draws"]))
    assert got[0] == got[1] == got[2]
    assert len(set(got[0].values())) == 24


@pytest.mark.parametrize("magic", BOTH)
def test_axes_as_loop_items(ip, magic):
    """``for ax in axes: ax.plot(...)``: drawn on the kernel's own axes, and no
    extra pyplot figure comes back from the engines."""
    pytest.importorskip("matplotlib")
    setup = PYPLOT_SETUP + "fig, axes = plt.subplots(1, 3)\n"
    cell = (
        "for i, ax in enumerate(axes):\n    ax.plot([0, 1], [i, i + 1])\n"
        "    ax.set_title(f'p{i}')\nfigs = figures()\nn = len(plt.get_fignums())\n"
    )
    differential(ip, setup, cell, magic, ["figs", "n"])


@pytest.mark.parametrize("magic", BOTH)
def test_replayed_call_output_in_place(ip, magic):
    """A call replayed in the kernel prints at its place among the
    iteration's own prints."""
    setup = (
        "class Grid:\n    def __init__(self):\n        self.cells = []\n"
        "    def add(self, v):\n        self.cells.append(v)\n"
        "    def show(self):\n        print('grid', len(self.cells))\ngrid = Grid()"
    )
    cell = (
        "for i in range(6):\n    print('before', i)\n    grid.add(i)\n    grid.show()\n"
        "    print('after', i)\ncells = grid.cells\n"
    )
    differential(ip, setup, cell, magic, ["cells"])


@pytest.mark.parametrize("magic", BOTH)
def test_class_method_changing_class_state(ip, magic):
    """``Registry.add(x)`` on a notebook class (a call through a class runs in
    the worker) changes class attributes: detected, the serial answer."""
    setup = (
        "class Registry:\n    items = []\n    @classmethod\n    def add(cls, x):\n"
        "        cls.items.append(x)\n"
    )
    cell = "for i in range(8):\n    Registry.add(i * i)\nitems = list(Registry.items)\n"
    differential(ip, setup, cell, magic, ["items"])


@pytest.mark.parametrize("magic", BOTH)
def test_method_writing_notebook_globals(ip, magic):
    """A method of a notebook class that writes notebook globals runs as a
    copy whose writes are logged: parallel, nothing re-run, the serial
    globals."""
    setup = (
        "AUDIT = []\nSEEN = {}\nclass Scorer:\n    def __init__(self, w):\n"
        "        self.w = w\n    def score(self, x):\n        AUDIT.append(x)\n"
        "        SEEN[x] = x * self.w\n        return x * self.w + 1\n"
        "sc = Scorer(3)\nout = {}"
    )
    cell = "for i in range(12):\n    out[i] = sc.score(i)\n"
    differential(ip, setup, cell, magic, ["out", "AUDIT", "SEEN", "sc.w"])
    rec = parloop.last_run
    assert not rec.hidden and rec.reruns == [], rec.notes


def test_a_notebook_functions_module_calls_run_in_the_worker(ip):
    """A notebook function's statement calls through a module (``time.sleep``)
    or a class run in the worker, as in the loop body: they are not writes to
    the module's name, so the loop is not held to one chunk at a time.  A
    module with global state of its own (``plt``) stays replayed in order."""
    import parloop.analysis.functions as functions

    reset(ip)
    run_cell(
        ip,
        "import time, math\nimport matplotlib\nmatplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n"
        "def work(i):\n    time.sleep(0.001)\n    return math.sqrt(i)\n"
        "def draw(i):\n    plt.plot([i], [i])\n    return i\nout = {}",
    )
    fns = functions.notebook_functions(
        ast.parse("work(1)\ndraw(1)").body, ip.user_ns, frozenset(), {}
    )
    assert fns["work"].writes() == set()
    assert fns["draw"].writes() == {"plt"}
    differential(
        ip,
        "import time, math\ndef work(i):\n    time.sleep(0.002)\n    return math.sqrt(i)\nout = {}",
        "for i in range(200):\n    out[i] = work(i)\n",
        "%%threaded threads=4 progress=off",
        ["out"],
    )
    assert not parloop.last_run.reruns and parloop.last_run.serial_from is None
    # chunks ran side by side: the workers were busy more than the wall time
    busy = sum(c.t_end - c.t_start for c in parloop.last_run.chunks)
    assert busy > 1.5 * parloop.last_run.wall, (busy, parloop.last_run.wall)
