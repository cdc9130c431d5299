"""Workloads of the coroutine issue: loop bodies that await, as asyncio tasks."""

from __future__ import annotations

import asyncio
import threading
import time

from .harness import Result, Variant, measure, run_cell


class PeakRSS:
    """Peak resident memory of this process above its level at the start,
    sampled every 5 ms in a thread (the kernel's extra memory)."""

    def __enter__(self) -> "PeakRSS":
        import psutil

        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def sleep_tasks(ip, rounds: int) -> Result:
    """1000 iterations of ``await asyncio.sleep(0.1)``."""
    ip.run_cell("import asyncio, time\nout = {}", store_history=False)
    cell = "for i in range(1000):\n    await asyncio.sleep(0.1)\n    out[i] = i\n"

    def gather() -> float:
        async def one(i):
            await asyncio.sleep(0.1)
            return i

        t0 = time.perf_counter()

        async def main():
            return await asyncio.gather(*(one(i) for i in range(1000)))

        res = dict(enumerate(asyncio.run(main())))
        assert len(res) == 1000
        return time.perf_counter() - t0

    variants = [
        Variant("asyncio.gather of 1000 coroutines", gather),
        Variant(
            "%%threaded tasks=1000",
            lambda: run_cell(ip, "%%threaded tasks=1000 progress=off\n" + cell),
            True,
        ),
        Variant(
            "%%threaded (tasks=100, the default)",
            lambda: run_cell(ip, "%%threaded progress=off\n" + cell),
            True,
        ),
    ]
    res = measure("Coroutines: 1000 × await asyncio.sleep(0.1)", variants, rounds)
    t16 = run_cell(
        ip,
        "%%threaded threads=16 progress=off\nfor i in range(1000):\n"
        "    time.sleep(0.1)\n    out[i] = i\n",
    )
    res.extra.append(
        f"\nFor comparison, the same loop with `time.sleep(0.1)` under "
        f"`%%threaded threads=16`: {t16:.2f} s (one run)."
    )
    return res


def task_memory(ip, rounds: int) -> Result:
    """10 000 iterations with tasks=1000: the kernel's extra memory."""
    ip.run_cell("import asyncio\nout = {}", store_history=False)
    cell = (
        "%%threaded tasks=1000 progress=off\nfor i in range(10_000):\n"
        "    await asyncio.sleep(0.01)\n    out[i] = i\n"
    )
    peaks: list[float] = []

    def run() -> float:
        ip.run_cell("out = {}", store_history=False)
        with PeakRSS() as rss:
            dt = run_cell(ip, cell)
        peaks.append(rss.extra_mb)
        return dt

    res = measure(
        "Coroutines: 10 000 iterations, tasks=1000",
        [Variant("%%threaded tasks=1000", run, True)],
        rounds,
    )
    res.extra.append(
        f"\nPeak extra resident memory of the kernel while it ran: "
        f"{max(peaks):.1f} MB (max over {len(peaks)} runs; the result dict "
        f"itself included)."
    )
    return res
