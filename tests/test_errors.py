"""Failures (docs/design.md §1, §3): iteration exceptions keep their type and the
serial state at the raise; on_error=skip/collect; usage errors; static
rejections run nothing; syntax errors point at the user's line."""

from __future__ import annotations

import traceback

import pytest
from IPython.core.error import UsageError

import parloop
from helpers import deep_diff, materialize, reset, run_cell, snapshot

M4 = "%%threaded threads=4 progress=off"

SETUP = """
import time
class MyError(Exception):
    pass
def work(i):
    time.sleep(((i * 37) % 11) / 4000)
    if i == 13:
        raise MyError("bad item %d" % i)
    return i * i
results = {}
total = 0
log = []
"""
CELL = """for i in range(40):
    log.append(i)
    total += i
    results[i] = work(i)
    after = i
"""
CHECKS = ["results", "total", "log", "i", "after", "sorted(results) == list(range(13))"]


def _serial_state(ip, setup, cell, checks):
    reset(ip)
    assert run_cell(ip, setup)[1] is None
    _, err = run_cell(ip, cell)
    return err, materialize(snapshot(ip, checks))


def _assert_same(checks, a, b):
    for expr, x, y in zip(checks, a, b):
        assert x[0] == y[0], f"{expr}: {x} vs {y}"
        if x[0] == "value":
            d = deep_diff(x[1], y[1], expr)
            assert d is None, d


@pytest.mark.parametrize(
    "magic",
    [
        M4,
        "%%threaded threads=1 progress=off",
        "%%threaded threads=3 chunksize=1 progress=off",
        "%%threaded threads=2 chunksize=7 progress=off",
        "%%threaded serial progress=off",
    ],
)
def test_exception_type_notes_and_serial_state(ip, magic):
    s_err, s_state = _serial_state(ip, SETUP, CELL, CHECKS)
    assert type(s_err).__name__ == "MyError"
    reset(ip)
    run_cell(ip, SETUP)
    _, err = run_cell(ip, magic + "\n" + CELL)
    assert isinstance(err, ip.user_ns["MyError"]), repr(err)
    assert str(err) == "bad item 13"
    notes = "\n".join(getattr(err, "__notes__", []))
    assert "13" in notes and "iteration" in notes, notes
    assert "i=13" in notes, notes
    _assert_same(CHECKS, s_state, materialize(snapshot(ip, CHECKS)))


def test_except_myerror_catches_it_in_a_later_cell(ip):
    reset(ip)
    run_cell(ip, SETUP)
    out, err = run_cell(
        ip,
        f"""
try:
    get_ipython().run_cell_magic('threaded', 'threads=4 progress=off', '''{CELL}''')
except MyError as e:
    caught = (type(e).__name__, str(e))
""",
    )
    assert err is None, err
    assert ip.user_ns["caught"] == ("MyError", "bad item 13")


def test_traceback_shows_user_cell_lines(ip):
    reset(ip)
    run_cell(ip, SETUP)
    _, err = run_cell(ip, M4 + "\n" + CELL)
    text = "".join(traceback.format_exception(err))
    assert "results[i] = work(i)" in text
    assert 'raise MyError("bad item %d" % i)' in text
    assert "parloop: raised in iteration 13" in text


def test_exception_in_first_iteration_with_tuple_target(ip):
    setup = "data = [(1, 'a'), (0, 'b'), (2, 'c')]\nout = {}"
    cell = "for n, (k, label) in enumerate(data):\n    out[label] = 10 // k\n"
    s_err, s_state = _serial_state(ip, setup, cell, ["out", "n", "k", "label"])
    reset(ip)
    run_cell(ip, setup)
    _, err = run_cell(ip, M4 + "\n" + cell)
    assert type(err) is ZeroDivisionError
    notes = "\n".join(err.__notes__)
    assert "iteration 1" in notes and "label='b'" in notes and "k=0" in notes, notes
    _assert_same(
        ["out", "n", "k", "label"], s_state, materialize(snapshot(ip, ["out", "n", "k", "label"]))
    )


def test_replay_error_like_serial(ip):
    """``out[k] = v`` on a list that is too short raises in the kernel's replay,
    in the iteration where serial raised it."""
    setup = "out = [0] * 5\nseen = []"
    cell = "for i in range(10):\n    seen.append(i)\n    out[i] = i\n"
    checks = ["out", "seen", "i"]
    s_err, s_state = _serial_state(ip, setup, cell, checks)
    reset(ip)
    run_cell(ip, setup)
    _, err = run_cell(ip, M4 + "\n" + cell)
    assert type(err) is IndexError and type(s_err) is IndexError
    _assert_same(checks, s_state, materialize(snapshot(ip, checks)))


