"""The extension as a whole: load/unload, the manual, configuration,
``explain``, ``seed``, ``parloop.last_run`` and the decorator API."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import textwrap

import pytest
from IPython.core.error import UsageError

import parloop
from helpers import reset, run_cell

M4 = "%%threaded threads=4 progress=off"


def test_load_unload_load(ip):
    cell = ip.magics_manager.magics["cell"]
    assert "threaded" in cell and "parallel" in cell
    _, err = run_cell(ip, "%unload_ext parloop")
    assert err is None, err
    try:
        assert "threaded" not in ip.magics_manager.magics["cell"]
        assert "parallel" not in ip.magics_manager.magics["cell"]
        assert "parallel_status" not in ip.magics_manager.magics["line"]
        _, err = run_cell(ip, "%%threaded\nfor i in range(2):\n    pass\n")
        assert err is not None
    finally:
        _, err = run_cell(ip, "%load_ext parloop")
    assert err is None, err
    assert "threaded" in ip.magics_manager.magics["cell"]
    reset(ip)
    _, err = run_cell(ip, M4 + "\nout = {}\nfor i in range(10):\n    out[i] = i\n")
    assert err is None, err
    assert ip.user_ns["out"] == {i: i for i in range(10)}


def test_load_twice_is_harmless(ip):
    _, err = run_cell(ip, "%load_ext parloop")
    assert err is None
    reset(ip)
    _, err = run_cell(ip, M4 + "\nout = []\nfor i in range(5):\n    out.append(i)\n")
    assert err is None and ip.user_ns["out"] == list(range(5))


def test_threaded_docstring(ip):
    doc = ip.magics_manager.magics["cell"]["threaded"].__doc__
    assert "Usage" in doc and "Examples" in doc
    for opt in (
        "threads",
        "chunksize",
        "progress",
        "on_error",
        "seed",
        "tasks",
        "explain",
        "serial",
    ):
        assert opt in doc, opt
    assert "processes" not in doc


def test_threaded_help_via_ipython(ip):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ip.run_cell("%%threaded?", store_history=False)
    text = buf.getvalue()
    assert "Usage" in text and "threads=N" in text


def _stderr_of(ip, code):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out, exc = run_cell(ip, code)
    return out, exc, err.getvalue()


SLOW = "%%threaded threads=1\nfor i in range(26):\n    time.sleep(0.05)\n"


def test_config_progress_off_is_honoured(ip):
    """Without ``progress=`` a terminal shell gets the text bar (after its 1 s
    delay) on stderr; ``%config ParloopMagics.progress = 'off'`` removes it."""
    reset(ip)
    run_cell(ip, "import time")
    try:
        _, exc, err = _stderr_of(ip, SLOW)
        assert exc is None and "26/26" in err, err
        run_cell(ip, "%config ParloopMagics.progress = 'off'")
        out, exc, err = _stderr_of(ip, SLOW)
        assert exc is None and err == "" and out == ""
        # an explicit option still wins over the configured default
        _, exc, err = _stderr_of(ip, SLOW.replace("threads=1", "threads=1 progress=text"))
        assert exc is None and "26/26" in err
    finally:
        run_cell(ip, "%config ParloopMagics.progress = ''")


def test_config_invalid_value_is_usage_error(ip):
    reset(ip)
    run_cell(ip, "ran = {}")
    try:
        run_cell(ip, "%config ParloopMagics.progress = 'bogus'")
        _, err = run_cell(ip, "%%threaded\nfor i in range(3):\n    ran[i] = i\n")
        assert isinstance(err, UsageError), repr(err)
        assert "progress" in str(err) and "bogus" in str(err)
        assert ip.user_ns["ran"] == {}
    finally:
        run_cell(ip, "%config ParloopMagics.progress = ''")


def test_config_threads_default(ip):
    reset(ip)
    try:
        run_cell(ip, "%config ParloopMagics.threads = '3'")
        _, err = run_cell(ip, "%%threaded progress=off\nfor i in range(30):\n    pass\n")
        assert err is None
        assert parloop.last_run.workers == 3
    finally:
        run_cell(ip, "%config ParloopMagics.threads = ''")


def test_explain_prints_roles_and_runs_nothing(ip):
    reset(ip)
    run_cell(ip, "results = {}\ntotal = 0\nlog = []\nrows = [{'a': 1}]")
    parloop.last_run = None
    out, err = run_cell(
        ip,
        """%%threaded explain
pre = 'prologue ran'
for i, row in enumerate(rows):
    row['x'] = i
    y = i * 2
    results[i] = y
    total += y
    log.append(y)
post = 'epilogue ran'
""",
    )
    assert err is None, err
    for name, role in [
        ("i", "target"),
        ("row", "target-mutation"),
        ("y", "private"),
        ("results", "root"),
        ("total", "reduction"),
        ("log", "call-root"),
    ]:
        line = next((ln for ln in out.splitlines() if ln.split()[:1] == [name]), None)
        assert line is not None, (name, out)
        assert role in line.split(), (name, role, line)
    ns = ip.user_ns
    assert "pre" not in ns and "post" not in ns and "i" not in ns
    assert ns["results"] == {} and ns["total"] == 0 and ns["log"] == []
    assert ns["rows"] == [{"a": 1}]
    assert parloop.last_run is None


SEED_CELL = """
import random
import numpy as np
draws = {}
for i in range(40):
    draws[i] = (random.random(), random.randint(0, 10 ** 9), float(np.random.rand()))
