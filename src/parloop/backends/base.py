"""The one small interface every backend implements (threads, in-kernel
serial, ipyparallel engines), after joblib's backends: a documented life cycle
(prepare, submit, cancel_after, interrupt, finish) and capability facts."""

from __future__ import annotations

import ast
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..runtime import ChunkResult, LoopShape


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


class Backend(Protocol):
    name: str
    #: the workers share the kernel's objects (so the body may use locks,
    #: open files, generators...)
    shares_memory: bool

    def worker_count(self) -> int: ...

    def max_in_flight(self) -> int:
        """Chunks to keep handed out: the worker count for threads, more for
        engines so that none waits on the kernel between chunks."""

    def prepare(self, job: Job) -> None:
        """Compile/ship the chunk function and inputs; raise before anything runs
        if an input cannot travel."""

    def submit(self, items: list, start: int) -> "Future[ChunkResult]": ...

    # optional: ``tail()`` -- no chunk follows those submitted (a backend that
    # queues chunks ahead on workers stops doing so), ``poll()`` between waits

    def cancel_after(self, index: int) -> None:
        """Chunks that start after iteration ``index`` are no longer needed."""

    def interrupt(self) -> None:
        """Stop every running chunk as soon as possible (kernel interrupt)."""

    def finish(self) -> None:
        """The run is over (normally or not)."""
