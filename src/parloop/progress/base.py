"""What a run tells a live view (the text bar, the widget), and the live state
the dispatcher keeps for them while the run goes.

The live state is not part of ``parloop.last_run`` (a public record of what
happened): it is owned by the dispatcher, updated about five times a second,
and handed to the views with each call."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..record import LastRun


@dataclass
class WorkerState:
    """One worker as the live view shows it."""

    name: str
    done: int = 0  # iterations it completed in this run
    busy: float = 0.0  # seconds spent in chunks (finished ones)
    current: int | None = None  # the iteration it is on now
    current_values: str = ""  # a short repr of that iteration's loop values
    failed: int = 0  # iterations that raised on it
    chunks: int = 0
    partial: int = 0  # iterations done in the chunk it is running

    @property
    def shown_done(self) -> int:
        return self.done + self.partial


@dataclass
class LiveState:
    """The run as the views show it while it goes."""

    #: worker name -> its row (empty where chunks are batches of concurrent
    #: iterations: asyncio tasks have no worker rows)
    workers: dict[str, WorkerState] = field(default_factory=dict)
    #: chunks are batches of concurrent iterations (Backend.concurrent_chunks)
    concurrent: bool = False
    #: iterations running right now, where the backend counts them
    in_flight: int | None = None

    def worker(self, name: str) -> WorkerState:
        found = self.workers.get(name)
        if found is None:
            found = self.workers[name] = WorkerState(name)
        return found


class Progress:
    """A live view: ``start`` before the first iteration, ``update`` at most
    about ten times a second while the run goes (``live.workers`` holds the
    per-worker rows when ``wants_live`` is true), ``close`` once, however the
    run ended, with the record complete (wall time, errors, interrupt).

    This base class shows nothing (``progress=off``)."""

    wants_live = False

    def start(self, record: LastRun, live: LiveState) -> None: ...

    def update(self, record: LastRun, live: LiveState) -> None: ...

    def close(self, record: LastRun, live: LiveState) -> None: ...
