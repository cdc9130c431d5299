"""``parloop.last_run``: what the last run did, for the user, the report and
the tests (docs/design.md §1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChunkRecord:
    """One chunk: which iterations, where, when (seconds from the run's start)."""

    start: int
    count: int
    worker: str
    t_start: float
    t_end: float
    cpu: float
    failed: list[int] = field(default_factory=list)
    retried: bool = False

    @property
    def seconds(self) -> float:
        return self.t_end - self.t_start


class RemoteTraceback(Exception):
    """A worker's traceback, as text, shown as the cause of the exception the
    iteration raised there (its frames did not travel)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


@dataclass
class IterationError:
    """An iteration that raised: the one value its failure is, from the worker
    that saw it to ``last_run.errors`` and to the exception the user gets.

    The worker makes it (index, exception, the private names' values before
    the iteration); an engine adds its traceback as text (the exception's
    frames do not travel); the kernel adds the loop variables' values when it
    commits the iteration.  Nothing is written onto the user's exception but
    the note that names the iteration and, from an engine, the worker's
    frames as its ``__cause__``."""

    index: int
    exc: BaseException
    snapshot: dict[str, Any] | None = None
    #: the worker's traceback, where it ran in another process
    remote_traceback: str | None = None
    #: a short repr of the iteration's loop values (``i=3, x='a'``)
    values: str = ""

    @property
    def exception(self) -> BaseException:
        return self.exc

    def settle(self, values: str) -> IterationError:
        """In the kernel, once the iteration is committed: its loop values,
        and a worker's frames as the exception's cause (as CPython's
        ``concurrent.futures.process`` shows a child's traceback)."""
        self.values = values
        if self.remote_traceback and self.exc.__cause__ is None:
            self.exc.__cause__ = RemoteTraceback(self.remote_traceback)
        return self

    def __repr__(self) -> str:
        return f"<iteration {self.index} ({self.values}): {self.exc!r}>"


@dataclass
class WorkerTotals:
    """What one worker did in the run (chunks never committed included)."""

    name: str
    done: int = 0  # iterations it completed
    busy: float = 0.0  # seconds spent in chunks
    failed: int = 0  # iterations that raised on it
    chunks: int = 0


@dataclass
class LastRun:
    magic: str
    backend: str
    options: dict[str, Any]
    workers: int
    total: int | None
    done: int = 0
    wall: float = 0.0
    chunks: list[ChunkRecord] = field(default_factory=list)
    errors: list[IterationError] = field(default_factory=list)
    interrupted: bool = False
    roles: dict[str, str] = field(default_factory=dict)
    threads: dict[str, Any] = field(default_factory=dict)  # threads=auto: choice and inputs
    notes: list[str] = field(default_factory=list)
    #: worker name -> what it did (the live rows are the views' own:
    #: parloop.progress.base.LiveState)
    by_worker: dict[str, WorkerTotals] = field(default_factory=dict)
    #: the most iterations handed out but not yet committed at any moment (the
    #: kernel's memory bound: never the whole loop)
    max_outstanding: int = 0
    #: the loop ran natively in the kernel (iterations cheaper than shipping them)
    native: bool = False
    #: how chunks reached engines: "channel" (one task per engine pulling chunks
    #: over parloop's socket, engines on the kernel's host) or "tasks" (one
    #: ipyparallel task per chunk); empty for threads
    dispatch: str = ""
    #: the dependence test (loops whose iterations may depend on each other):
    #: iterations re-executed in the kernel, why (one line each, in order),
    #: the iteration from which the rest ran serially in the kernel, and how
    #: many reads of shared objects the workers recorded
    reruns: list[int] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    serial_from: int | None = None
    reads: int = 0
    #: what would let a loop that conflicts run in parallel (``private=``)
    hint: str = ""
    #: hidden state found (an input changed behind the log): what changed
    hidden: str = ""
    #: the iteration whose ``break`` ended the loop
    broke_at: int | None = None

    def dependence_note(self) -> str | None:
        """One line for ``notes`` and the report: what the dependence test did."""
        if self.hidden:
            return (
                f"hidden state: {self.hidden}; ran serially in the kernel from iteration "
                f"{self.serial_from}"
            )
        if not self.reruns:
            return None
        why = self.conflicts[0] if self.conflicts else ""
        if self.hint:
            why += f"; {self.hint}"
        if self.serial_from is not None:
            first = self.reruns[0]
            return (
                f"iterations {first}-{max(self.done - 1, first)} ran in the kernel "
                f"(serially from iteration {self.serial_from}: most iterations depend "
                f"on earlier ones): {why}"
            )
        return (
            f"{len(self.reruns)} iteration(s) re-run in the kernel ({_ranges(self.reruns)}): {why}"
        )

    @property
    def per_worker(self) -> dict[str, dict[str, float]]:
        """worker -> {"iterations", "busy" (seconds), "chunks"}."""
        out: dict[str, dict[str, float]] = {}
        for c in self.chunks:
            w = out.setdefault(c.worker, {"iterations": 0, "busy": 0.0, "chunks": 0})
            w["iterations"] += c.count
            w["busy"] += c.seconds
            w["chunks"] += 1
        return out

    @property
    def iteration_seconds(self) -> list[tuple[int, int, float]]:
        """(first index, count, mean seconds per iteration) per chunk: the
        per-iteration timing at the granularity it is measured at."""
        return [
            (c.start, c.count, c.seconds / c.count if c.count else 0.0)
            for c in sorted(self.chunks, key=lambda c: c.start)
        ]

    @property
    def busy(self) -> float:
        return sum(c.seconds for c in self.chunks)

    def summary(self) -> str:
        total = "?" if self.total is None else str(self.total)
        speed = self.busy / self.wall if self.wall > 0 else 0.0
        parts = [
            f"{self.magic} on {self.workers} worker(s) ({self.backend}): "
            f"{self.done}/{total} iterations in {self.wall:.3f} s "
            f"(busy/wall = {speed:.2f})"
        ]
        if self.errors:
            parts.append(f"{len(self.errors)} failed")
        if self.interrupted:
            parts.append("interrupted")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"<LastRun {self.summary()}>"


def _ranges(indices: list[int], most: int = 6) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    out: list[str] = []
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:  # type: ignore[operator]
            prev = i
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ", ".join(out[:most]) + (", ..." if len(out) > most else "")
