"""The dispatcher, and the chunk sizes and worker counts it takes from
measured iteration times (docs/design.md §5).

Backend-independent: :class:`Dispatcher` asks a :class:`ChunkSizer` how big
the next chunk should be and a :class:`ThreadCount` (or the backend) how many
chunks may be in flight, and commits results in iteration order.
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
from .errors import WorkerLostError
from .log.commit import Chunk, Committer, Interrupted, IterationFailed
from .options import Options
from .progress.base import LiveState, Progress
from .record import IterationError, LastRun, WorkerTotals
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


def make_taker(iterable: Any, is_async: bool) -> Any:
    """The object that cuts chunks from the loop's iterable."""
    if is_async:
        from .backends.tasks import AsyncTaker

        return AsyncTaker(iterable)
    return Taker(iterable)


class _Failed(Exception):
    """An iteration failed (on_error=raise) and everything before it is
    committed: the run ends with it."""

    def __init__(self, error: IterationError):
        self.error = error


class Dispatcher:
    """Hands chunks out, keeps the workers fed, commits contiguous prefixes as
    they complete; stops early on an error (on_error=raise), a committed
    ``break``, dominating conflicts or an interrupt.

    :meth:`run` reads as its steps, as CPython's
    ``_ExecutorManagerThread.run`` does: fill, collect, commit, stop what an
    error makes unneeded, refresh the live state; then finish.  It owns the
    :class:`~parloop.progress.base.LiveState` it hands to the view."""

    def __init__(
        self,
        backend: Backend,
        take: Any,
        total: int | None,
        opts: Options,
        committer: Committer,
        record: LastRun,
        progress: Progress,
        live: LiveState,
        threads: ThreadCount | None,
        start: int = 0,
        measured: tuple[int, float, float] | None = None,
    ):
        """``start``: iterations before it already ran (natively, see
        parloop.native); ``measured``: (iterations, wall s, CPU s) they took,
        so sizing starts from a measurement rather than from probing chunks."""
        self.backend, self.take, self.total, self.opts = backend, take, total, opts
        self.committer, self.record, self.progress, self.live = committer, record, progress, live
        self.threads = threads
        # a backend may size its own chunks (asyncio tasks: a chunk is a batch
        # of concurrent iterations, not a stretch of work)
        self.sizer = ChunkSizer(
            opts.chunksize or backend.chunksize,
            max(backend.worker_count(), 1),
            total,
            target=backend.chunk_seconds,
            first_share=backend.first_share,
        )
        if measured is not None:
            self.sizer.observe(measured[0], measured[1])
            if threads is not None:
                threads.observe(measured[0], measured[2], measured[1])
        self.in_flight: dict[Future, Chunk] = {}
        self.results: dict[int, tuple[Chunk, ChunkResult]] = {}
        speculative = committer.spec is not None and committer.spec.shape.speculative
        #: speculative loops: chunks of 1, 2, 4... until RAMP_CHECKED are checked
        self.ramp: int | None = 1 if speculative and opts.chunksize is None else None
        self.next_start = start
        committer.next = start
        self.exhausted = False
        #: an iteration raised (on_error=raise): nothing after it is needed
        self.stop_at: int | None = None
        self.largest = 1
        self.tailed = False
        self.watch_live = progress.wants_live and backend.live_rows
        self.last_live = 0.0

    # -- the loop ---------------------------------------------------------
    def run(self) -> None:
        failure: IterationError | None = None
        try:
            while True:
                self.fill()
                self.tail()
                if not self.in_flight and self.committer.next >= self.next_start:
                    break
                self.collect()
                try:
                    self.commit()
                except _Failed as f:
                    failure = f.error
                    break
                if self.committer.stopped:
                    failure = self.stopped()
                    break
                self.cancel_after_failure()
                self.refresh()
        except KeyboardInterrupt:
            self.interrupted()
        except WorkerLostError as lost:
            # say what the run leaves behind, as an interrupt does
            k, total = self.committer.next, "?" if self.total is None else self.total
            lost.add_note(
                f"parloop: iterations 0..{k - 1} of {total} were applied; from iteration "
                f"{k} on, nothing was (the workers running them were lost)"
                if k
                else f"parloop: no iteration of {total} was applied (the workers were lost)"
            )
            raise
        finally:
            self.wind_down(failure)
        self.finish(failure)

    # -- the steps --------------------------------------------------------
    def concurrency(self) -> int:
        """Chunks to keep in flight (threads=auto: the thread count now)."""
        threads, record = self.threads, self.record
        if threads is not None:
            n = threads.threads()
            if self.total is not None:
                n = min(n, max(self.total, 1))  # no more threads than iterations
            record.threads.update(threads=n)
            record.workers = max(record.workers, n)
            self.sizer.workers = n
            return n
        self.sizer.workers = max(self.backend.worker_count(), 1)
        return self.backend.max_in_flight()

    def fill(self) -> None:
        """Hand chunks out until the workers are fed, within the window of
        iterations that may run ahead of the last committed one."""
        committer = self.committer
        while (
            not self.exhausted
            and self.stop_at is None
            and len(self.in_flight) < self.concurrency()
            and self.next_start - committer.next
            < max(WINDOW_CHUNKS * self.largest * self.concurrency(), 1000)
        ):
            remaining = None if self.total is None else self.total - self.next_start
            size = self.sizer.next_size(remaining)
            if self.ramp is not None:
                # iterations that may depend on each other: small chunks
                # first, so that a loop that conflicts everywhere is found
                # out after a few iterations, not after a whole chunk each
                if committer.checked >= RAMP_CHECKED and not committer.serial:
                    self.ramp = None
                else:
                    size = min(size, self.ramp)
                    self.ramp *= 2
            items = self.take(self.next_start, size)
            if not items:
                self.exhausted = True
                return
            if self.take.error is not None:
                self.exhausted = True
            self.largest = max(self.largest, len(items))
            self.in_flight[self.backend.submit(items, self.next_start)] = Chunk(
                self.next_start, items
            )
            self.next_start += len(items)
            if len(items) < size:
                self.exhausted = True

    def tail(self) -> None:
        """Nothing follows what is handed out: engines stop taking chunks ahead."""
        if not self.tailed and (
            self.exhausted or (self.total is not None and self.next_start >= self.total)
        ):
            self.backend.tail()
            self.tailed = True

    def collect(self) -> None:
        """Wait (briefly) for chunks to complete; keep their results."""
        if not self.in_flight:
            return
        self.backend.poll()
        done, _ = wait(
            list(self.in_flight),
            timeout=LIVE_PERIOD / 2 if self.watch_live else 0.25,
            return_when=FIRST_COMPLETED,
        )
        for fut in done:
            self.collect_one(fut)

    def collect_one(self, fut: Future) -> None:
        chunk = self.in_flight.pop(fut)
        try:
            res = fut.result()
        except BaseException:
            if self.stop_at is not None and chunk.start > self.stop_at:
                return  # cancelled after an earlier iteration failed
            raise
        w = self.live.worker(res.worker)
        w.done += res.done
        w.busy += res.t_end - res.t_start
        w.failed += len(res.errors) + (res.raised is not None)
        w.chunks += 1
        w.current = None
        w.partial = 0
        self.sizer.observe(res.done, res.t_end - res.t_start)
        if res.watch_seconds:
            # fingerprinting watched objects costs per chunk: chunks long
            # enough that it stays under a tenth of the work
            self.sizer.target = max(self.sizer.target, WATCH_SHARE * res.watch_seconds)
        if self.threads is not None:
            self.threads.observe(res.done, res.cpu, res.t_end - res.t_start)
            self.record.threads.update(
                t1=self.threads.t1, t2=self.threads.t2, cores=self.threads.cores
            )
        self.results[chunk.start] = (chunk, res)

    def commit(self) -> None:
        """Commit the completed chunks that continue the committed prefix, in
        order; raise :class:`_Failed` at a failed iteration."""
        committer, results = self.committer, self.results
        while committer.next in results:
            if not self.vouched(results[committer.next][1]):
                return
            chunk, res = results.pop(committer.next)
            if res.halted and (self.stop_at is None or res.start <= self.stop_at):
                committer.commit(chunk, res)
                raise KeyboardInterrupt
            try:
                committer.commit(chunk, res)
            except IterationFailed as f:
                raise _Failed(f.error) from None
            if res.raised is not None:
                err = res.raised
                raise _Failed(
                    err.settle(committer.targets.describe(chunk.items[err.index - chunk.start]))
                )
            if committer.stopped:
                return

    def vouched(self, res: ChunkResult) -> bool:
        """Threads with watched objects: a chunk is committed once a check of
        the baseline vouches for it (parloop.fingerprint.Baseline: checks are
        spaced out while chunks run, and made at once when none runs); a
        check that finds a change marks the chunk hidden, and the committer
        puts the objects back and runs serially from it."""
        base = self.committer.baseline
        if base is None or res.hidden or base.vouches_for(res.t_end):
            return True
        if self.in_flight and not base.due():
            return False
        why = base.check()
        if why:
            res.hidden = why
        return True

    def stopped(self) -> IterationError | None:
        """A break was committed, or conflicts dominate: nothing the workers
        do from here on is needed (conflicts: the rest runs in the kernel)."""
        committer = self.committer
        self.backend.cancel_after(committer.next - 1)
        failure = None
        if committer.serial and not committer.broke:
            pending = sorted(
                [c for c in self.in_flight.values()] + [c for c, _ in self.results.values()],
                key=lambda c: c.start,
            )
            try:
                _serial_rest(
                    committer,
                    pending,
                    self.take,
                    self.next_start,
                    self.exhausted,
                    self.sizer,
                    self.progress,
                    self.record,
                    self.live,
                )
            except IterationFailed as f:
                failure = f.error
        self.results.clear()
        return failure

    def cancel_after_failure(self) -> None:
        """An error further on: stop what comes after it, finish what comes before."""
        results = self.results
        for _chunk, res in list(results.values()):
            if res.raised is not None and (self.stop_at is None or res.raised.index < self.stop_at):
                self.stop_at = res.raised.index
                self.backend.cancel_after(self.stop_at)
                for c in [c for c, _ in results.values() if c.start > self.stop_at]:
                    del results[c.start]

    def refresh(self) -> None:
        """The live state, then the view."""
        self.live.in_flight = self.backend.in_flight()
        self.record.max_outstanding = max(
            self.record.max_outstanding, self.next_start - self.committer.next
        )
        now = time.monotonic()
        if self.watch_live and now - self.last_live >= LIVE_PERIOD:
            self.last_live = now
            self.live_rows()
        self.progress.update(self.record, self.live)

    def live_rows(self) -> None:
        """Per-worker rows from the backend's running chunks."""
        chunks = {c.start: c for c in self.in_flight.values()}
        for w in self.live.workers.values():
            w.current = None
            w.partial = 0
        for start, (worker, n) in self.backend.running().items():
            w = self.live.worker(worker)
            chunk = chunks.get(start)
            w.current = start + n
            if chunk is not None and n < len(chunk.items):
                w.current_values = self.committer.targets.describe(chunk.items[n])
            w.partial = n

    def interrupted(self) -> None:
        """Kernel interrupt: stop the workers, commit what completes within
        two seconds, say how far the loop got."""
        committer = self.committer
        self.record.interrupted = True
        self.backend.interrupt()
        drain(self.in_flight, self.results, committer, timeout=2.0)
        total = "?" if self.total is None else self.total
        raise Interrupted(
            f"parloop: interrupted after {committer.next} of {total} iterations; "
            f"iterations 0..{committer.next - 1} were applied"
        ) from None

    def wind_down(self, failure: IterationError | None) -> None:
        """However the loop ended: no chunk after a failure runs on; wait for
        the chunks still running (they stop at their next iteration)."""
        self.record.dispatch = self.backend.dispatch
        # what happened (lost workers...) is recorded however the run ended
        self.record.notes.extend(self.backend.events)
        if failure is not None:
            self.backend.cancel_after(failure.index)
        elif self.stop_at is not None:
            self.backend.cancel_after(self.stop_at)
        if self.in_flight and not self.record.interrupted:
            wait(list(self.in_flight), timeout=5.0)
        base, committer = self.committer.baseline, self.committer
        if (
            base is not None
            and (failure is not None or committer.broke)
            and not committer.serial
            and not self.record.interrupted
            and base.check()
        ):
            # the chunks after a failure or a break ran on meanwhile, and
            # what they changed behind the log's back is not the serial state
            _put_back_or_note(base, self.record)
        self.record.by_worker = {
            name: WorkerTotals(name, w.done, w.busy, w.failed, w.chunks)
            for name, w in self.live.workers.items()
        }

    def finish(self, failure: IterationError | None) -> None:
        """What the backend reports goes to the record; a failed iteration is
        recorded and raised."""
        record, backend = self.record, self.backend
        if failure is None and self.take.error is not None:
            raise self.take.error
        if backend.peak is not None:
            record.threads["peak_in_flight"] = backend.peak
        for rec_chunk in record.chunks:
            rec_chunk.retried = rec_chunk.start in backend.retried
        if failure is not None:
            record.errors.append(failure)
            raise IterationFailed(failure)


