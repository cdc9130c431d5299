"""The one interface every backend implements (docs/design.md §4), after
joblib's ``ParallelBackendBase`` and anyio's ``abc``: a documented life cycle
(prepare, submit, cancel_after, interrupt, finish), and every capability the
dispatcher or a view may use declared here with its default -- the dispatcher
never probes a backend with ``getattr`` or branches on its name.

Adding a backend is one module with a :class:`Backend` subclass and one line in
:data:`parloop.backends.BACKENDS`.
"""

from __future__ import annotations

import abc
import ast
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..runtime import ChunkResult, LoopShape

if TYPE_CHECKING:
    from ..analysis import LoopPlan
    from ..options import Options


@dataclass
class Job:
    """Everything a backend needs to run the chunks of one loop."""

    chunk_module: ast.Module  # defines the chunk function (rewrite.build_chunk_function)
    filename: str  # the cell's name in linecache: tracebacks show its lines
    cell_source: str  # the cell's text, for workers that have no linecache of it
    ns: dict[str, Any]  # the notebook namespace
    inputs: set[str]  # names the body reads from the notebook
    private: set[str]  # names whose last values come back
    on_error: str
    seed: int | None
    timeout: float | None = None  # per iteration (engines)
    live: bool = False  # workers report progress while a chunk runs
    facts: dict[str, Any] = field(default_factory=dict)  # what the backend reports
    shape: LoopShape | None = None  # shared objects, checked privates... (runtime)
    lock: Any = None  # threads: reads of shared objects vs the replay
    #: submodules the body reaches through an input module (``xml.dom.minidom``
    #: after ``import xml.dom.minidom``): engines import them too
    imports: tuple[str, ...] = ()
    #: the notebook cells that define the functions the body calls:
    #: ``{"files": {filename: lines}, "functions": {name: filename}}``
    sources: dict[str, Any] = field(default_factory=dict)
    #: workers that share the kernel's objects: what each iteration's
    #: ``private=`` copy is made from -- the objects as they were before the
    #: loop, not as the commits of earlier iterations leave them -- and the
    #: generators that ``seed=`` streams are made like
    originals: dict[str, Any] | None = None


class Backend(abc.ABC):
    """Runs chunks of a loop's iterations somewhere, one run at a time.

    The dispatcher's calls, in order: :meth:`prepare` once, then
    :meth:`submit` for each chunk (with :meth:`poll` between waits and
    :meth:`tail` once no chunk follows), :meth:`cancel_after` when an
    iteration failed or a ``break`` committed, :meth:`interrupt` on a kernel
    interrupt, and :meth:`finish` once, however the run ended."""

    # -- what it is -------------------------------------------------------
    #: the registry's name, kept in ``parloop.last_run.backend``
    name: ClassVar[str]
    #: what the views call one worker ("thread", "engine", "task")
    worker_noun: ClassVar[str] = "worker"
    #: the workers share the kernel's objects (the body may use locks, open
    #: files, generators...); else inputs travel by value and the loop
    #: target's values come back
    shares_memory: ClassVar[bool] = False
    #: one chunk is a batch of iterations that run *concurrently* (asyncio
    #: tasks): the views show the iterations in flight instead of worker rows
    concurrent_chunks: ClassVar[bool] = False
    #: its worker count follows the thread-count formula when ``threads=`` is
    #: not given (parloop.schedule.ThreadCount)
    auto_workers: ClassVar[bool] = False
    #: ``(seconds per iteration, seconds per run)`` that running through it
    #: costs over the plain loop: a long loop of cheap iterations then starts
    #: in the kernel and only moves to the backend when that wins
    #: (parloop.native); None: always through the backend
    native_costs: ClassVar[tuple[float, float] | None] = None
    #: :meth:`running` reports the chunks in flight (worker rows in the widget)
    live_rows: ClassVar[bool] = False

    # -- how chunks are cut (parloop.schedule.ChunkSizer) ------------------
    #: a chunk size the backend imposes when the user gave none
    chunksize: int | None = None
    #: aim for chunks of about this many seconds
    chunk_seconds: float = 0.1
    #: the length known: cut a quarter of each worker's share per chunk up
    #: front (workers whose chunks cost milliseconds each)
    first_share: bool = False

    def __init__(self) -> None:
        #: what happened during the run (lost workers), for ``last_run.notes``
        self.events: list[str] = []
        #: starts of chunks that ran again after a worker was lost
        self.retried: set[int] = set()
        #: most iterations in flight at once, where :meth:`in_flight` counts
        self.peak: int | None = None

    @classmethod
    @abc.abstractmethod
    def for_run(cls, opts: Options, plan: LoopPlan) -> Backend:
        """The backend for one run of a cell, from its options."""

    # -- the life cycle ---------------------------------------------------
    @abc.abstractmethod
    def worker_count(self) -> int:
        """How many workers run chunks (the widget's rows, the sizes' share)."""

    @abc.abstractmethod
    def max_in_flight(self) -> int:
        """Chunks to keep handed out: the worker count for threads, more for
        engines so that none waits on the kernel between chunks."""

    def precheck(self, ns: dict[str, Any], names: set[str]) -> None:
        """Before the cell runs at all: raise (naming the variable) if an
        input already bound cannot reach the workers."""

    @abc.abstractmethod
    def prepare(self, job: Job) -> None:
        """Compile/ship the chunk function and inputs; raise before anything
        runs if an input cannot travel."""

    @abc.abstractmethod
    def submit(self, items: list, start: int) -> Future[ChunkResult]:
        """Run iterations ``start, start + 1, ...`` over ``items``."""

    def poll(self) -> None:
        """Called between the dispatcher's waits (notice lost workers)."""

    def tail(self) -> None:
        """No chunk follows those submitted: a backend that queues chunks
        ahead on its workers stops doing so."""

    @abc.abstractmethod
    def cancel_after(self, index: int) -> None:
        """Chunks that start after iteration ``index`` are no longer needed."""

    def quiesce(self, index: int) -> None:
        """Chunks that start after iteration ``index`` are no longer needed,
        and none may still be running when this returns.  Backends that share
        the kernel's objects need it before the kernel puts a watched object
        back (hidden state, see parloop.run); the others run on copies and
        need not wait."""
        self.cancel_after(index)

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Stop every running chunk as soon as possible (kernel interrupt)."""

    @abc.abstractmethod
    def finish(self) -> None:
        """The run is over (normally or not)."""

    # -- what the views and the record learn ------------------------------
    def running(self) -> dict[int, tuple[str, int]]:
        """``{chunk start: (worker, iterations done in it so far)}`` for the
        chunks running now (read only when :attr:`live_rows`)."""
        return {}

    def in_flight(self) -> int | None:
        """Iterations running right now, where that is not the worker count
        (asyncio tasks); None otherwise."""
        return None

    @property
    def dispatch(self) -> str:
        """How chunks reached the workers, for ``last_run.dispatch``."""
        return ""

    # -- the process's backends as a whole (parloop.backends) -------------
    @classmethod
    def status_lines(cls) -> list[str]:
        """``%parallel_status`` lines about what this kind of backend runs on
        (empty: nothing to say)."""
        return []

    @classmethod
    def stop_cluster(cls) -> bool:
        """``%parallel_stop``: stop the cluster this kind of backend started
        (never one it did not start); whether there was one."""
        return False

    @classmethod
    def shutdown(cls) -> None:
        """Stop what this kind of backend started in the process (pools,
        clusters, event loops) -- never what it did not start."""
