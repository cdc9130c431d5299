"""Workloads of the %%parallel issue: CPU-bound (W1), tiny iterations (W2),
a big input (W4), the warm one-iteration cell (W5), against the peers."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

from . import work
from .harness import Result, Variant, measure, run_cell


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _scaled(fn, items: int, full: int):
    """A variant run that times ``fn(items)`` and reports it × full / items:
    for peers whose cost per item is fixed (one task per item) and that would
    take minutes on the whole loop."""

    def run() -> float:
        return _timed(lambda: fn(items)) * full / items

    return run


def _process_map(fn, items, **kw):
    """tqdm.contrib.concurrent.process_map, bar off; it warns about the
    default chunksize=1 on more than 1000 items, which users then see."""
    from tqdm.contrib.concurrent import process_map

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return process_map(fn, items, max_workers=2, disable=True, **kw)


def _peers():
    """The warm pools of the peers, 2 workers each, and raw ipyparallel on
    parloop's own 2 engines.  ``stop()`` ends the pools."""
    import joblib

    from parloop.backends.engines.cluster import MANAGER

    pool = mp.get_context("fork").Pool(2)
    pool.map(work.tiny, range(4))
    ppe = ProcessPoolExecutor(2, mp_context=mp.get_context("fork"))
    list(ppe.map(work.tiny, range(4)))
    # spawn starts its workers one per submit until there are 2: warm both
    spe = ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"))
    list(spe.map(work.tiny, range(8)))
    par = joblib.Parallel(n_jobs=2)
    par(joblib.delayed(work.tiny)(i) for i in range(4))
    rc = MANAGER.client(processes=2)
    lview = rc.load_balanced_view()
    lview.map_sync(work.tiny, range(4))
    dview = rc[:]
    dview.map_sync(work.tiny, range(4))

    class Peers:
        pass

    p = Peers()
    p.pool, p.ppe, p.spe, p.par, p.lview, p.dview = pool, ppe, spe, par, lview, dview
    p.delayed = joblib.delayed

    def stop() -> None:
        pool.terminate()
        ppe.shutdown()
        spe.shutdown()
        work.deco_stop(work.spin_deco, work.tiny_deco)

    p.stop = stop
    return p


def cpu_setup(ip) -> tuple[int, str]:
    """W1's set-up, shared with the live-view workload: ``spin`` calibrated to
    ~60 ms and defined in the shell, warm engines; returns (n, the loop cell)."""
    n = work.calibrate()
    ip.run_cell(work.CPU_SOURCE + f"\nSPIN = {n}\nout = {{}}", store_history=False)
    run_cell(ip, "%%parallel processes=2 progress=off\nfor i in range(2):\n    out[i] = i")
    return n, "for i in range(32):\n    out[i] = spin(SPIN)\n"


