"""What runs in a worker (a kernel thread or an ipyparallel engine): one chunk
of iterations through the generated chunk function, with its output captured
and its failures recorded.

The same code serves both backends, so the two magics cannot drift apart.
"""
from __future__ import annotations

import builtins
import contextvars
import io
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .replay import _SCALARS, TARGET
from . import seeding


class StderrText(str):
    """A piece of captured output that was written to stderr (kept in the same
    list as stdout so the order of the two is preserved)."""

    __slots__ = ()


# ---------------------------------------------------------------------------
# output capture
# ---------------------------------------------------------------------------
#: the calling worker's output list; a context variable, so that it is per
#: thread for the thread pool and per task for asyncio iterations
_parts_var: contextvars.ContextVar[list | None] = contextvars.ContextVar("parloop_parts",
                                                                        default=None)


class _Router(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr while a run is active: a worker
    thread's writes go to its chunk's list, everything else to the stream that
    was there before."""

    def __init__(self, fallback: Any, err: bool):
        self._fallback = fallback
        self._err = err

    def write(self, s: str) -> int:  # type: ignore[override]
        parts = _parts_var.get()
        if parts is None:
            return self._fallback.write(s)
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        parts.append(StderrText(s) if self._err else s)
        return len(s)

    def flush(self) -> None:
        if _parts_var.get() is None:
            try:
                self._fallback.flush()
            except ValueError:  # the stream it stood for was closed meanwhile
                pass

    def close(self) -> None:
        """The router owns no stream: closing it (io's finaliser does, at
        exit) must not flush or close the stream it stands for."""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._fallback, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fallback, name)


class OutputCapture:
    """Install the routers for the duration of a run (re-entrant)."""

    _lock = threading.Lock()
    _depth = 0
    _saved: tuple[Any, Any] | None = None

    def __enter__(self) -> "OutputCapture":
        with OutputCapture._lock:
            if OutputCapture._depth == 0:
                OutputCapture._saved = (sys.stdout, sys.stderr)
                sys.stdout = _Router(sys.stdout, False)
                sys.stderr = _Router(sys.stderr, True)
            OutputCapture._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with OutputCapture._lock:
            OutputCapture._depth -= 1
            if OutputCapture._depth == 0 and OutputCapture._saved is not None:
                sys.stdout, sys.stderr = OutputCapture._saved
                OutputCapture._saved = None

    @staticmethod
    def real_streams() -> tuple[Any, Any]:
        """The streams the kernel's own writes (committed output) go to."""
        saved = OutputCapture._saved
        return saved if saved is not None else (sys.stdout, sys.stderr)


def write_parts(parts: list[str], out: Any = None, err: Any = None) -> None:
    """Write captured output to the real streams, in order, merging runs of the
    same stream into one write."""
    if not parts:
        return
    if out is None or err is None:
        out, err = OutputCapture.real_streams()
    if not any(type(p) is StderrText for p in parts):
        out.write("".join(parts))
        return
    run: list[str] = []
    run_err = False
    for p in parts:
        is_err = type(p) is StderrText
        if run and is_err != run_err:
            (err if run_err else out).write("".join(run))
            run = []
        run.append(p)
        run_err = is_err
    if run:
        (err if run_err else out).write("".join(run))
    if any(type(p) is StderrText for p in parts):
        err.flush()


# ---------------------------------------------------------------------------
# one chunk
# ---------------------------------------------------------------------------
@dataclass
class IterationError:
    """An iteration that raised: its index in the whole loop and the exception."""

    index: int
    exc: BaseException
    snapshot: dict[str, Any] | None = None


@dataclass
class ChunkResult:
    """What a worker sends back for a chunk: everything the kernel needs to
    commit it (the log, the output, the private names' last values) and the
    facts the report shows."""

    start: int
    done: int  # iterations completed (a failed one counts, a halted one does not)
    log: list
    marks: list[int]
    parts: list[str]
    snapshot: dict[str, Any]
    errors: list[IterationError] = field(default_factory=list)
    raised: IterationError | None = None
    halted: bool = False
    worker: str = ""
    t_start: float = 0.0
    t_end: float = 0.0
    cpu: float = 0.0


class _Helpers:
    """Builtins the chunk function needs, passed in so that a notebook that
    rebinds ``len`` or ``slice`` does not change parloop's own code."""

    __slots__ = ()
    len = staticmethod(builtins.len)
    slice = builtins.slice
    enumerate = builtins.enumerate
    locals = staticmethod(builtins.locals)
    once = (0,)  # the async iteration function's one-pass loop (for `continue`)


HELPERS = _Helpers()


_NOTHING = object()


def private_values(local_vars: dict[str, Any], private: set[str]) -> dict[str, Any]:
    """The iteration's private names (their last values) from a worker's locals."""
    return {k: v for k, v in local_vars.items() if k in private}


class ChunkControl:
    """The chunk function's link to the run: the stop flag it polls at every
    iteration, and what to do when an iteration raises."""

    __slots__ = ("stop", "start", "on_error", "marks", "errors", "raised", "halted_at",
                 "log", "parts", "seed_value", "private", "timeout")

    def __init__(self, start: int, on_error: str, log: list, parts: list,
                 private: set[str], seed_value: int | None = None,
                 timeout: float | None = None):
        self.timeout = timeout
        self.stop = False
        self.start = start
        self.on_error = on_error
        self.marks: list[int] = []
        self.errors: list[IterationError] = []
        self.raised: IterationError | None = None
        self.halted_at: int | None = None
        self.log = log
        self.parts = parts
        self.seed_value = seed_value
        self.private = private

    def halt(self, n: int) -> None:
        self.halted_at = n

    def sync(self, n: int, local_vars: dict[str, Any], names: list[str],
             mutated: list[str]) -> None:
        """End of an iteration on a worker with its own copies of the items:
        send the loop target's objects back (see replay.TARGET)."""
        for name in names:
            v = local_vars.get(name, _NOTHING)
            if v is not _NOTHING and not isinstance(v, _SCALARS):
                self.log.append((TARGET, n, name, v, name in mutated))

    def begin(self, n: int) -> None:
        """Per-iteration set-up, emitted only when seed= or timeout= is given."""
        if self.seed_value is not None:
            seeding.seed_iteration(self.seed_value, self.start + n)
        if self.timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, self.timeout)

    def failed(self, n: int, exc: BaseException, local_vars: dict[str, Any]) -> bool:
        """Record a failing iteration; True means stop the chunk."""
        m0 = self.marks[n]  # where the iteration's log entries begin
        if isinstance(exc, KeyboardInterrupt) or self.stop:
            # interrupted mid-iteration: its writes are dropped (the completed
            # prefix is what gets applied); what it printed stays, as serial
            # execution would have shown it before the interrupt
            del self.log[m0:]
            del self.marks[n:]
            self.halted_at = n
            return True
        snap = private_values(local_vars, self.private)
        err = IterationError(self.start + n, exc, snap)
        if self.on_error == "raise":
            self.raised = err
            self.halted_at = n + 1
            return True
        if self.on_error == "skip":
            del self.log[m0:]
        self.errors.append(err)
        return False