def _serial_rest(
    committer: Committer,
    pending: list[Chunk],
    take: Any,
    next_start: int,
    exhausted: bool,
    sizer: ChunkSizer,
    progress: Progress,
    record: LastRun,
    live: LiveState,
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
        progress.update(record, live)
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


def _put_back_or_note(base: Any, record: LastRun) -> None:
    label = base.put_back()
    if label:
        record.notes.append(
            f"parloop: {label} was changed by iterations that ran after the last applied one, "
            "through a path the log does not hold, and could not be put back"
        )


def drain(
    in_flight: dict[Future, Chunk],
    results: dict[int, tuple[Chunk, ChunkResult]],
    committer: Committer,
    timeout: float,
) -> None:
    """After an interrupt: take what finishes within ``timeout`` and commit the
    contiguous prefix of completed iterations."""
    deadline = time.monotonic() + timeout
    base = committer.baseline
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
    if base is not None and not committer.serial and base.check():
        # changed behind the log's back: only what a check vouched for is
        # applied, and the objects are put back to what those iterations left
        _put_back_or_note(base, committer.record)
    while committer.next in results:
        if base is not None and not committer.serial:
            if not base.vouches_for(results[committer.next][1].t_end):
                break
        chunk, res = results.pop(committer.next)
        try:
            committer.commit(chunk, res)
        except IterationFailed:
            break
        if res.done < len(chunk.items) or res.raised is not None:
            break