def cpu(ip, rounds: int) -> Result:
    """W1: 32 iterations of ~60 ms pure Python, 2 workers everywhere."""
    n, cell = cpu_setup(ip)
    p = _peers()
    work.spin_all_deco(1000, 4)  # deco makes its pool at the first call
    args = [n] * 32
    # per-iteration compute time where the iterations ran: parloop's chunk
    # records (engines), and spin timed inside Pool's workers and on the engines
    # by raw ipyparallel -- to tell a worker's speed from the dispatch's
    per_iteration: dict[str, list[float]] = {"parloop": [], "pool": [], "dview": []}
    walls: dict[str, list[float]] = {"parloop": [], "pool": [], "dview": []}

    def parloop_run() -> float:
        import parloop

        dt = run_cell(ip, "%%parallel processes=2 progress=off\n" + cell)
        per_iteration["parloop"] += [c.seconds / c.count for c in parloop.last_run.chunks]
        walls["parloop"].append(dt)
        return dt

    def timed(name: str, mapper) -> float:
        t0 = time.perf_counter()
        per_iteration[name] += list(mapper(work.timed_spin, args))
        dt = time.perf_counter() - t0
        walls[name].append(dt)
        return dt

    variants = [
        Variant("serial", lambda: run_cell(ip, cell)),
        Variant("%%parallel processes=2", parloop_run, True),
        # n travels as an argument: workers that re-import the module (loky,
        # spawn, engines) must do the same work as the kernel calibrated
        Variant(
            "multiprocessing.Pool(2).map",
            lambda: timed("pool", p.pool.map),
            note="spin timed in the workers",
        ),
        Variant(
            "ProcessPoolExecutor(2).map (fork)",
            lambda: _timed(lambda: list(p.ppe.map(work.spin, args))),
        ),
        Variant(
            "ProcessPoolExecutor(2).map (spawn)",
            lambda: _timed(lambda: list(p.spe.map(work.spin, args))),
        ),
        Variant(
            "joblib.Parallel(n_jobs=2)",
            lambda: _timed(lambda: p.par(p.delayed(work.spin)(n) for _ in range(32))),
        ),
        Variant(
            "deco @concurrent(processes=2)",
            lambda: _timed(lambda: work.spin_all_deco(n, 32)),
            note="one Pool.apply_async per iteration, into a dict",
        ),
        Variant(
            "tqdm process_map(max_workers=2)",
            lambda: _timed(lambda: _process_map(work.spin, args)),
            note="starts its own ProcessPoolExecutor (fork) in every call",
        ),
        Variant(
            "ipyparallel DirectView.map_sync",
            lambda: timed("dview", p.dview.map_sync),
            note="same engines as parloop; 16 + 16, static; spin timed on the engines",
        ),
        Variant(
            "ipyparallel LoadBalancedView.map",
            lambda: _timed(lambda: p.lview.map_sync(work.spin, args)),
            note="same engines as parloop",
        ),
    ]
    try:
        res = measure(f"W1 CPU: 32 × ~60 ms pure Python (spin({n}))", variants, rounds)
    finally:
        p.stop()
    med = {k: statistics.median(v) for k, v in per_iteration.items() if v}
    eff = {k: statistics.median(walls[k]) / (16 * med[k]) for k in med}
    names = {
        "parloop": "%%parallel (engines)",
        "pool": "Pool(2) workers",
        "dview": "DirectView (the same engines)",
    }
    res.extra.append(
        "\nWhere the time goes: the median compute time of one iteration where it ran — "
        + ", ".join(f"{names[k]} {med[k] * 1000:.1f} ms" for k in med)
        + "; and the dispatch's efficiency, median wall ÷ (16 iterations per worker × "
        "that time), 1.0 being perfect: " + ", ".join(f"{names[k]} {eff[k]:.3f}" for k in eff) + "."
    )
    return res


