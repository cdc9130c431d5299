"""Chunk sizes and worker counts, from measured iteration times (docs/design.md §5).

Backend-independent: the dispatch loop in :mod:`parloop.run` asks a
:class:`ChunkSizer` how big the next chunk should be and a :class:`ThreadCount`
how many chunks may be in flight.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

from .backends.base import Backend
from .log.commit import Chunk, Committer, ErrorRecord, Interrupted, IterationFailed
from .options import Options
from .record import LastRun, WorkerState
from .runtime import ChunkResult

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
    target: float = TARGET_CHUNK_SECONDS
    first_share: bool = False
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
            share = (
                max(1, math.ceil(self.total / (4 * self.workers)))
                if self.total is not None and self.first_share
                else None
            )
            if share is not None and (t is None or t * share <= 4 * self.target):
                # the length known: a quarter of each worker's part per chunk, as
                # multiprocessing.Pool.map does -- workers whose tasks cost
                # milliseconds (engines) can afford neither probing nor a long
                # tail of small chunks; guided sizes take over only when such
                # chunks would run longer than a second
                size = share
            elif t is None:
                # nothing measured yet: one iteration per worker, then grow
                self.probes += 1
                size = (
                    1
                    if self.probes <= self.workers
                    else min(2 ** (self.probes // self.workers), 64)
                )
            else:
                size = max(1, int(self.target / max(t, 1e-9)))
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


#: at most this many iterations may be handed out beyond the last committed one
#: (bounds the kernel's memory when one chunk is slow and the others race ahead)
WINDOW_CHUNKS = 2


#: chunks last at least this many times the per-chunk fingerprint cost
WATCH_SHARE = 10.0

#: speculative loops: chunks grow from one iteration, doubling, until this
#: many iterations have been checked at commit (see dispatch)
RAMP_CHECKED = 16

#: seconds between two readings of the workers' live state
LIVE_PERIOD = 0.2


def _live_state(
    record: LastRun,
    running: dict[int, tuple[str, int]],
    chunks: dict[int, Chunk],
    committer: Committer,
) -> None:
    """Per-worker rows of the live view from the backend's running chunks:
    ``{chunk start: (worker, iterations done in it so far)}``."""
    for w in record.live.values():
        w.current = None
        w.partial = 0
    for start, (worker, n) in running.items():
        found = record.live.get(worker)
        if found is None:
            found = record.live[worker] = WorkerState(worker)
        w = found
        chunk = chunks.get(start)
        w.current = start + n
        if chunk is not None and n < len(chunk.items):
            w.current_values = committer.targets.describe(chunk.items[n])
        w.partial = n


class Progress:
    """What a run tells a live view (the text bar, the widget).

    ``start`` before the first iteration, ``update`` at most about ten times
    a second while the run goes (``record.live`` holds the per-worker rows
    when ``wants_live`` is true), ``close`` once, however the run ended, with
    the record complete (wall time, errors, interrupt)."""

    wants_live = False

    def start(self, record: LastRun) -> None: ...

    def update(self, record: LastRun) -> None: ...

    def close(self, record: LastRun) -> None: ...


def make_taker(iterable: Any, is_async: bool) -> Any:
    """The object that cuts chunks from the loop's iterable."""
    if is_async:
        from .backends.tasks import AsyncTaker

        return AsyncTaker(iterable)
    return Taker(iterable)


