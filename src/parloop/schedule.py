"""Chunk sizes and worker counts, from measured iteration times (DESIGN §5).

Backend-independent: the dispatch loop in :mod:`parloop.run` asks a
:class:`ChunkSizer` how big the next chunk should be and a :class:`ThreadCount`
how many chunks may be in flight.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

#: Aim for chunks of about this many seconds: long enough that dispatch and
#: commit costs vanish, short enough that the load stays balanced.
TARGET_CHUNK_SECONDS = 0.1
#: ...but never cut chunks shorter than this near the end: a chunk's round
#: trip costs milliseconds, so finishing "together" at finer grain than this
#: costs more than it saves (measured: 200 000 tiny iterations spent most of
#: their time in a tail of 40 ever smaller chunks)
MIN_CHUNK_SECONDS = 0.02


@dataclass
class ChunkSizer:
    """``chunksize=auto``: small first chunks while nothing is measured, then
    chunks of about TARGET_CHUNK_SECONDS, smaller again near the end so that
    the workers finish together.  A fixed ``chunksize=N`` is used as given."""

    fixed: int | None
    workers: int
    total: int | None
    iterations: int = 0
    seconds: float = 0.0
    probes: int = 0

    def observe(self, n: int, seconds: float) -> None:
        if n > 0:
            self.iterations += n
            self.seconds += seconds

    @property
    def per_iteration(self) -> float | None:
        if not self.iterations:
            return None
        return self.seconds / self.iterations

    def next_size(self, remaining: int | None) -> int:
        if self.fixed is not None:
            size = self.fixed
        else:
            t = self.per_iteration
            if t is None:
                # nothing measured yet: one iteration per worker, then grow
                self.probes += 1
                size = 1 if self.probes <= self.workers else min(2 ** (self.probes // self.workers), 64)
            else:
                size = max(1, int(TARGET_CHUNK_SECONDS / max(t, 1e-9)))
                if remaining is not None:
                    # near the end: at most a share of what is left per worker,
                    # but not below MIN_CHUNK_SECONDS of work
                    share = math.ceil(remaining / (2 * self.workers))
                    floor = max(1, int(MIN_CHUNK_SECONDS / max(t, 1e-9)))
                    size = min(size, max(share, floor))
        if remaining is not None:
            size = min(size, remaining)
        return max(1, size)


@dataclass
class ThreadCount:
    """``threads=auto``: the thread-count formula TC = N × (T1 + T2) / T1, with
    N cores, T1 an iteration's CPU time (``time.thread_time``) and T1 + T2 its
    wall time, measured on the first iterations."""

    cores: int
    cap: int
    cpu: float = 0.0
    wall: float = 0.0
    iterations: int = 0

    def observe(self, n: int, cpu: float, wall: float) -> None:
        if n > 0:
            self.iterations += n
            self.cpu += cpu
            self.wall += wall

    @property
    def measured(self) -> bool:
        return self.iterations > 0

    @property
    def t1(self) -> float:
        return self.cpu / max(self.iterations, 1)

    @property
    def t2(self) -> float:
        return max(self.wall - self.cpu, 0.0) / max(self.iterations, 1)

    def threads(self) -> int:
        if not self.measured:
            return self.cores
        t1 = max(self.t1, 1e-6)
        tc = self.cores * (t1 + self.t2) / t1
        return max(1, min(self.cap, math.ceil(tc)))


def cpu_count() -> int:
    """Cores this process may use (affinity-aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1