def tiny(ip, rounds: int) -> Result:
    """W2: 200 000 × ``out[i] = i * i + 1``.  The peers that send one task per
    item (default chunksize 1) are timed on fewer items and scaled up."""
    full = 200_000
    ip.run_cell("out = {}", store_history=False)
    run_cell(ip, "%%parallel processes=2 progress=off\nfor i in range(2):\n    out[i] = i")
    cell = "for i in range(200_000):\n    out[i] = i * i + 1\n"
    p = _peers()
    work.tiny_all_deco(4)  # deco makes its pool at the first call
    few, scale_note = 2_000, "timed on 2 000 items, × 100"

    def ppe_map(ex):
        return lambda k: dict(enumerate(ex.map(work.tiny, range(k))))

    variants = [
        Variant("serial", lambda: run_cell(ip, cell)),
        Variant(
            "%%parallel processes=2",
            lambda: run_cell(ip, "%%parallel processes=2 progress=off\n" + cell),
            True,
        ),
        Variant(
            "%%threaded threads=2",
            lambda: run_cell(ip, "%%threaded threads=2 progress=off\n" + cell),
            True,
        ),
        Variant(
            "multiprocessing.Pool(2).map",
            lambda: _timed(lambda: dict(enumerate(p.pool.map(work.tiny, range(full))))),
            note="default chunksize",
        ),
        Variant(
            "ProcessPoolExecutor(2).map (fork)",
            _scaled(ppe_map(p.ppe), few, full),
            note=f"default chunksize=1; {scale_note}",
        ),
        Variant(
            "ProcessPoolExecutor(2).map (spawn)",
            _scaled(ppe_map(p.spe), few, full),
            note=f"default chunksize=1; {scale_note}",
        ),
        Variant(
            "joblib.Parallel(n_jobs=2)",
            lambda: _timed(
                lambda: dict(enumerate(p.par(p.delayed(work.tiny)(i) for i in range(full))))
            ),
            note="default batch_size=auto",
        ),
        Variant(
            "deco @concurrent(processes=2)",
            _scaled(work.tiny_all_deco, few, full),
            note=f"one Pool.apply_async per iteration; {scale_note}",
        ),
        # a new pool per call: scaled from 20 000 items, its start (~20 ms)
        # is multiplied by 10 only
        Variant(
            "tqdm process_map(max_workers=2)",
            _scaled(lambda k: dict(enumerate(_process_map(work.tiny, range(k)))), 20_000, full),
            note="default chunksize=1, its own fork pool per call; timed on 20 000 "
            "items, × 10; one run",
            max_runs=1,
        ),
        Variant(
            "ipyparallel DirectView.map_sync",
            lambda: _timed(lambda: dict(enumerate(p.dview.map_sync(work.tiny, range(full))))),
            note="same engines as parloop; two halves",
        ),
        # ~3 ms a task on this machine: 1 000 items already take 3 s
        Variant(
            "ipyparallel LoadBalancedView.map",
            _scaled(lambda k: dict(enumerate(p.lview.map_sync(work.tiny, range(k)))), 1_000, full),
            note="same engines; default chunksize=1; timed on 1 000 items, × 200; one run",
            max_runs=1,
        ),
    ]
    try:
        return measure("W2 tiny: 200 000 × out[i] = i*i + 1", variants, rounds)
    finally:
        p.stop()


def big_input(ip, rounds: int) -> Result:
    """W4: a 200 MB array read by 16 iterations; then the same cell with the
    array unchanged."""
    import numpy as np  # noqa: F401

    run_cell(ip, "%%parallel processes=2 progress=off\nfor i in range(2):\n    pass")
    from parloop.backends.engines.cluster import MANAGER

    rc = MANAGER.client(processes=2)
    dview = rc[:]
    cell = (
        "%%parallel processes=2 progress=off\nfor i in range(16):\n"
        "    part[i] = float(big[i::16].sum())\n"
    )
    fresh = [0]

    def first() -> float:
        fresh[0] += 1
        ip.run_cell(
            f"import numpy as np\nbig = np.full(25_000_000, {fresh[0]}.0)\npart = {{}}",
            store_history=False,
        )
        return run_cell(ip, cell)

    def second() -> float:
        return run_cell(ip, cell)

    def raw_push() -> float:
        arr = ip.user_ns["big"]
        return _timed(lambda: dview.push({"big": arr}, block=True))

    sent: dict[str, list[tuple[int, int]]] = {"first": [], "second": []}

    def bytes_sent() -> tuple[int, int]:
        """(bytes over the sockets, bytes copied into shared memory) by the last broadcast."""
        from parloop.backends.engines.backend import CLIENTS

        last = [s.transport.last for s in CLIENTS.values() if s.transport.last is not None]
        return sum(s.bytes for s in last), sum(s.shm_bytes for s in last)

    def first_counted() -> float:
        dt = first()
        sent["first"].append(bytes_sent())
        return dt

    def second_counted() -> float:
        dt = second()
        sent["second"].append(bytes_sent())
        return dt

    variants = [
        Variant("%%parallel, new 200 MB array", first_counted, True),
        Variant("%%parallel, same array again", second_counted, True),
        Variant("raw ipyparallel DirectView.push (2 engines)", raw_push),
    ]
    res = measure("W4 big input: 200 MB float64 array read by 16 iterations", variants, rounds)

    def mib(which: str, i: int) -> float:
        return max(s[i] for s in sent[which]) / 2**20

    res.extra.append(
        f"\nPer cell, new array: {mib('first', 0):.2f} MiB over the sockets, "
        f"{mib('first', 1):.0f} MiB into shared memory (once for both engines); "
        f"unchanged array: {mib('second', 0):.2f} MiB over the sockets, "
        f"{mib('second', 1):.0f} MiB into shared memory."
    )
    return res


