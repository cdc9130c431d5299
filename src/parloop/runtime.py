"""What runs in a worker (a kernel thread or an ipyparallel engine): one chunk
of iterations through the generated chunk function, with its output captured
and its failures recorded.

The same code serves both backends, so the two magics cannot drift apart.
"""

from __future__ import annotations

import builtins
import contextvars
import copy
import io
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

from . import seeding
from .fingerprint import Unfingerprintable, fingerprint, first_change, watch_all
from .log.entries import SCALARS, TARGET
from .record import IterationError
from .tracking import DELETED, DirectReader, NeedsKernel, Reader


class StderrText(str):
    """A piece of captured output that was written to stderr (kept in the same
    list as stdout so the order of the two is preserved)."""

    __slots__ = ()


# ---------------------------------------------------------------------------
# output capture
# ---------------------------------------------------------------------------
#: the calling worker's output list; a context variable, so that it is per
#: thread for the thread pool and per task for asyncio iterations
_parts_var: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "parloop_parts", default=None
)


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


def _print_of(value: Any) -> Any:
    """What a loop item is now, to tell later whether it changed: a plain
    array's own copy (a copy and a comparison cost a fraction of hashing
    it), anything else's fingerprint; None if it has none."""
    if type(value).__name__ == "ndarray" and getattr(value, "dtype", None) is not None:
        if value.dtype.kind not in "OV":
            return value.copy()
    try:
        return fingerprint(value)
    except Unfingerprintable:
        return None


def _changed(before: Any, value: Any) -> bool:
    """Whether the item ``value`` differs from ``before`` (:func:`_print_of`)."""
    if before is None:
        return True
    if isinstance(before, bytes):
        return _print_of(value) != before
    return (
        type(value) is not type(before)
        or value.shape != before.shape
        or value.dtype != before.dtype
        or value.tobytes() != before.tobytes()
    )


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
    #: the iteration (index in the chunk) that ran the body's ``break``
    broke: int | None = None
    #: speculative loops only: per-iteration records (see LoopShape.speculative)
    iters: "IterationRecords | None" = None
    #: a watched object changed on the worker (hidden state): why, or "".
    #: The kernel runs this chunk and the rest of the loop serially
    hidden: str = ""
    #: seconds the worker spent fingerprinting watched objects for this chunk
    watch_seconds: float = 0.0


@dataclass(frozen=True)
class LoopShape:
    """What the worker runtime must know of a loop beyond its code (the same
    object travels to engines)."""

    private: frozenset[str]
    #: written-and-read outside objects: reads recorded, own writes overlaid
    shared: frozenset[str] = frozenset()
    #: shared objects accessed at one key expression only: reads not recorded
    #: (the key an iteration writes is the key it read; see log.commit)
    same_key: frozenset[str] = frozenset()
    #: privates that may be read before the iteration assigns them
    checked: frozenset[str] = frozenset()
    #: private names the body deletes (``del tmp``)
    deleted: frozenset[str] = frozenset()
    #: the ``private=`` names: each iteration starts from a copy
    copies: tuple[str, ...] = ()
    #: the body seeds the module-level generators (``np.random.seed(i)``)
    body_seeds: bool = False
    #: objects the body hands to code that could change them: ``(name,)`` an
    #: input, ``(function, name)`` a global of a notebook function it calls.
    #: Engines fingerprint them around each chunk (see parloop.fingerprint)
    watch: tuple[tuple[str, ...], ...] = ()
    #: inputs whose objects a write may store: engines send such values back
    #: as references to the kernel's own objects (see parloop.backends.engines.worker)
    stored: tuple[str, ...] = ()
    #: random generator objects the body draws from (``rng.normal()``): with
    #: ``seed=`` each iteration has its own, derived from (seed, index)
    streams: tuple[str, ...] = ()
    #: notebook functions (and methods of notebook classes) the body calls, as
    #: factories of the workers' copies: ``(path from the body's globals,
    #: factory module, key, (name, first line) of the analysed code)``
    functions: tuple[tuple[tuple[str, ...], Any, str, tuple[str, int]], ...] = ()

    @property
    def speculative(self) -> bool:
        """Iterations may depend on earlier ones: per-iteration records, checked
        at commit (see parloop.log.conflicts)."""
        return bool(self.shared or self.checked)