ERR_SETUP = """
class MyError(Exception):
    pass
results = {}
log = []
"""
ERR_CELL = """for i in range(12):
    log.append(i)
    if i % 5 == 3:
        raise MyError("boom %d" % i)
    results[i] = i * 2
"""


def test_on_error_skip(ip):
    reset(ip)
    run_cell(ip, ERR_SETUP)
    out, err = run_cell(ip, "%%threaded threads=4 progress=off on_error=skip\n" + ERR_CELL)
    assert err is None, err
    ns = ip.user_ns
    assert ns["results"] == {i: i * 2 for i in range(12) if i % 5 != 3}
    # the failing iterations' mutations (made before they raised) are dropped
    assert ns["log"] == [i for i in range(12) if i % 5 != 3]
    errs = parloop.last_run.errors
    assert [e.index for e in errs] == [3, 8]
    assert all(isinstance(e.exception, ns["MyError"]) for e in errs)
    assert "i=3" in errs[0].values


def test_on_error_collect(ip):
    reset(ip)
    run_cell(ip, ERR_SETUP)
    out, err = run_cell(ip, "%%threaded threads=4 progress=off on_error=collect\n" + ERR_CELL)
    assert err is None, err
    ns = ip.user_ns
    assert ns["results"] == {i: i * 2 for i in range(12) if i % 5 != 3}
    # the failing iteration's mutations made before it raised are kept
    assert ns["log"] == list(range(12))
    assert ns["i"] == 11
    errs = parloop.last_run.errors
    assert [e.index for e in errs] == [3, 8]
    for e in errs:
        assert isinstance(e.exception, ns["MyError"])
        assert str(e.exception) == "boom %d" % e.index
        assert ("i=%d" % e.index) in e.values


def test_on_error_collect_then_epilogue_runs(ip):
    reset(ip)
    run_cell(ip, ERR_SETUP)
    _, err = run_cell(
        ip,
        "%%threaded threads=2 progress=off on_error=collect\n" + ERR_CELL + "n_ok = len(results)\n",
    )
    assert err is None
    assert ip.user_ns["n_ok"] == 10


# ---------------------------------------------------------------- usage errors
LOOP = "\nfor i in range(3):\n    ran[i] = i\n"


@pytest.mark.parametrize(
    "line,words",
    [
        ("bogus=1", ["bogus", "chunksize"]),
        ("frobnicate", ["frobnicate", "chunksize"]),
        ("threads=0", ["threads"]),
        ("threads=abc", ["threads", "abc"]),
        ("threads=-2", ["threads"]),
        ("chunksize=0", ["chunksize"]),
        ("chunksize=x", ["chunksize"]),
        ("progress=loud", ["progress"]),
        ("on_error=ignore", ["on_error"]),
        ("seed=abc", ["seed"]),
        ("explain=1", ["explain"]),
        ("serial=yes", ["serial"]),
        ("threads=2 threads=3", ["threads"]),
        ("threads=", ["threads"]),
        ("processes=2", ["processes", "chunksize"]),
        ("profile=default", ["profile"]),
        ("retries=2", ["retries"]),
    ],
)
def test_usage_errors(ip, line, words):
    reset(ip)
    run_cell(ip, "ran = {}")
    parloop.last_run = None
    _, err = run_cell(ip, "%%threaded " + line + LOOP)
    assert isinstance(err, UsageError), repr(err)
    for w in words:
        assert w in str(err), (w, str(err))
    assert ip.user_ns["ran"] == {}
    assert parloop.last_run is None


def test_empty_cell_is_usage_error(ip):
    _, err = run_cell(ip, "%%threaded threads=2\n\n")
    assert isinstance(err, UsageError)


# ---------------------------------------------------------------- static rejection
@pytest.mark.parametrize(
    "cell,words",
    [
        (
            "pre = 'ran'\nfor i in range(5):\n    if i == 3:\n        global g\n    out[i] = i\n",
            ["global", "line 5"],
        ),
        (
            "pre = 'ran'\nprev = 0\nfor i in range(5):\n    out[i] = prev\n    prev = i\n",
            ["prev", "line 5"],
        ),
        ("pre = 'ran'\nwhile len(out) < 3:\n    out[len(out)] = 1\n", ["for"]),
        (
            "pre = 'ran'\nfor i in range(5):\n    total += i\n    out[i] = total\n",
            ["total", "line 5"],
        ),
    ],
)
def test_analysis_error_runs_nothing(ip, cell, words):
    """The magic line is line 1 of what the user sees, so the cell's lines
    start at 2."""
    reset(ip)
    run_cell(ip, "out = {'keep': 1}\ntotal = 0")
    _, err = run_cell(ip, M4 + "\n" + cell)
    assert isinstance(err, parloop.LoopAnalysisError), repr(err)
    assert isinstance(err, ValueError)
    for w in words:
        assert w in str(err), (w, str(err))
    assert "pre" not in ip.user_ns  # prologue not run
    assert ip.user_ns["out"] == {"keep": 1}
    assert ip.user_ns["total"] == 0
    assert "i" not in ip.user_ns


