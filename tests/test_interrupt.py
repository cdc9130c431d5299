"""Kernel interrupt (docs/design.md §3): workers stop within about two seconds, the
completed prefix of iterations is applied, the pool stays usable."""

from __future__ import annotations

import _thread
import threading
import time

import pytest

from helpers import reset, run_cell, run_cell_result

pytestmark = pytest.mark.timeout(60)


def _interrupted_run(ip, cell, after=0.5):
    timer = threading.Timer(after, _thread.interrupt_main)
    t0 = time.monotonic()
    timer.start()
    try:
        try:
            out, res = run_cell_result(ip, cell)
        except KeyboardInterrupt as e:  # should IPython let it through
            out, res, err = "", None, e
        else:
            err = res.error_in_exec
        elapsed = time.monotonic() - t0
    finally:
        timer.cancel()
        timer.join()
    return out, err, elapsed


def _check_prefix(ip, results, expect):
    k = len(results)
    assert list(results) == list(range(k)), sorted(results)[:20]
    assert results == {i: expect(i) for i in range(k)}
    assert 0 < k < 200
    assert ip.user_ns["i"] == k - 1
    return k


def _next_cell_runs(ip):
    _, err = run_cell(
        ip,
        "%%threaded threads=4 progress=off\nafter = {}\n"
        "for j in range(50):\n    time.sleep(0.002)\n    after[j] = -j\n",
    )
    assert err is None, err
    assert ip.user_ns["after"] == {j: -j for j in range(50)}
    assert ip.user_ns["j"] == 49


def test_interrupt_sleeping_loop(ip):
    reset(ip)
    run_cell(ip, "import time\nresults = {}")
    out, err, elapsed = _interrupted_run(
        ip,
        "%%threaded threads=4 progress=off\nfor i in range(200):\n"
        "    time.sleep(0.05)\n    results[i] = i * 2\n",
    )
    assert isinstance(err, KeyboardInterrupt), repr(err)
    assert elapsed < 0.5 + 2.0, elapsed  # 200 * 0.05 / 4 = 2.5 s uninterrupted
    k = _check_prefix(ip, ip.user_ns["results"], lambda i: i * 2)
    assert str(k) in str(err)
    import parloop

    assert parloop.last_run.interrupted
    assert parloop.last_run.done == k
    _next_cell_runs(ip)


def test_interrupt_cpu_bound_loop(ip):
    reset(ip)
    run_cell(
        ip,
        "import time\ndef spin(n):\n    s = 0\n    for q in range(n):\n"
        "        s += q * q\n    return s\nresults = {}\nN = 200000\nexpect = spin(N)",
    )
    out, err, elapsed = _interrupted_run(
        ip,
        "%%threaded threads=4 progress=off\nfor i in range(200):\n    results[i] = spin(N) + i\n",
    )
    assert isinstance(err, KeyboardInterrupt), repr(err)
    assert elapsed < 0.5 + 2.0, elapsed
    expect = ip.user_ns["expect"]
    _check_prefix(ip, ip.user_ns["results"], lambda i: expect + i)
    _next_cell_runs(ip)


def test_interrupt_with_reductions_and_output(ip):
    """The committed prefix includes the reductions and the printed lines."""
    reset(ip)
    run_cell(ip, "import time\nresults = {}\ntotal = 0")
    out, err, elapsed = _interrupted_run(
        ip,
        "%%threaded threads=4 progress=off\nfor i in range(200):\n"
        "    time.sleep(0.05)\n    total += i\n    print('it', i)\n    results[i] = i\n",
    )
    assert isinstance(err, KeyboardInterrupt), repr(err)
    k = _check_prefix(ip, ip.user_ns["results"], lambda i: i)
    assert ip.user_ns["total"] == sum(range(k))
    lines = [ln for ln in out.splitlines() if ln.startswith("it ")]
    assert lines == ["it %d" % i for i in range(k)]
    _next_cell_runs(ip)