@dataclass
class IterationRecords:
    """Per-iteration facts of a speculative chunk, so the kernel can commit
    or re-execute each iteration on its own: where its log entries, output
    and reads begin, its private names at its end, whether it stopped
    because the worker could not run it serially."""

    pmarks: list[int] = field(default_factory=list)
    rmarks: list[int] = field(default_factory=list)
    privates: list[dict[str, Any]] = field(default_factory=list)
    reads: list[tuple[str, tuple]] = field(default_factory=list)
    #: iteration -> why the worker could not run it (the shared object it
    #: read after changing it, or a private it read unbound)
    needs_kernel: dict[int, str] = field(default_factory=dict)
    failed: dict[int, "IterationError"] = field(default_factory=dict)


class _Helpers:
    """Builtins the chunk function needs, passed in so that a notebook that
    rebinds ``len`` or ``slice`` does not change parloop's own code."""

    __slots__ = ()
    len = staticmethod(builtins.len)
    slice = builtins.slice
    enumerate = builtins.enumerate
    locals = staticmethod(builtins.locals)
    deepcopy = staticmethod(copy.deepcopy)
    NeedsKernel = NeedsKernel
    once = (0,)  # the async iteration function's one-pass loop (for `continue`)


HELPERS = _Helpers()


_NOTHING = object()


def private_values(local_vars: dict[str, Any], private: Collection[str]) -> dict[str, Any]:
    """The iteration's private names (their last values) from a worker's locals."""
    return {k: v for k, v in local_vars.items() if k in private}