def warm_cell(ip, rounds: int) -> Result:
    """W5 (warm): a one-iteration cell on warm engines, against the same cell
    run serially."""
    ip.run_cell("out = {}", store_history=False)
    run_cell(ip, "%%parallel processes=2 progress=off\nfor i in range(2):\n    out[i] = i")
    variants = [
        Variant("serial", lambda: run_cell(ip, "for i in range(1):\n    out[i] = i\n")),
        Variant(
            "%%parallel processes=2",
            lambda: run_cell(
                ip, "%%parallel processes=2 progress=off\nfor i in range(1):\n    out[i] = i\n"
            ),
            True,
        ),
        Variant(
            "%%threaded",
            lambda: run_cell(ip, "%%threaded progress=off\nfor i in range(1):\n    out[i] = i\n"),
            True,
        ),
    ]
    return measure("W5 warm one-iteration cell", variants, max(rounds, 10))


def cold_start(ip, rounds: int) -> Result:
    """W5 (cold): from no cluster at all to the first committed iteration."""
    ip.run_cell("out = {}", store_history=False)

    def cold() -> float:
        ip.run_cell("%parallel_stop", store_history=False, silent=True)
        return run_cell(
            ip, "%%parallel processes=2 progress=off\nfor i in range(1):\n    out[i] = i\n"
        )

    return measure(
        "W5 cold start: no cluster → first committed iteration (2 engines)",
        [Variant("%%parallel processes=2, cluster stopped before", cold, True)],
        max(1, min(rounds, 3)),
    )


def million(ip, rounds: int) -> Result:
    """A 1 000 000-iteration loop with a reduction: the kernel's extra memory
    while it runs (chunks handed out but not committed are bounded)."""
    from .workloads_async import PeakRSS

    ip.run_cell("total = 0", store_history=False)
    peaks: dict[str, float] = {}

    def variant(name: str, cell: str):
        def run() -> float:
            ip.run_cell("total = 0", store_history=False)
            with PeakRSS() as rss:
                dt = run_cell(ip, cell)
            peaks[name] = max(peaks.get(name, 0.0), rss.extra_mb)
            return dt

        return Variant(name, run, True)

    body = "for i in range(1_000_000):\n    total += i % 7\n"
    res = measure(
        "1 000 000 iterations (`total += i % 7`): time and the kernel's extra memory",
        [
            variant(
                "%%parallel processes=2 chunksize=20000",
                "%%parallel processes=2 chunksize=20000 progress=off\n" + body,
            ),
            variant(
                "%%threaded threads=2 chunksize=20000",
                "%%threaded threads=2 chunksize=20000 progress=off\n" + body,
            ),
            variant(
                "%%parallel processes=2 (auto: runs natively)",
                "%%parallel processes=2 progress=off\n" + body,
            ),
        ],
        max(1, min(rounds, 3)),
    )
    res.extra.append(
        "\nPeak extra resident memory of the kernel: "
        + ", ".join(f"{k}: {v:.1f} MB" for k, v in peaks.items())
        + "."
    )
    return res