"""


def _draws(ip, line):
    reset(ip)
    _, err = run_cell(ip, "%%threaded progress=off " + line + SEED_CELL)
    assert err is None, err
    return ip.user_ns["draws"]


def test_seed(ip):
    a = _draws(ip, "threads=1 seed=5")
    b = _draws(ip, "threads=4 seed=5")
    c = _draws(ip, "threads=3 chunksize=1 seed=5")
    d = _draws(ip, "serial seed=5")
    e = _draws(ip, "threads=4 seed=6")
    assert a == b == c == d
    assert len({v[0] for v in a.values()}) == 40
    assert len({v[2] for v in a.values()}) == 40
    assert all(a[i][0] != e[i][0] and a[i][2] != e[i][2] for i in range(40))


def test_seed_restores_global_generators(ip):
    import random

    import numpy as np

    _draws(ip, "threads=2 seed=1")
    assert random.random.__self__ is random._inst
    assert getattr(np.random.rand, "__self__", None) is np.random.mtrand._rand


def test_unseeded_threads_do_not_repeat(ip):
    a = _draws(ip, "threads=4")
    assert len({v[0] for v in a.values()}) == 40


def test_last_run_record(ip):
    reset(ip)
    _, err = run_cell(
        ip,
        "%%threaded threads=3 chunksize=4 progress=off\nimport time\n"
        "out = {}\nfor i in range(30):\n    time.sleep(0.001)\n"
        "    out[i] = i\n",
    )
    assert err is None
    lr = parloop.last_run
    assert lr.options == {"threads": 3, "chunksize": 4, "progress": "off"}
    assert lr.errors == []
    assert lr.done == 30 and lr.total == 30
    assert sum(c.count for c in lr.chunks) == 30
    assert all(c.count <= 4 for c in lr.chunks)
    pw = lr.per_worker
    assert len(pw) >= 1
    assert all(set(w) >= {"iterations", "busy", "chunks"} for w in pw.values())
    assert sum(w["iterations"] for w in pw.values()) == 30
    assert lr.roles["out"] == "root" and lr.roles["i"] == "target"
    assert isinstance(lr.threads, dict)


def test_last_run_per_worker_matches_threads(ip):
    reset(ip)
    run_cell(
        ip,
        "%%threaded threads=8 progress=off\nimport time\n"
        "for i in range(16):\n    time.sleep(0.01)\n",
    )
    _, err = run_cell(
        ip,
        "%%threaded threads=3 chunksize=1 progress=off\nimport time\n"
        "for i in range(60):\n    time.sleep(0.002)\n",
    )
    assert err is None
    assert parloop.last_run.workers == 3
    assert len(parloop.last_run.per_worker) <= 3, list(parloop.last_run.per_worker)


def test_last_run_threads_auto(ip):
    reset(ip)
    _, err = run_cell(
        ip,
        "%%threaded threads=auto progress=off\nimport time\nout = {}\n"
        "for i in range(40):\n    time.sleep(0.005)\n    out[i] = i\n",
    )
    assert err is None
    th = parloop.last_run.threads
    for key in ("threads", "t1", "t2", "cores"):
        assert key in th, th
    assert th["threads"] >= 1 and th["cores"] >= 1
    # a sleeping body waits much longer than it computes: TC > N
    assert th["t2"] > th["t1"]
    assert th["threads"] > th["cores"]
    assert ip.user_ns["out"] == {i: i for i in range(40)}


MODULE = """
import parloop

def slow_square(x):
    return x * x

def compute(n, offset=0):
    results = {}
    total = 0
    for i in range(n):
        results[i] = slow_square(i) + offset
        total += i
    return results, total, i

def with_epilogue(items):
    out = []
    for it in items:
        out.append(it.upper())
    if not out:
        return "empty"
    return "-".join(out)
"""


@pytest.fixture
def decomod(tmp_path, monkeypatch):
    name = "parloop_deco_testmod"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    mod = importlib.import_module(name)
    yield mod
    sys.modules.pop(name, None)


def test_decorator_matches_serial(decomod):
    serial = decomod.compute(50, offset=3)
    fast = parloop.threaded(threads=4, progress="off")(decomod.compute)
    assert fast(50, offset=3) == serial
    assert fast.__name__ == "compute"


def test_decorator_return_value_and_epilogue(decomod):
    f = parloop.threaded(threads=2, progress="off")(decomod.with_epilogue)
    assert f(["a", "b", "c"]) == decomod.with_epilogue(["a", "b", "c"]) == "A-B-C"
    assert f([]) == "empty"


def test_decorator_without_arguments(decomod):
    f = parloop.threaded(decomod.compute)
    assert f(10) == decomod.compute(10)


def test_decorator_bad_option_fails_at_decoration():
    with pytest.raises(UsageError):
        parloop.threaded(threads=0)
    with pytest.raises(UsageError):
        parloop.threaded(processes=2)
