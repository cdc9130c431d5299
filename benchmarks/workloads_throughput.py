"""W7: scheduler throughput.  How many iterations per second the kernel side
of %%parallel hands out and commits when the engines do (next to) nothing:
``out[i] = i`` on 2, 16 and 64 engines, with fixed chunk sizes and with
``chunksize=auto``.  The goal of the issue: at least 50 000 iterations/s with
64 engines.  For comparison, raw ipyparallel ``LoadBalancedView.map`` of a
no-op with the same chunk size on the same engines.

Each case's loop length K is sized so that its steady part lasts about a
second (the sizing runs are the warm-up and are not timed); the rate is
K / median, and, for %%parallel, also K / (median - the latency row's median):
the fixed cost of a cell (one iteration per engine) grows with the engines.
Starting 64 engines on a 2-core machine takes a minute or more; the resize
times are reported under the table.  The cluster is stopped at the end."""

from __future__ import annotations

import statistics
import time
from typing import Any

from . import work
from .harness import Result, Variant, measure, run_cell

ENGINES = (2, 16, 64)
CHUNKS: tuple[int | None, ...] = (100, 1000, None)  # None: chunksize=auto
LBV_CHUNKS = (100, 1000)
TARGET_SECONDS = 1.0
GOAL = 50_000  # iterations/s with 64 engines
K_MIN, K_MAX = 20_000, 2_000_000


def _size(run_k, k0: int) -> int:
    """The loop length K whose steady part lasts about TARGET_SECONDS under
    ``run_k``: a warm-up run, then runs of growing length until one lasts
    half the target; K from the marginal rate between the last two (a run
    also pays a fixed per-cell cost, large with many engines)."""
    run_k(k0)  # warm-up (first use of these engines by this peer)
    points = [(k0, run_k(k0))]
    while len(points) < 2 or (points[-1][1] < TARGET_SECONDS / 2 and points[-1][0] < K_MAX):
        k = min(K_MAX, points[-1][0] * 4)
        points.append((k, run_k(k)))
    (ka, ta), (kb, tb) = points[-2], points[-1]
    rate = (kb - ka) / (tb - ta) if tb > ta else kb / tb
    k = max(k0, min(K_MAX, int(rate * TARGET_SECONDS)))
    mag = 10 ** max(len(str(k)) - 2, 0)  # two significant digits
    return k // mag * mag


def _fmt(x: float) -> str:
    return f"{x:,.0f}".replace(",", " ")