class ChunkControl:
    """The chunk function's link to the run: the stop flag it polls at every
    iteration, what to do when an iteration raises, and (speculative loops)
    the per-iteration records and the reads of shared objects."""

    __slots__ = (
        "stop",
        "start",
        "on_error",
        "marks",
        "errors",
        "raised",
        "halted_at",
        "log",
        "parts",
        "seed_value",
        "private",
        "timeout",
        "broke_at",
        "shape",
        "iters",
        "reader",
        "write",
        "init",
        "originals",
        "dels",
        "direct",
        "_fresh_streams",
        "hidden",
        "fns",
        "_item_prints",
    )

    def __init__(
        self,
        start: int,
        on_error: str,
        log: Any,
        parts: list,
        private: Collection[str],
        seed_value: int | None = None,
        timeout: float | None = None,
        shape: LoopShape | None = None,
        objects: Any = None,
        lock: Any = None,
        init: dict[str, Any] | None = None,
        originals: dict[str, Any] | None = None,
        direct: bool = False,
    ):
        self.timeout = timeout
        self.stop = False
        self.start = start
        self.on_error = on_error
        self.marks: list[int] = []
        self.errors: list[IterationError] = []
        self.raised: IterationError | None = None
        self.halted_at: int | None = None
        self.broke_at: int | None = None
        self.log = log
        self.parts = parts
        self.seed_value = seed_value
        self.private = private
        self.shape = shape
        #: kernel re-execution: writes applied at once, reads direct
        self.direct = direct
        self.init = init or {}
        self.originals = originals or {}
        self.dels: set[str] = set()
        self.hidden = ""
        self.fns: dict[str, Callable] = {}
        #: this iteration's items and what they were when it began (watch_items)
        self._item_prints: dict[str, tuple[Any, Any]] = {}
        self._fresh_streams = bool(shape and shape.body_seeds)
        self.iters: IterationRecords | None = None
        self.reader: Any = DirectReader()
        self.write: Any = log.append
        if shape is not None and shape.speculative:
            self.iters = IterationRecords()
            if not direct and shape.shared:
                reader = Reader(
                    objects if objects is not None else {}, log, lock, unrecorded=shape.same_key
                )
                self.reader = reader
                self.write = reader.write

    def halt(self, n: int) -> None:
        self.halted_at = n

    def broke(self, n: int) -> None:
        """The body's ``break`` ran in the chunk's n-th iteration."""
        self.broke_at = n
        self.halted_at = n + 1

    def deleted(self, name: str) -> None:
        """``del name`` of a private ran (after the loop the name is unbound
        unless a later iteration binds it again)."""
        self.dels.add(name)

    def stream(self, name: str, n: int) -> Any:
        """``seed=``: iteration n's own generator standing for the outside
        generator ``name`` (whose state the iteration leaves alone)."""
        assert self.seed_value is not None
        return seeding.stream_like(self.originals[name], self.seed_value, self.start + n)

    def copy_of(self, name: str) -> Any:
        """``private=name``: the iteration's own copy of the outside object as
        it was before the loop."""
        return copy.deepcopy(self.originals[name])

    def sync(
        self, n: int, local_vars: dict[str, Any], stored: list[str], mutated: list[str]
    ) -> None:
        """End of an iteration on a worker with its own copies of the items:
        send the loop target's objects back (see replay.TARGET): ``stored``
        ones always (a write may have stored the copy: the kernel puts its
        own item in its place), ``mutated`` ones when the iteration changed
        them (the kernel's item then takes the copy's state)."""
        if self.direct:
            return
        before, self._item_prints = self._item_prints, {}
        for name in sorted({*stored, *mutated}):
            v = local_vars.get(name, _NOTHING)
            # the item itself, even when the body bound the name to another
            # object since (``x = sorted(x)`` leaves the item as it was)
            item, was = before.get(name, (_NOTHING, None))
            changed = item is not _NOTHING and _changed(was, item)
            if changed:
                self.log.append((TARGET, n, name, item, True))
            if name in stored and v is not _NOTHING and not isinstance(v, SCALARS):
                if not (changed and v is item):
                    self.log.append((TARGET, n, name, v, False))

    def watch_items(self, local_vars: dict[str, Any], names: list[str]) -> None:
        """Start of an iteration on a worker with its own copies of the
        items: what the items the body may change behind the log's back are
        now (:meth:`sync` sends back only those it changed)."""
        if self.direct:
            return
        self._item_prints = {
            name: (v, _print_of(v))
            for name in names
            if not isinstance(v := local_vars.get(name, _NOTHING), SCALARS) and v is not _NOTHING
        }

    def begin(self, n: int) -> None:
        """Per-iteration set-up, emitted only when seed=, timeout= or a seed
        call in the body asks for it."""
        if self.seed_value is not None:
            seeding.seed_iteration(self.seed_value, self.start + n)
        elif self._fresh_streams:
            seeding.fresh_iteration()
        if self.timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, self.timeout)

    # -- speculative loops ---------------------------------------------------
    def begin_iter(self, n: int) -> None:
        it = self.iters
        if it is not None:
            it.pmarks.append(len(self.parts))
            reader = self.reader
            if type(reader) is Reader:
                it.rmarks.append(len(reader.reads))
                reader.begin()

    def end_iter(self, n: int, local_vars: dict[str, Any]) -> None:
        """The iteration's private names (each iteration of a speculative
        chunk starts with them unbound, so these are the ones it bound)."""
        it = self.iters
        if it is None:
            return
        reader = self.reader
        if type(reader) is Reader and reader.stuck:
            name = reader.stuck if isinstance(reader.stuck, str) else "a shared object"
            it.needs_kernel.setdefault(n, f"reads `{name}` after changing it itself")
        names = self.private
        snap = {k: v for k, v in local_vars.items() if k in names}
        if self.dels:
            for name in self.dels:
                if name not in snap:
                    snap[name] = DELETED
            self.dels = set()
        it.privates.append(snap)

    def needs_kernel(self, n: int) -> None:
        """The worker cannot run iteration n as serial execution would."""
        if self.iters is not None:
            stuck = getattr(self.reader, "stuck", False)
            why = (
                f"reads `{stuck}` after changing it itself"
                if isinstance(stuck, str)
                else "could not run on its worker as serial execution would"
            )
            self.iters.needs_kernel.setdefault(n, why)

    def failed(self, n: int, exc: BaseException, local_vars: dict[str, Any]) -> bool:
        """Record a failing iteration; True means stop the chunk."""
        m0 = self.marks[n] if not self.direct else 0  # where its log entries begin
        if isinstance(exc, KeyboardInterrupt) or self.stop:
            # interrupted mid-iteration: its writes are dropped (the completed
            # prefix is what gets applied); what it printed stays, as serial
            # execution would have shown it before the interrupt
            if not self.direct:
                del self.log[m0:]
            del self.marks[n:]
            self.halted_at = n
            return True
        if (
            self.shape is not None
            and self.shape.watch
            and not self.direct
            and isinstance(exc, ValueError)
            and "read-only" in str(exc)
        ):
            # a write into an input array (mapped read-only on the engine): the
            # kernel runs this part of the loop on its own objects
            self.hidden = f"iteration {self.start + n} wrote into an input array ({exc})"
            self.halted_at = n
            return True
        snap = private_values(local_vars, self.private)
        err = IterationError(self.start + n, exc, snap)
        if self.iters is not None and not self.direct:
            checked = self.shape.checked if self.shape is not None else ()
            if checked and isinstance(exc, NameError) and (exc.name is None or exc.name in checked):
                # a private read before this chunk bound it: its value is the
                # previous iteration's, which this worker does not have
                self.iters.needs_kernel[n] = (
                    f"reads `{exc.name or 'a private'}` before "
                    "assigning it (the previous iteration's value)"
                )
                return False
            # whether it really fails is known at commit (it may have read
            # something an earlier iteration changed): go on
            self.iters.failed[n] = err
            return False
        if self.on_error == "raise":
            self.raised = err
            self.halted_at = n + 1
            return True
        if self.on_error == "skip" and not self.direct:
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