def test_syntax_error_points_at_user_line(ip):
    reset(ip)
    _, err = run_cell(ip, M4 + "\nx = 1\nfor i in range(3):\n    y = i +* 2\n")
    assert isinstance(err, SyntaxError), repr(err)
    assert err.lineno == 4
    assert "y = i +* 2" in (err.text or "")
    assert "x" not in ip.user_ns


def test_syntax_error_unclosed_bracket(ip):
    reset(ip)
    _, err = run_cell(ip, M4 + "\nfor i in range(3):\n    y = (\n")
    assert isinstance(err, SyntaxError)
    assert err.lineno == 3


def test_iterable_raising_midway_keeps_earlier_iterations(ip):
    setup = "def gen():\n    yield 1\n    yield 2\n    raise RuntimeError('iter fails')\nres = {}"
    cell = "for i in gen():\n    res[i] = i * 10\n"
    s_err, s_state = _serial_state(ip, setup, cell, ["res", "i"])
    assert type(s_err) is RuntimeError
    reset(ip)
    run_cell(ip, setup)
    _, err = run_cell(ip, M4 + "\n" + cell)
    assert type(err) is RuntimeError, repr(err)
    _assert_same(["res", "i"], s_state, materialize(snapshot(ip, ["res", "i"])))


def test_output_before_the_raise_is_shown_like_serial(ip):
    setup = "import time\nres = {}"
    cell = (
        "for i in range(40):\n    print('a', i)\n    time.sleep((40 - i) / 4000)\n"
        "    if i in (13, 27):\n        raise ValueError(i)\n    print('b', i)\n"
        "    res[i] = i\n"
    )
    reset(ip)
    run_cell(ip, setup)
    s_out, s_err = run_cell(ip, cell)
    s_state = materialize(snapshot(ip, ["res", "i"]))
    reset(ip)
    run_cell(ip, setup)
    m_out, m_err = run_cell(ip, "%%threaded threads=4 chunksize=3 progress=off\n" + cell)
    assert type(m_err) is ValueError and m_err.args == (13,)
    # stdout up to IPython's traceback display is the same
    assert m_out.split("a 13\n")[0] == s_out.split("a 13\n")[0]
    assert "a 13\n" in m_out and "b 13" not in m_out and "a 14" not in m_out
    _assert_same(["res", "i"], s_state, materialize(snapshot(ip, ["res", "i"])))


@pytest.mark.cluster
@pytest.mark.parametrize("channel", [True, False], ids=["channel", "tasks"])
def test_worker_traceback_shows_notebook_function_lines(ip, monkeypatch, channel):
    """Under %%parallel the re-raised exception carries the engine's frames
    (as its cause): the notebook function ``boom`` and its ``raise`` line,
    while ``except CellError`` still catches it; over parloop's channel and
    with one ipyparallel task per chunk (``PARLOOP_CHANNEL=0``)."""
    from parloop.backends.engines import EngineBackend

    monkeypatch.setattr(EngineBackend, "use_channel", channel)
    reset(ip)
    run_cell(
        ip,
        "class CellError(Exception):\n    pass\n"
        "def boom(x):\n    if x == 5:\n        raise CellError(f'bad {x}')\n"
        "    return x\nout = {}",
    )
    _, err = run_cell(
        ip,
        "%%parallel processes=2 progress=off chunksize=2\n"
        "for i in range(8):\n    out[i] = boom(i)\n",
    )
    assert isinstance(err, ip.user_ns["CellError"]), repr(err)
    text = "".join(traceback.format_exception(err))
    assert "boom" in text and "raise CellError(f'bad {x}')" in text, text
    assert parloop.last_run.dispatch == ("channel" if channel else "tasks")
    _, err2 = run_cell(
        ip,
        "try:\n    get_ipython().run_cell_magic('parallel', "
        "'processes=2 progress=off chunksize=2', "
        "'for i in range(8):\\n    out[i] = boom(i)\\n')\n"
        "except CellError as e:\n    caught = str(e)\n",
    )
    assert err2 is None and ip.user_ns["caught"] == "bad 5"