def throughput(ip, rounds: int) -> Result:
    import parloop
    from parloop.backends.engines.cluster import MANAGER

    merged = Result("W7 scheduler throughput: `out[i] = i` on engines that do nothing")
    resize: dict[int, float] = {}
    info: dict[str, dict] = {}  # row -> K, max_outstanding, native, chunks
    best64 = best64_steady = 0.0
    try:
        for n in ENGINES:
            t0 = time.perf_counter()
            MANAGER.client(processes=n, timeout=900)
            resize[n] = time.perf_counter() - t0
            ip.run_cell("out = {}", store_history=False)
            run_cell(
                ip,
                f"%%parallel processes={n} progress=off\n"
                f"for i in range({4 * n}):\n    out[i] = i\n",
            )
            # the fixed cost of a cell on n engines: one iteration per engine
            lat_name = f"{n} engines: %%parallel, {n} iterations, chunksize=1 (latency)"
            variants = [
                Variant(
                    lat_name,
                    lambda n=n: run_cell(
                        ip,
                        f"%%parallel processes={n} progress=off chunksize=1\n"
                        f"for i in range({n}):\n    out[i] = i\n",
                    ),
                    True,
                )
            ]
            for c in CHUNKS:
                name = f"{n} engines: %%parallel chunksize={c or 'auto'}"
                row = info.setdefault(name, {"max_outstanding": 0, "native": False, "chunks": 0})
                opts = f"processes={n} progress=off" + (f" chunksize={c}" if c else "")

                def run_k(k: int, opts: str = opts, row: dict = row) -> float:
                    ip.run_cell("out = {}", store_history=False)  # not timed
                    dt = run_cell(ip, f"%%parallel {opts}\nfor i in range({k}):\n    out[i] = i\n")
                    last = parloop.last_run
                    assert len(ip.user_ns["out"]) == k and last.done == k
                    row["max_outstanding"] = max(row["max_outstanding"], last.max_outstanding)
                    row["native"] = row["native"] or last.native
                    row["chunks"] = len(last.chunks)
                    return dt

                k = _size(run_k, K_MIN)
                row["K"] = k
                row["max_outstanding"] = 0
                variants.append(Variant(name, lambda run_k=run_k, k=k: run_k(k), True))
            rc = MANAGER.client(processes=n)
            lview = rc.load_balanced_view()
            for c in LBV_CHUNKS:
                name = f"{n} engines: ipyparallel LoadBalancedView.map chunksize={c}"

                def lbv_k(k: int, c: int = c, lview: Any = lview, rc: Any = rc) -> float:
                    t0 = time.perf_counter()
                    out = dict(enumerate(lview.map_sync(work.echo, range(k), chunksize=c)))
                    dt = time.perf_counter() - t0
                    assert len(out) == k
                    # not timed: the client's cache (after the serve tasks of the
                    # %%parallel runs before, which end once their engines hear the
                    # run is over: many engines on 2 cores take a moment)
                    rc.wait(timeout=60)
                    rc.purge_local_results("all")
                    return dt

                k = _size(lbv_k, 20 * c)
                info[name] = {"K": k}
                variants.append(Variant(name, lambda lbv_k=lbv_k, k=k: lbv_k(k)))
            res = measure(merged.workload, variants, rounds)
            merged.rows.update(res.rows)
            merged.other_cores = max(merged.other_cores, res.other_cores)
            latency = statistics.median(res.rows[lat_name])
            merged.notes[lat_name] = "the per-cell cost the rates below also pay"
            for v in variants[1:]:
                med = statistics.median(res.rows[v.name])
                row = info[v.name]
                rate = row["K"] / med
                note = f"K = {_fmt(row['K'])}: **{_fmt(rate)} it/s**"
                if "chunks" in row:
                    if row["native"]:
                        note += (
                            " — ran natively in the kernel (parloop.last_run.native),"
                            " not scheduler throughput"
                        )
                    else:
                        steady = row["K"] / (med - latency) if med > latency else float("nan")
                        note += (
                            f"; {_fmt(steady)} it/s less the latency row; "
                            f"{_fmt(row['chunks'])} chunks; max outstanding "
                            f"{_fmt(row['max_outstanding'])} iterations"
                        )
                        if n == 64 and "auto" not in v.name:
                            best64 = max(best64, rate)
                            best64_steady = max(best64_steady, steady)
                merged.notes[v.name] = note
    finally:
        ip.run_cell("%parallel_stop", store_history=False, silent=True)
    merged.extra.append("")
    merged.extra.append(
        "Loop lengths K sized for ~1 s of steady running (the sizing runs are the "
        "warm-up); rate = K / median, and for %%parallel K / (median − the latency row's "
        'median). "max outstanding": the most iterations handed out but not yet '
        "committed (`parloop.last_run.max_outstanding`, max over the timed runs), the "
        "kernel's memory bound. LoadBalancedView: `map_sync` of a no-op returning its "
        "argument, results into a dict. Engines that do nothing, on the same machine as "
        "the kernel: they, the controller and the kernel share its cores."
    )
    merged.extra.append("")
    merged.extra.append(
        "Growing the managed cluster (warm, before timing): "
        + ", ".join(f"to {n} engines {resize[n]:.1f} s" for n in ENGINES if n in resize)
        + "."
    )
    if best64:
        merged.extra.append("")
        merged.extra.append(
            f"Goal ≥ {_fmt(GOAL)} it/s with 64 engines, best fixed chunk size: "
            f"{_fmt(best64)} it/s over the whole cell "
            f"({'met' if best64 >= GOAL else 'not met'}), {_fmt(best64_steady)} it/s "
            f"less the per-cell latency ({'met' if best64_steady >= GOAL else 'not met'})."
        )
    return merged