def run_chunk(
    fn: Callable,
    items: list,
    start: int,
    on_error: str,
    private: Collection[str],
    seed_value: int | None = None,
    worker: str = "",
    register: Callable[[ChunkControl], None] | None = None,
    timeout: float | None = None,
    shape: LoopShape | None = None,
    lock: Any = None,
    direct: Any = None,
    init: dict[str, Any] | None = None,
    originals: dict[str, Any] | None = None,
    watch: bool = False,
) -> ChunkResult:
    """Run one chunk through the generated function ``fn``.

    ``timeout`` (engines only: it needs the main thread's SIGALRM) interrupts
    an iteration that runs longer, as an IterationTimeout raised in it.
    ``direct``: a log whose ``append`` applies each entry at once (the kernel
    re-executing an iteration, see parloop.tracking.ApplyingLog).
    ``watch`` (engines): fingerprint ``shape.watch`` around the chunk."""
    log: Any = direct if direct is not None else []
    parts: list[str] = []
    if originals is None and shape is not None and (shape.copies or shape.streams):
        originals = {
            k: fn.__globals__[k] for k in shape.copies + shape.streams if k in fn.__globals__
        }
    ctl = ChunkControl(
        start,
        on_error,
        log,
        parts,
        private,
        seed_value,
        timeout,
        shape,
        objects=fn.__globals__,
        lock=lock,
        init=init,
        originals=originals,
        direct=direct is not None,
    )
    if register is not None:
        register(ctl)
    tw = time.perf_counter()
    watched = _watched(fn, shape) if watch and shape is not None and shape.watch else None
    watch_seconds = time.perf_counter() - tw
    ctl_token = None
    if shape is not None and shape.functions:
        ctl.fns = _function_copies(fn, shape)
        ctl_token = _ctl_var.set(ctl)
    old_handler = signal.signal(signal.SIGALRM, _on_alarm) if timeout is not None else None
    t0 = time.perf_counter()
    c0 = time.thread_time()
    # re-executed in the kernel: output goes straight out, in order with the
    # replayed calls' own output
    token = _parts_var.set(parts if direct is None else None)
    try:
        local_vars = fn(items, log, parts, ctl, HELPERS)
    finally:
        _parts_var.reset(token)
        if ctl_token is not None:
            _ctl_var.reset(ctl_token)
        if timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
        if seed_value is not None or ctl._fresh_streams:
            seeding.end_iterations()
    c1 = time.thread_time()
    t1 = time.perf_counter()
    done = len(items) if ctl.halted_at is None else ctl.halted_at
    snapshot = private_values(local_vars, private)
    if ctl.dels and ctl.iters is None:
        for name in ctl.dels:
            if name not in snapshot:
                snapshot[name] = DELETED
    iters = ctl.iters
    if iters is not None and type(ctl.reader) is Reader:
        iters.reads = ctl.reader.reads
    tw = time.perf_counter()
    hidden = ctl.hidden or (first_change(watched) if watched else "")
    watch_seconds += time.perf_counter() - tw
    return ChunkResult(
        start=start,
        done=done,
        log=log if direct is None else [],
        marks=ctl.marks[:done],
        parts=parts,
        snapshot=snapshot,
        errors=ctl.errors,
        raised=ctl.raised,
        halted=ctl.halted_at is not None
        and ctl.raised is None
        and ctl.broke_at is None
        and not ctl.hidden
        and done < len(items),
        worker=worker,
        t_start=t0,
        t_end=t1,
        cpu=c1 - c0,
        broke=ctl.broke_at,
        iters=iters,
        hidden=hidden,
        watch_seconds=watch_seconds,
    )