def dispatch(  # noqa: C901
    backend: Backend,
    take: Any,
    total: int | None,
    opts: Options,
    committer: Committer,
    record: LastRun,
    progress: Progress,
    threads: ThreadCount | None,
    start: int = 0,
    measured: tuple[int, float, float] | None = None,
) -> None:
    """Hand chunks out, keep the workers fed, commit contiguous prefixes as
    they complete; stop early on an error (on_error=raise) or an interrupt.

    ``start``: iterations before it already ran (natively, see parloop.native);
    ``measured``: (iterations, wall s, CPU s) they took, so sizing starts
    from a measurement rather than from probing chunks."""
    # a backend may size its own chunks (asyncio tasks: a chunk is a batch of
    # concurrent iterations, not a stretch of work)
    sizer = ChunkSizer(
        opts.chunksize or getattr(backend, "chunksize", None),
        max(backend.worker_count(), 1),
        total,
        target=getattr(backend, "chunk_seconds", TARGET_CHUNK_SECONDS),
        first_share=getattr(backend, "first_share", False),
    )
    if measured is not None:
        sizer.observe(measured[0], measured[1])
        if threads is not None:
            threads.observe(measured[0], measured[2], measured[1])
    in_flight: dict[Future, Chunk] = {}
    results: dict[int, tuple[Chunk, ChunkResult]] = {}
    speculative = committer.spec is not None and committer.spec.shape.speculative
    ramp: int | None = 1 if speculative and opts.chunksize is None else None
    next_start = start
    committer.next = start
    exhausted = False
    stop_at: int | None = None  # an iteration raised (on_error=raise)
    failure: tuple[int, BaseException, Any] | None = None
    largest = 1

    def concurrency() -> int:
        if threads is not None:
            n = threads.threads()
            if total is not None:
                n = min(n, max(total, 1))  # no more threads than iterations
            record.threads.update(threads=n)
            record.workers = max(record.workers, n)
            sizer.workers = n
        else:
            n = backend.max_in_flight()
            sizer.workers = max(backend.worker_count(), 1)
        return n

    def collect(fut: Future) -> None:
        chunk = in_flight.pop(fut)
        try:
            res = fut.result()
        except BaseException:
            if stop_at is not None and chunk.start > stop_at:
                return  # cancelled after an earlier iteration failed
            raise
        w = record.live.get(res.worker)
        if w is None:
            w = record.live[res.worker] = WorkerState(res.worker)
        w.done += res.done
        w.busy += res.t_end - res.t_start
        w.failed += len(res.errors) + (res.raised is not None)
        w.chunks += 1
        w.current = None
        w.partial = 0
        sizer.observe(res.done, res.t_end - res.t_start)
        if res.watch_seconds:
            # fingerprinting watched objects costs per chunk: chunks long
            # enough that it stays under a tenth of the work
            sizer.target = max(sizer.target, WATCH_SHARE * res.watch_seconds)
        if threads is not None:
            threads.observe(res.done, res.cpu, res.t_end - res.t_start)
            record.threads.update(t1=threads.t1, t2=threads.t2, cores=threads.cores)
        results[chunk.start] = (chunk, res)

    poll = getattr(backend, "poll", None)
    tail = getattr(backend, "tail", None)
    live = getattr(backend, "running", None) if progress.wants_live else None
    last_live = 0.0
    try:
        while True:
            while (
                not exhausted
                and stop_at is None
                and len(in_flight) < concurrency()
                and next_start - committer.next < max(WINDOW_CHUNKS * largest * concurrency(), 1000)
            ):
                remaining = None if total is None else total - next_start
                size = sizer.next_size(remaining)
                if ramp is not None:
                    # iterations that may depend on each other: small chunks
                    # first, so that a loop that conflicts everywhere is found
                    # out after a few iterations, not after a whole chunk each
                    if committer.checked >= RAMP_CHECKED and not committer.serial:
                        ramp = None
                    else:
                        size = min(size, ramp)
                        ramp *= 2
                items = take(next_start, size)
                if not items:
                    exhausted = True
                    break
                if take.error is not None:
                    exhausted = True
                largest = max(largest, len(items))
                chunk = Chunk(next_start, items)
                in_flight[backend.submit(items, next_start)] = chunk
                next_start += len(items)
                if len(items) < size:
                    exhausted = True
            if tail is not None and (exhausted or (total is not None and next_start >= total)):
                tail()  # nothing follows what is handed out: engines stop taking chunks ahead
                tail = None
            if not in_flight and committer.next >= next_start:
                break
            if in_flight:
                if poll is not None:
                    poll()
                done, _ = wait(
                    list(in_flight),
                    timeout=LIVE_PERIOD / 2 if live else 0.25,
                    return_when=FIRST_COMPLETED,
                )
                for fut in done:
                    collect(fut)
            while committer.next in results:
                chunk, res = results.pop(committer.next)
                if res.halted and (stop_at is None or res.start <= stop_at):
                    committer.commit(chunk, res)
                    raise KeyboardInterrupt
                try:
                    committer.commit(chunk, res)
                except IterationFailed as f:
                    failure = (f.index, f.exc, f.item)
                    break
                if res.raised is not None:
                    failure = (
                        res.raised.index,
                        res.raised.exc,
                        chunk.items[res.raised.index - chunk.start],
                    )
                    break
                if committer.stopped:
                    break
            if failure is not None:
                break
            if committer.stopped:
                # a break was committed, or conflicts dominate: nothing the
                # workers do from here on is needed
                backend.cancel_after(committer.next - 1)
                if committer.serial and not committer.broke:
                    pending = sorted(
                        [c for c in in_flight.values()] + [c for c, _ in results.values()],
                        key=lambda c: c.start,
                    )
                    try:
                        _serial_rest(
                            committer, pending, take, next_start, exhausted, sizer, progress, record
                        )
                    except IterationFailed as f:
                        failure = (f.index, f.exc, f.item)
                results.clear()
                break
            # an error further on: stop what comes after it, finish what comes before
            for _chunk, res in list(results.values()):
                if res.raised is not None and (stop_at is None or res.raised.index < stop_at):
                    stop_at = res.raised.index
                    backend.cancel_after(stop_at)
                    for c in [c for c, _ in results.values() if c.start > stop_at]:
                        del results[c.start]
            if hasattr(backend, "in_flight"):
                record.threads["in_flight"] = backend.in_flight()
            record.max_outstanding = max(record.max_outstanding, next_start - committer.next)
            now = time.monotonic()
            if now - last_live >= LIVE_PERIOD and live is not None:
                last_live = now
                _live_state(record, live(), {c.start: c for c in in_flight.values()}, committer)
            progress.update(record)
    except KeyboardInterrupt:
        record.interrupted = True
        backend.interrupt()
        drain(in_flight, results, committer, timeout=2.0)
        raise Interrupted(
            f"parloop: interrupted after {committer.next} of "
            f"{'?' if total is None else total} iterations; iterations 0..{committer.next - 1}"
            " were applied"
        ) from None
    finally:
        record.dispatch = getattr(backend, "dispatch", "")
        if stop_at is not None or failure is not None:
            backend.cancel_after(failure[0] if failure else stop_at)  # type: ignore[arg-type]
        # wait for the chunks still running (they stop at their next iteration)
        if in_flight and not record.interrupted:
            wait(list(in_flight), timeout=5.0)
    if failure is None and take.error is not None:
        raise take.error
    record.notes.extend(getattr(backend, "events", ()))
    if hasattr(backend, "peak"):
        record.threads["peak_in_flight"] = backend.peak
    retried = getattr(backend, "retried", ())
    for rec_chunk in record.chunks:
        rec_chunk.retried = rec_chunk.start in retried
    if failure is not None:
        index, exc, item = failure
        record.errors.append(ErrorRecord(index, committer.targets.describe(item), exc))
        raise IterationFailed(index, exc, item)


