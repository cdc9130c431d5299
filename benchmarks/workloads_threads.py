"""Workloads of the core issue: %%threaded on waiting iterations, threads=auto,
and the cost of the rewrite and replay on a CPU-bound body (``serial`` flag)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from .harness import Result, Variant, measure, run_cell


def io_sleep(ip, rounds: int) -> Result:
    """W3: 100 iterations of time.sleep(0.1)."""
    ip.run_cell("import time\nout = {}", store_history=False)

    def serial() -> float:
        return run_cell(ip, "for i in range(100):\n    time.sleep(0.1)\n    out[i] = i")

    def pool16() -> float:
        t0 = time.perf_counter()

        def work(i):
            time.sleep(0.1)
            return i

        with ThreadPoolExecutor(16) as ex:
            res = dict(enumerate(ex.map(work, range(100))))
        assert len(res) == 100
        return time.perf_counter() - t0

    def threaded(opts: str):
        def run() -> float:
            return run_cell(
                ip,
                f"%%threaded {opts} progress=off\n"
                "for i in range(100):\n    time.sleep(0.1)\n    out[i] = i",
            )

        return run

    variants = [
        Variant("ThreadPoolExecutor(16).map", pool16),
        Variant("%%threaded threads=16", threaded("threads=16"), True),
        Variant("%%threaded threads=auto", threaded(""), True),
    ]
    if rounds > 1:
        variants.insert(0, Variant("serial", serial))
    res = measure("W3 IO: 100 × time.sleep(0.1)", variants, rounds)
    import parloop

    run_cell(
        ip, "%%threaded progress=off\nfor i in range(100):\n    time.sleep(0.1)\n    out[i] = i"
    )
    t = parloop.last_run.threads
    res.extra.append(
        f"\n`threads=auto` chose {t.get('threads')} threads "
        f"(T1 = {t.get('t1', 0) * 1e6:.0f} µs CPU, T2 = {t.get('t2', 0):.3f} s "
        f"waiting, N = {t.get('cores')} cores)."
    )
    return res


CPU_SETUP = """
def burn(n):
    s = 0
    for k in range(n):
        s += k * k % 7
    return s
out = {}
"""


def cpu_overhead(ip, rounds: int) -> Result:
    """The rewrite and replay's cost: a CPU-bound body of ~1.5 ms per iteration,
    plain serial loop against the same loop under the ``serial`` flag."""
    ip.run_cell(CPU_SETUP, store_history=False)
    body = "for i in range(400):\n    out[i] = burn(20000)\n"
    variants = [
        Variant("serial", lambda: run_cell(ip, body)),
        Variant(
            "%%threaded serial",
            lambda: run_cell(ip, "%%threaded serial progress=off\n" + body),
            True,
        ),
        Variant(
            "%%threaded threads=2",
            lambda: run_cell(ip, "%%threaded threads=2 progress=off\n" + body),
            True,
        ),
    ]
    return measure("CPU-bound body, 400 × ~1.5 ms (rewrite + replay overhead)", variants, rounds)