#: the chunk control of the running chunk (per thread / task): notebook
#: functions' copies find the log through it
_ctl_var: contextvars.ContextVar[ChunkControl | None] = contextvars.ContextVar(
    "parloop_ctl", default=None
)


class _FunctionRuntime:
    """What the copies of notebook functions call (``___rt``)."""

    @staticmethod
    def control() -> ChunkControl:
        ctl = _ctl_var.get()
        if ctl is None:
            raise RuntimeError(
                "parloop: a worker's copy of a notebook function was called "
                "outside the loop it was made for"
            )
        return ctl

    @staticmethod
    def writer(ctl: ChunkControl, g: dict[str, Any]) -> Callable[[tuple], None]:
        reader = ctl.reader
        if type(reader) is Reader:
            return lambda entry: reader.write(entry, g)
        return ctl.write


FUNCTION_RUNTIME = _FunctionRuntime()


def _function_copies(fn: Callable, shape: LoopShape) -> dict[str, Callable]:
    """The workers' copies of the notebook functions the body calls, made
    once per chunk function (once per run on an engine), each in the globals
    of the function it stands for."""
    cached = fn.__dict__.get("___parloop_fns")
    if cached is not None:
        return cached
    fns: dict[str, Callable] = {}
    for path, module, key, where in shape.functions:
        orig: Any = fn.__globals__.get(path[0])
        rest = path[1:]
        if rest[:1] == ("#method",):  # an instance, then its class's method
            orig = getattr(type(orig), rest[1], None)
            rest = rest[2:]
        for name in rest:
            orig = getattr(orig, "__globals__", {}).get(name)
        code = getattr(orig, "__code__", None)
        if code is None or (code.co_name, code.co_firstlineno) != where:
            continue  # not the function that was analysed: the original runs
        scratch: dict[str, Any] = {}
        exec(compile(module, orig.__code__.co_filename, "exec"), orig.__globals__, scratch)
        copy_ = scratch["___parloop_factory"](FUNCTION_RUNTIME, fns, orig.__globals__)
        copy_.__defaults__ = orig.__defaults__
        copy_.__kwdefaults__ = orig.__kwdefaults__
        fns[key] = copy_
    fn.__dict__["___parloop_fns"] = fns
    return fns


def _read_only(obj: Any) -> bool:
    """Input arrays are made read-only instead of fingerprinted: a write into
    one raises (and is taken for hidden state), at no cost per chunk."""
    if type(obj).__name__ != "ndarray" or getattr(obj, "flags", None) is None:
        return False
    try:
        obj.flags.writeable = False
    except ValueError:
        pass
    return True


def _watched(fn: Callable, shape: LoopShape) -> list[Any]:
    """The watched objects on this worker with their fingerprints as they were
    when the run's first chunk here began (kept on the chunk function, which
    is compiled once per run per engine)."""
    cached = fn.__dict__.get("___parloop_watch")
    if cached is None:
        cached = fn.__dict__["___parloop_watch"] = watch_all(
            shape.watch, fn.__globals__, skip=_read_only
        )
    return cached