def _serial_rest(
    committer: Committer,
    pending: list[Chunk],
    take: Any,
    next_start: int,
    exhausted: bool,
    sizer: ChunkSizer,
    progress: Progress,
    record: LastRun,
) -> None:
    """Conflicts dominate: run the rest of the loop in the kernel, in order,
    from the first uncommitted iteration (the items already handed out first,
    then the rest of the iterable), a batch at a time so the view stays live."""
    items: list = []
    for c in pending:
        skip = committer.next - c.start
        if skip < len(c.items):
            items.extend(c.items[max(skip, 0) :])
    start = committer.next
    while True:
        if not items and not exhausted:
            size = max(sizer.next_size(None), 1)
            items = list(take(next_start, size))
            next_start += len(items)
            if len(items) < size or take.error is not None:
                exhausted = True
        if not items:
            break
        committer.run_direct(items, start)
        start += len(items)
        items = []
        progress.update(record)
        if committer.broke:
            break


class Taker:
    """How chunks are cut from the iterable: a ``range`` into sub-ranges (never
    materialised: a chunk of a million iterations is three integers on the
    wire), a list or tuple by slicing, anything else by pulling items.

    An iterator that raises after yielding some items keeps those items (they
    run, as in serial) and the exception is raised once they are committed."""

    def __init__(self, iterable: Any):
        self.error: BaseException | None = None
        self.sliceable = isinstance(iterable, (range, list, tuple))
        self.iterable = iterable
        self.it = None if self.sliceable else iter(iterable)

    def __call__(self, start: int, size: int) -> Any:
        if self.sliceable:
            return self.iterable[start : start + size]
        out: list = []
        if self.error is None:
            try:
                out.extend(itertools.islice(self.it, size))  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001 - raised after the items before it ran
                self.error = e
        return out


def drain(
    in_flight: dict[Future, Chunk],
    results: dict[int, tuple[Chunk, ChunkResult]],
    committer: Committer,
    timeout: float,
) -> None:
    """After an interrupt: take what finishes within ``timeout`` and commit the
    contiguous prefix of completed iterations."""
    deadline = time.monotonic() + timeout
    while in_flight and time.monotonic() < deadline:
        done, _ = wait(
            list(in_flight),
            timeout=max(deadline - time.monotonic(), 0),
            return_when=FIRST_COMPLETED,
        )
        for fut in done:
            chunk = in_flight.pop(fut)
            try:
                results[chunk.start] = (chunk, fut.result())
            except BaseException:  # noqa: BLE001 - a worker lost while stopping
                pass
    while committer.next in results:
        chunk, res = results.pop(committer.next)
        try:
            committer.commit(chunk, res)
        except IterationFailed:
            break
        if res.done < len(chunk.items) or res.raised is not None:
            break
