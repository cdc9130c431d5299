"""``%%threaded`` on a loop body that awaits: every iteration is an asyncio
task, all on one event loop of parloop's own (in a worker thread, so it works
whether or not the kernel's loop is running), at most ``tasks=N`` at once.

Threads suit tens of concurrent waits; thousands (web requests, database
calls) want coroutines: one thread, no switching cost.  The dispatcher sees
the same chunks as with threads; a chunk here is a batch of iterations whose
tasks run concurrently, merged back in iteration order.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

# parloop's one event loop (shared with the managed cluster); run.py and
# parloop.shutdown() still import run_on_loop / stop_loop from here
from ..aioloop import event_loop, run_on_loop, stop_loop
from ..runtime import (
    HELPERS,
    ChunkControl,
    ChunkResult,
    IterationError,
    capture_into,
    private_values,
)
from .base import Backend, Job

if TYPE_CHECKING:
    from ..analysis import LoopPlan
    from ..options import Options


class AsyncTaker:
    """Chunks cut from an async iterable (``async for x in agen():``), pulled
    on parloop's loop; like run._Taker, an error after some items keeps them."""

    sliceable = False

    def __init__(self, aiterable: Any):
        self.it = aiterable.__aiter__()
        self.error: BaseException | None = None

    async def _pull(self, size: int) -> list:
        out: list = []
        try:
            while len(out) < size:
                out.append(await self.it.__anext__())
        except StopAsyncIteration:
            pass
        except Exception as e:  # noqa: BLE001 - raised after the items before it ran
            self.error = e
        return out

    def __call__(self, start: int, size: int) -> list:
        if self.error is not None:
            return []
        return run_on_loop(self._pull(size))


class TaskBackend(Backend):
    """Iterations as asyncio tasks; at most ``tasks`` in flight."""

    name = "tasks"
    worker_noun = "task"
    shares_memory = True
    concurrent_chunks = True

    @classmethod
    def for_run(cls, opts: Options, plan: LoopPlan) -> TaskBackend:
        return cls(1 if opts.serial else opts.tasks, opts.chunksize)

    @classmethod
    def shutdown(cls) -> None:
        stop_loop()

    def __init__(self, tasks: int, chunksize: int | None = None):
        super().__init__()
        self.tasks = tasks
        #: a chunk is a batch of concurrent iterations, not a stretch of work
        self.batch = chunksize or max(1, min(256, tasks // 4 or 1))
        self.chunksize = self.batch
        self._fn: Callable | None = None
        self._job: Job | None = None
        self._sem: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._cancel_from: int | None = None
        self.peak = 0
        self._active = 0

    def worker_count(self) -> int:
        return self.tasks

    def in_flight(self) -> int | None:
        """Iterations running right now (for the live view)."""
        return self._active

    def max_in_flight(self) -> int:
        return math.ceil(self.tasks / self.batch) + 1

    def prepare(self, job: Job) -> None:
        from .threads import compile_chunk_function

        self._job = job
        self._fn = compile_chunk_function(job, job.ns, "___parloop_iter")

        async def make() -> asyncio.Semaphore:
            return asyncio.Semaphore(self.tasks)

        self._sem = run_on_loop(make())

    def submit(self, items: list, start: int) -> "Future[ChunkResult]":
        return asyncio.run_coroutine_threadsafe(self._chunk(items, start), event_loop())

    async def _one(self, ctl: ChunkControl, n: int, item: Any) -> tuple | None:
        assert self._sem is not None and self._fn is not None and self._job is not None
        async with self._sem:
            if ctl.stop or (self._cancel_from is not None and ctl.start + n > self._cancel_from):
                return None
            self._active += 1
            self.peak = max(self.peak or 0, self._active)
            log: list = []
            parts: list[str] = []
            capture_into(parts)  # this task's own context
            try:
                local_vars, exc = await self._fn(item, n, log, ctl, HELPERS)
            finally:
                self._active -= 1
            return log, parts, local_vars, exc

    async def _chunk(self, items: list, start: int) -> ChunkResult:
        job = self._job
        assert job is not None
        ctl = ChunkControl(start, job.on_error, [], [], job.private, job.seed)
        t0 = time.perf_counter()
        c0 = time.thread_time()
        tasks = [asyncio.ensure_future(self._one(ctl, n, item)) for n, item in enumerate(items)]
        self._running.update(tasks)
        failed_at: int | None = None
        try:
            for n, task in enumerate(tasks):
                try:
                    out = await asyncio.shield(task) if failed_at is None else None
                except asyncio.CancelledError:
                    out = None
                if (
                    out is not None
                    and out[3] is not None
                    and job.on_error == "raise"
                    and not isinstance(out[3], (asyncio.CancelledError, KeyboardInterrupt))
                ):
                    failed_at = n
                    for later in tasks[n + 1 :]:
                        later.cancel()
            # every task is awaited: no "Task was destroyed but it is pending"
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._running.difference_update(tasks)
        return self._merge(ctl, items, start, results, t0, c0)

    def _merge(
        self, ctl: ChunkControl, items: list, start: int, results: list, t0: float, c0: float
    ) -> ChunkResult:
        """The iterations' logs, output and last values in iteration order, up
        to the first iteration that did not complete (or the first failure
        with on_error=raise)."""
        job = self._job
        assert job is not None
        log: list = []
        marks: list[int] = []
        parts: list[str] = []
        snapshot: dict[str, Any] = {}
        errors: list[IterationError] = []
        raised: IterationError | None = None
        done = 0
        halted = False
        for n, out in enumerate(results):
            if out is None or isinstance(out, BaseException):
                halted = True
                break
            it_log, it_parts, local_vars, exc = out
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
                parts.extend(it_parts)
                halted = True
                break
            marks.append(len(log))
            snap = private_values(local_vars, job.private)
            parts.extend(it_parts)
            done = n + 1
            if exc is not None:
                err = IterationError(start + n, exc, snap)
                if job.on_error == "raise":
                    log.extend(it_log)
                    snapshot.update(snap)
                    raised = err
                    break
                errors.append(err)
                if job.on_error == "skip":
                    snapshot.update(snap)
                    continue
            log.extend(it_log)
            snapshot.update(snap)
        return ChunkResult(
            start=start,
            done=done,
            log=log,
            marks=marks,
            parts=parts,
            snapshot=snapshot,
            errors=errors,
            raised=raised,
            halted=halted and raised is None,
            worker="asyncio tasks",
            t_start=t0,
            t_end=time.perf_counter(),
            cpu=time.thread_time() - c0,
        )

    def cancel_after(self, index: int) -> None:
        self._cancel_from = index if self._cancel_from is None else min(index, self._cancel_from)

    def interrupt(self) -> None:
        self._cancel_from = -1
        loop = event_loop()

        def cancel_all() -> None:
            for t in list(self._running):
                t.cancel()

        loop.call_soon_threadsafe(cancel_all)

    def finish(self) -> None:
        pass
