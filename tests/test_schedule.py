"""Scheduling: chunk sizes, bounded kernel memory, the native path for tiny
iterations, live per-worker state."""

from __future__ import annotations

import parloop
from helpers import differential, reset, run_cell, run_live
from parloop.schedule import ChunkSizer, ThreadCount


def test_sizer_probes_then_targets_a_tenth_of_a_second():
    s = ChunkSizer(None, workers=2, total=10_000)
    assert [s.next_size(10_000) for _ in range(2)] == [1, 1]
    s.observe(100, 0.01)  # 0.1 ms per iteration
    assert s.next_size(10_000) == 1000  # 0.1 s of work
    assert s.next_size(300) == 200  # near the end, but not below 20 ms of work
    assert ChunkSizer(7, workers=2, total=None).next_size(None) == 7


def test_thread_count_formula():
    t = ThreadCount(cores=2, cap=256)
    assert t.threads() == 2  # nothing measured yet
    t.observe(10, cpu=0.001, wall=1.0)  # waits 99.9 % of the time
    assert t.threads() == 256  # capped
    t2 = ThreadCount(cores=2, cap=256)
    t2.observe(10, cpu=0.5, wall=1.0)  # T1 = T2
    assert t2.threads() == 4


def test_kernel_memory_is_bounded_by_the_window(ip):
    """100 000 iterations never hold 100 000 uncommitted results."""
    reset(ip)
    run_cell(ip, "out = {}")
    out, err = run_cell(
        ip,
        "%%threaded threads=4 chunksize=500 progress=off\n"
        "for i in range(100_000):\n    out[i] = i + 1\n",
    )
    assert err is None and len(ip.user_ns["out"]) == 100_000
    assert parloop.last_run.max_outstanding < 50_000


def test_native_wins_only_where_overheads_dominate():
    from parloop.backends.engines import EngineBackend
    from parloop.backends.threads import ThreadBackend
    from parloop.native import native_wins

    class Engines(ThreadBackend):
        """The engines' costs, without a cluster."""

        native_costs = EngineBackend.native_costs
        auto_workers = False

    engines, threads, many = Engines(2), ThreadBackend(2), ThreadBackend(16)
    # 0.2 us iterations: shipping costs more than computing
    assert native_wins(wall=0.002, cpu=0.002, n=10_000, remaining=200_000, backend=engines)
    assert native_wins(wall=0.002, cpu=0.002, n=10_000, remaining=200_000, backend=threads)
    # 1 ms iterations: two workers halve the time
    assert not native_wins(wall=0.002, cpu=0.002, n=2, remaining=10_000, backend=engines)
    # waiting iterations under threads
    assert not native_wins(wall=0.01, cpu=0.00001, n=1, remaining=1000, backend=many)


def test_tiny_iterations_may_run_natively_and_say_so(ip):
    reset(ip)
    run_cell(ip, "out = {}")
    out, err = run_cell(
        ip, "%%threaded progress=off\nfor i in range(50_000):\n    out[i] = i * i + 1\n"
    )
    assert err is None and ip.user_ns["out"] == {i: i * i + 1 for i in range(50_000)}
    # the choice is a measurement (a loaded machine may choose the threads)
    assert parloop.last_run.native == any("natively" in n for n in parloop.last_run.notes)


def test_native_path_keeps_serial_semantics(ip):
    setup = "out = []\ntotal = 0\ns = ''"
    cell = (
        "for i in range(3000):\n    out.append(i % 7)\n    total += i\n"
        "    if i % 1000 == 0:\n        s += str(i)\n        print('at', i)\n"
    )
    differential(ip, setup, cell, "%%threaded progress=off", ["out", "total", "s", "i"])


def test_native_path_error_has_the_iteration_note(ip):
    reset(ip)
    run_cell(ip, "out = {}")
    out, err = run_cell(
        ip, "%%threaded progress=off\nfor i in range(5000):\n    out[i] = 1 // (i - 4000)\n"
    )
    assert isinstance(err, ZeroDivisionError)
    assert any("iteration 4000" in n for n in err.__notes__)
    assert len(ip.user_ns["out"]) == 4000 and ip.user_ns["i"] == 4000


def test_live_rows_per_thread(ip):
    reset(ip)
    run_cell(ip, "import time\nout = {}")
    spy = run_live(
        ip,
        "for i in range(90):\n    time.sleep(0.01)\n    out[i] = i\n",
        "threaded",
        "threads=3 chunksize=15",
    )
    names = set().union(*spy.rows)
    assert names == {"thread 0", "thread 1", "thread 2"}
    running = [r for r in spy.rows if any(cur is not None for _, _, cur in r.values())]
    assert running, "no reading caught a worker mid-chunk"
    assert (
        parloop.last_run.by_worker["thread 0"].done
        + parloop.last_run.by_worker["thread 1"].done
        + parloop.last_run.by_worker["thread 2"].done
        == 90
    )