class IterationTimeout(TimeoutError):
    """An iteration ran longer than ``timeout=`` (raised inside it, on the engine)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise IterationTimeout("the iteration ran longer than the timeout= option allows")


def capture_into(parts: list) -> contextvars.Token:
    """Route this thread's (or task's) output into ``parts``."""
    return _parts_var.set(parts)


def run_chunk(fn: Callable, items: list, start: int, on_error: str, private: set[str],
              seed_value: int | None = None, worker: str = "",
              register: Callable[[ChunkControl], None] | None = None,
              timeout: float | None = None) -> ChunkResult:
    """Run one chunk through the generated function ``fn``.

    ``timeout`` (engines only: it needs the main thread's SIGALRM) interrupts
    an iteration that runs longer, as an IterationTimeout raised in it."""
    log: list = []
    parts: list[str] = []
    ctl = ChunkControl(start, on_error, log, parts, private, seed_value, timeout)
    if register is not None:
        register(ctl)
    old_handler = signal.signal(signal.SIGALRM, _on_alarm) if timeout is not None else None
    t0 = time.perf_counter()
    c0 = time.thread_time()
    token = _parts_var.set(parts)
    try:
        local_vars = fn(items, log, parts, ctl, HELPERS)
    finally:
        _parts_var.reset(token)
        if timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
        if seed_value is not None:
            seeding.end_iterations()
    c1 = time.thread_time()
    t1 = time.perf_counter()
    done = len(items) if ctl.halted_at is None else ctl.halted_at
    snapshot = private_values(local_vars, private)
    return ChunkResult(start=start, done=done, log=log, marks=ctl.marks[:done], parts=parts,
                       snapshot=snapshot, errors=ctl.errors, raised=ctl.raised,
                       halted=ctl.halted_at is not None and ctl.raised is None
                       and done < len(items),
                       worker=worker, t_start=t0, t_end=t1, cpu=c1 - c0)
