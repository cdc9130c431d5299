"""Issue 15's workloads on Dask: W1 (CPU-bound) and W2 (tiny iterations) under
``%%parallel dask`` against ``client.map`` / ``client.submit`` on the same
workers and joblib's dask backend, W1 under ``%%parallel ray`` against
``ray.remote`` tasks, and W7 (scheduler throughput, ``out[i] = i``) on 2 and 16
Dask workers.

The cluster is the notebook's own: a ``LocalCluster`` of 1-thread worker
processes on 127.0.0.1 with a default client, as a user would make it."""

from __future__ import annotations

import logging
import time

from . import work
from .harness import Result, Variant, measure, run_cell
from .workloads_engines import _scaled, _timed


def _cluster(n: int):
    import distributed

    from parloop.backends.dask import _spawnable_main

    _spawnable_main()  # the nannies' spawn reads __main__.__spec__ (IPython's has none)
    cluster = distributed.LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(cluster)  # the default client: %%parallel dask uses it
    client.wait_for_workers(n, timeout=300)
    return cluster, client


def dask_cpu(ip, rounds: int) -> Result:
    """W1 on Dask: 32 iterations of ~60 ms pure Python on 2 workers."""
    import joblib

    n = work.calibrate()
    ip.run_cell(work.CPU_SOURCE + f"\nSPIN = {n}\nout = {{}}", store_history=False)
    cell = "for i in range(32):\n    out[i] = spin(SPIN)\n"
    cluster, client = _cluster(2)
    try:
        run_cell(ip, "%%parallel dask progress=off\nfor i in range(2):\n    out[i] = i")
        client.gather(client.map(work.spin, [1000] * 4, pure=False))
        args = [n] * 32

        def submit_all() -> float:
            return _timed(
                lambda: client.gather([client.submit(work.spin, a, pure=False) for a in args])
            )

        def joblib_dask() -> float:
            with joblib.parallel_config(backend="dask"):
                return _timed(lambda: joblib.Parallel()(joblib.delayed(work.spin)(a) for a in args))

        variants = [
            Variant("serial", lambda: run_cell(ip, cell)),
            Variant(
                "%%parallel dask",
                lambda: run_cell(ip, "%%parallel dask progress=off\n" + cell),
                True,
            ),
            Variant(
                "client.map",
                lambda: _timed(lambda: client.gather(client.map(work.spin, args, pure=False))),
                note="same workers; one task per item",
            ),
            Variant("client.submit", submit_all, note="same workers; one submit per item"),
            Variant("joblib dask backend", joblib_dask, note="same workers"),
        ]
        res = measure(f"W1 CPU on Dask: 32 × ~60 ms pure Python (spin({n}))", variants, rounds)
    finally:
        client.close()
        cluster.close()
    return res


def ray_cpu(ip, rounds: int) -> Result:
    """W1 on Ray: ``%%parallel ray`` on the notebook's own Ray (2 CPUs)
    against ``ray.remote`` tasks, one per item, on the same Ray."""
    import ray

    n = work.calibrate()
    ip.run_cell(work.CPU_SOURCE + f"\nSPIN = {n}\nout = {{}}", store_history=False)
    cell = "for i in range(32):\n    out[i] = spin(SPIN)\n"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_cell(ip, "%%parallel ray progress=off\nfor i in range(2):\n    out[i] = i")
        spin = ray.remote(work.spin)
        ray.get([spin.remote(1000) for _ in range(4)])
        args = [n] * 32
        variants = [
            Variant("serial", lambda: run_cell(ip, cell)),
            Variant(
                "%%parallel ray", lambda: run_cell(ip, "%%parallel ray progress=off\n" + cell), True
            ),
            Variant(
                "ray.remote tasks",
                lambda: _timed(lambda: ray.get([spin.remote(a) for a in args])),
                note="same Ray; one task per item",
            ),
        ]
        res = measure(f"W1 CPU on Ray: 32 × ~60 ms pure Python (spin({n}))", variants, rounds)
    finally:
        ray.shutdown()
    return res


def dask_tiny(ip, rounds: int) -> Result:
    """W2 on Dask: 200 000 × ``out[i] = i * i + 1``."""
    import joblib

    full, few = 200_000, 2_000
    ip.run_cell("out = {}", store_history=False)
    cell = "for i in range(200_000):\n    out[i] = i * i + 1\n"
    cluster, client = _cluster(2)
    try:
        run_cell(ip, "%%parallel dask progress=off\nfor i in range(2):\n    out[i] = i")

        def cmap(k: int):
            return dict(enumerate(client.gather(client.map(work.tiny, range(k), pure=False))))

        def joblib_dask(k: int):
            with joblib.parallel_config(backend="dask"):
                return dict(
                    enumerate(joblib.Parallel()(joblib.delayed(work.tiny)(i) for i in range(k)))
                )

        variants = [
            Variant("serial", lambda: run_cell(ip, cell)),
            Variant(
                "%%parallel dask",
                lambda: run_cell(ip, "%%parallel dask progress=off\n" + cell),
                True,
            ),
            Variant(
                "client.map",
                _scaled(cmap, few, full),
                note="one task per item; timed on 2 000 items, × 100",
            ),
            Variant(
                "joblib dask backend",
                _scaled(joblib_dask, 20_000, full),
                note="default batch_size=auto; timed on 20 000 items, × 10",
            ),
        ]
        res = measure("W2 tiny on Dask: 200 000 × out[i] = i*i + 1", variants, rounds)
    finally:
        client.close()
        cluster.close()
    return res


def dask_throughput(ip, rounds: int) -> Result:
    """W7 on Dask: iterations per second of ``out[i] = i`` through
    ``%%parallel dask`` with fixed chunks, on 2 and 16 workers."""
    merged = Result("W7 throughput on Dask: `out[i] = i` on workers that do nothing")
    for n in (2, 16):
        t0 = time.perf_counter()
        cluster, client = _cluster(n)
        started = time.perf_counter() - t0
        try:
            ip.run_cell("out = {}", store_history=False)
            run_cell(
                ip, f"%%parallel dask progress=off\nfor i in range({4 * n}):\n    out[i] = i\n"
            )
            k = 200_000
            variants = [
                Variant(
                    f"{n} workers: %%parallel dask chunksize={c}, {k} iterations",
                    lambda c=c, k=k: run_cell(
                        ip,
                        f"%%parallel dask progress=off chunksize={c}\n"
                        f"for i in range({k}):\n    out[i] = i\n",
                    ),
                    True,
                    note="",
                )
                for c in (1000, 10_000)
            ]
            res = measure(merged.workload, variants, rounds)
            for name, runs in res.rows.items():
                merged.rows[name] = runs
                merged.parloop.add(name)
                best = min(runs)
                merged.notes[name] = (
                    f"{k / sorted(runs)[len(runs) // 2]:,.0f} it/s (best {k / best:,.0f})"
                )
            merged.other_cores = max(merged.other_cores, res.other_cores)
            merged.extra.append(f"\nStarting the LocalCluster of {n} workers took {started:.1f} s.")
        finally:
            client.close()
            cluster.close()
    return merged
