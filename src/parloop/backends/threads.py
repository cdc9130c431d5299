"""``%%threaded``: chunks on a thread pool in the kernel, and the in-kernel
serial backend behind the ``serial`` flag.

The workers share the kernel's objects, so inputs need no copying; the cell's
own writes still go through the ordered replay (docs/design.md §3).
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from ..runtime import ChunkControl, ChunkResult, run_chunk
from .base import Backend, Job

if TYPE_CHECKING:
    from ..analysis import LoopPlan
    from ..options import Options

#: hard ceiling of ``threads=auto`` (and of explicit ``threads=N``'s pool)
MAX_THREADS = 256

_executor: ThreadPoolExecutor | None = None
_executor_size = 0
_executor_lock = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """A warm pool shared by runs; grown (replaced) when a run needs more."""
    global _executor, _executor_size
    with _executor_lock:
        if _executor is None or _executor_size < size:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="parloop")
            _executor_size = size
        return _executor


def shutdown_pool() -> None:
    """Let the pool's threads end (``%unload_ext``, or after an interrupt left
    some of them stuck in an iteration)."""
    global _executor, _executor_size
    with _executor_lock:
        if _executor is not None:
            _executor.shutdown(wait=False, cancel_futures=True)
        _executor = None
        _executor_size = 0


def compile_chunk_function(
    job: Job, globals_: dict[str, Any], name: str = "___parloop_chunk"
) -> Callable:
    code = compile(job.chunk_module, job.filename, "exec")
    scratch: dict[str, Any] = {}
    exec(code, globals_, scratch)
    return scratch[name]


class _Tracker:
    """The chunks in flight: their controls (stop flags) and the threads that
    run them (for the interrupt)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ctls: dict[int, ChunkControl] = {}
        self.threads: dict[int, int] = {}
        self.cancel_from: int | None = None

    def register(self, ctl: ChunkControl) -> None:
        with self.lock:
            if self.cancel_from is not None and ctl.start > self.cancel_from:
                ctl.stop = True
            self.ctls[ctl.start] = ctl
            self.threads[ctl.start] = threading.get_ident()

    def done(self, start: int) -> None:
        with self.lock:
            self.ctls.pop(start, None)
            self.threads.pop(start, None)

    def cancel_after(self, index: int) -> None:
        with self.lock:
            self.cancel_from = index if self.cancel_from is None else min(index, self.cancel_from)
            for start, ctl in self.ctls.items():
                if start > index:
                    ctl.stop = True

    def interrupt(self) -> None:
        with self.lock:
            self.cancel_from = -1
            for ctl in self.ctls.values():
                ctl.stop = True
            idents = list(self.threads.values())
        for ident in idents:
            # wake a thread that is inside an iteration (not one blocked in C)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt)
            )


class ThreadBackend(Backend):
    """A pool of ``threads`` workers (``threads`` may grow during the run when
    ``threads=auto`` measures that iterations mostly wait)."""

    name = "threads"
    worker_noun = "thread"
    shares_memory = True
    auto_workers = True
    #: measured on the 2-core machine: ~0.6 us per iteration, ~3 ms per run
    native_costs = (0.6e-6, 0.003)
    live_rows = True

    @classmethod
    def for_run(cls, opts: Options, plan: LoopPlan) -> ThreadBackend:
        from ..schedule import cpu_count

        return cls(opts.threads or cpu_count())

    @classmethod
    def shutdown(cls) -> None:
        shutdown_pool()

    def __init__(self, threads: int):
        super().__init__()
        self.threads = threads
        self._fn: Callable | None = None
        self._job: Job | None = None
        self._tracker = _Tracker()
        self._interrupted = False
        # worker names are slots 0..threads-1 (the shared pool has more
        # threads than a run uses; the report shows the run's own workers)
        self._slots_lock = threading.Lock()
        self._free: set[int] = set()
        self._next_slot = 0
        self._names: dict[int, str] = {}  # chunk start -> worker running it
        self._submitted: set[Future[ChunkResult]] = set()  # not finished yet

    def running(self) -> dict[int, tuple[str, int]]:
        """chunk start -> (worker, iterations done in it so far), for the live view."""
        with self._tracker.lock:
            ctls = list(self._tracker.ctls.items())
        return {start: (self._names.get(start, "thread"), len(ctl.marks)) for start, ctl in ctls}

    def worker_count(self) -> int:
        return self.threads

    def max_in_flight(self) -> int:
        return self.threads

    def prepare(self, job: Job) -> None:
        self._job = job
        self._fn = compile_chunk_function(job, job.ns)

    def _run(self, items: list, start: int) -> ChunkResult:
        job = self._job
        assert job is not None and self._fn is not None
        with self._slots_lock:
            slot = min(self._free) if self._free else self._next_slot
            self._free.discard(slot)
            self._next_slot = max(self._next_slot, slot + 1)
        self._names[start] = name = f"thread {slot}"
        try:
            return run_chunk(
                self._fn,
                items,
                start,
                job.on_error,
                job.private,
                job.seed,
                worker=name,
                register=self._tracker.register,
                shape=job.shape,
                lock=job.lock,
                originals=job.originals,
            )
        finally:
            self._tracker.done(start)
            self._names.pop(start, None)
            with self._slots_lock:
                self._free.add(slot)

    def submit(self, items: list, start: int) -> "Future[ChunkResult]":
        fut = _pool(MAX_THREADS).submit(self._run, items, start)
        self._submitted.add(fut)
        fut.add_done_callback(self._submitted.discard)
        return fut

    def cancel_after(self, index: int) -> None:
        self._tracker.cancel_after(index)

    def quiesce(self, index: int) -> None:
        """Stop the chunks after ``index`` (each at its next iteration) and
        wait until no chunk of this run is running or queued."""
        from concurrent.futures import wait

        self._tracker.cancel_after(index)
        wait(list(self._submitted))

    def interrupt(self) -> None:
        self._interrupted = True
        self._tracker.interrupt()

    def finish(self) -> None:
        if self._interrupted:
            # threads stuck in a long call would hold pool slots: start afresh
            shutdown_pool()


class SerialBackend(Backend):
    """The ``serial`` flag: the rewritten loop in the kernel's own thread, one
    chunk at a time, so a debugger or a print lands where it would in serial."""

    name = "serial"
    worker_noun = "kernel"
    shares_memory = True

    @classmethod
    def for_run(cls, opts: Options, plan: LoopPlan) -> SerialBackend:
        return cls()

    def __init__(self) -> None:
        super().__init__()
        self._fn: Callable | None = None
        self._job: Job | None = None
        self._cancel_from: int | None = None

    def worker_count(self) -> int:
        return 1

    def max_in_flight(self) -> int:
        return 1

    def prepare(self, job: Job) -> None:
        self._job = job
        self._fn = compile_chunk_function(job, job.ns)

    def submit(self, items: list, start: int) -> "Future[ChunkResult]":
        job = self._job
        assert job is not None and self._fn is not None
        fut: Future[ChunkResult] = Future()
        try:
            fut.set_result(
                run_chunk(
                    self._fn,
                    items,
                    start,
                    job.on_error,
                    job.private,
                    job.seed,
                    worker="kernel",
                    shape=job.shape,
                    originals=job.originals,
                )
            )
        except BaseException as e:  # noqa: BLE001 - handed to the dispatcher as is
            fut.set_exception(e)
        return fut

    def cancel_after(self, index: int) -> None:
        self._cancel_from = index

    def interrupt(self) -> None:
        pass  # the KeyboardInterrupt arrives in this very thread

    def finish(self) -> None:
        pass
