"""Runs ON AN ENGINE: the entry point that ipyparallel calls for each chunk.

Engines share nothing with the kernel but the installed packages: the chunk
function arrives as an AST (compiled here under the cell's name, with the
cell's text put into linecache so tracebacks show the user's lines), the
inputs arrive by value through :mod:`parloop.transport`, and payloads travel
as cloudpickle bytes so instances of notebook classes survive the round trip
(cloudpickle's class tracking gives the kernel back its own classes).
"""

from __future__ import annotations

import builtins
import importlib
import io
import linecache
import os
import pickle
import socket
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle

from . import seeding
from .runtime import ChunkResult, LoopShape, OutputCapture, run_chunk

#: compiled chunk functions by program key (a few runs' worth)
_FUNCTIONS: dict[str, Callable] = {}


@dataclass
class Program:
    """One loop's worker side: what every chunk of the run shares."""

    chunk_module: Any  # ast.Module
    filename: str
    cell_lines: list[str]
    private: set[str]
    on_error: str
    seed: int | None
    timeout: float | None = None
    live: bool = False
    shape: LoopShape | None = None
    imports: tuple[str, ...] = ()
    #: the notebook cells defining the functions it calls (see analysis.namespace.cell_sources)
    sources: dict[str, Any] = field(default_factory=dict)

    @property
    def seeded(self) -> bool:
        return self.seed is not None or bool(self.shape and self.shape.body_seeds)


def _function(key: str, program: Program, inputs: dict[str, Any]) -> Callable:
    fn = _FUNCTIONS.get(key)
    if fn is None:
        for name in program.imports:
            # the kernel had imported these submodules; a module input travels
            # by reference and brings only its top-level package
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        linecache.cache[program.filename] = (
            sum(map(len, program.cell_lines)),
            None,
            program.cell_lines,
            program.filename,
        )
        for filename, lines in program.sources.get("files", {}).items():
            # the cells that define the notebook functions the loop calls: a
            # traceback from inside one shows its lines, as in the kernel
            linecache.cache.setdefault(filename, (sum(map(len, lines)), None, lines, filename))
        globals_: dict[str, Any] = {"__builtins__": builtins, "__name__": "__parloop__"}
        globals_.update(inputs)
        scratch: dict[str, Any] = {}
        exec(compile(program.chunk_module, program.filename, "exec"), globals_, scratch)
        fn = scratch["___parloop_chunk"]
        if len(_FUNCTIONS) > 8:
            _FUNCTIONS.pop(next(iter(_FUNCTIONS)))
        _FUNCTIONS[key] = fn
    return fn


class _InputPickler(cloudpickle.CloudPickler):
    """Pickles the kernel's own objects (inputs, and the elements of input
    containers, as the engine received them) as references: the kernel
    stores its own object where serial execution would have."""

    def __init__(self, file: Any, ids: dict[int, tuple]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._ids = ids

    def persistent_id(self, obj: Any) -> Any:  # noqa: D102
        return self._ids.get(id(obj))


def _input_ids(fn: Callable, names: tuple[str, ...]) -> dict[int, tuple]:
    """id -> ("parloop-input", name, path) for the inputs ``names`` and their
    elements (once per run: kept on the chunk function)."""
    ids = fn.__dict__.get("___parloop_ids")
    if ids is not None:
        return ids
    from .log.entries import SCALARS

    ids = {}
    for name in names:
        obj = fn.__globals__.get(name)
        if obj is None or isinstance(obj, SCALARS):
            continue
        ids[id(obj)] = ("parloop-input", name, ())
        items = (
            enumerate(obj)
            if isinstance(obj, (list, tuple))
            else obj.items()
            if isinstance(obj, dict)
            else ()
        )
        for k, v in items:
            if not isinstance(v, SCALARS):
                ids.setdefault(id(v), ("parloop-input", name, (k,)))
            if len(ids) > 1_000_000:
                break
    fn.__dict__["___parloop_ids"] = ids
    return ids


def _traceback_text(exc: BaseException, functions: dict[str, str]) -> str:
    """The exception's traceback as the engine saw it, with the frames of
    notebook functions (cloudpickle names their file ``<dynamic-code>``) put
    back in their cells, so their source lines show."""
    te = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    todo = [te]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for k, f in enumerate(t.stack):
            if f.filename == "<dynamic-code>" and f.name in functions and f.lineno:
                real = functions[f.name]
                t.stack[k] = traceback.FrameSummary(
                    real, f.lineno, f.name, line=linecache.getline(real, f.lineno).strip()
                )
        todo += [x for x in (t.__cause__, t.__context__) if x is not None]
    return "".join(te.format())


def _portable(
    res: ChunkResult, ids: dict[int, tuple] | None = None, functions: dict[str, str] | None = None
) -> bytes:
    """cloudpickle the result; values that cannot travel (an open file left in
    a private name, an exception holding a socket) are replaced by a
    description rather than losing the whole chunk."""
    for err in res.errors + ([res.raised] if res.raised else []):
        err.tb_text = _traceback_text(err.exc, functions or {})  # type: ignore[attr-defined]
        err.exc.__traceback__ = None
    if ids:
        try:
            buf = io.BytesIO()
            _InputPickler(buf, ids).dump(res)
            return buf.getvalue()
        except Exception:  # noqa: BLE001 - the plain ways below say what does not pickle
            pass
    try:
        # the C pickler first: several times faster on big logs; anything it
        # cannot do by reference (notebook classes, lambdas) goes to cloudpickle
        return pickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001
        pass
    try:
        return cloudpickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - find what does not pickle
        pass
    for name, value in list(res.snapshot.items()):
        try:
            cloudpickle.dumps(value)
        except Exception as e:  # noqa: BLE001
            res.snapshot[name] = _Unpicklable(name, type(value).__name__, str(e))
    for err in res.errors + ([res.raised] if res.raised else []):
        try:
            cloudpickle.dumps(err.exc)
        except Exception:  # noqa: BLE001
            err.exc = RuntimeError(
                f"{type(err.exc).__name__}: {err.exc} (the exception itself could not be sent back)"
            )
        err.snapshot = {}
    return cloudpickle.dumps(res, protocol=pickle.HIGHEST_PROTOCOL)


@dataclass
class _Unpicklable:
    name: str
    type_name: str
    why: str

    def __repr__(self) -> str:
        return f"<{self.type_name} {self.name!r} stayed on the engine: {self.why}>"


class _ProgressPublisher:
    """Publishes which chunk runs and how many of its iterations are done,
    four times a second, through ipyparallel's data publication (the kernel
    reads it from the task's AsyncResult ``data``): progress per iteration,
    not per chunk.  One publisher serves every chunk of a serve task."""

    PERIOD = 0.25

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._ctl: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, ctl: Any) -> None:
        self._ctl = ctl
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def _run(self) -> None:
        try:
            from ipyparallel.datapub import publish_data
        except ImportError:  # not on an engine (tests calling run_remote directly)
            return
        last = None
        wait = self.PERIOD / 2.5  # a first reading soon, then four a second
        while not self._stop.wait(wait):
            wait = self.PERIOD
            ctl = self._ctl
            now = (ctl.start, len(ctl.marks))
            if now != last:
                try:
                    publish_data({"parloop_start": now[0], "parloop_done": now[1]})
                except Exception:  # noqa: BLE001 - not inside an engine task
                    return
                last = now

    def stop(self) -> None:
        self._stop.set()


def _setup(keys: dict[str, str]) -> tuple[Callable, Program]:
    """The run's chunk function, compiled once per engine per run."""
    from .transport import engine_resolve

    values = engine_resolve(keys)
    program = values.pop("___program")
    assert isinstance(program, Program)
    return _function(repr(sorted(keys.items())), program, values), program


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _run(
    fn: Callable,
    program: Program,
    payload: bytes | memoryview,
    publisher: _ProgressPublisher | None,
    worker: str,
) -> bytes:
    """One chunk: ``payload`` is ``pickle((items, start))``; returns the result's bytes."""
    items, start = pickle.loads(payload)
    if program.seeded:
        seeding.begin_run()
    try:
        with OutputCapture():
            res = run_chunk(
                fn,
                items,
                start,
                program.on_error,
                program.private,
                program.seed,
                worker=worker,
                timeout=program.timeout,
                shape=program.shape,
                watch=True,
                register=publisher.watch if publisher else None,
            )
    finally:
        if program.seeded:
            seeding.end_run()
    shape = program.shape
    return _portable(
        res,
        _input_ids(fn, shape.stored) if shape and shape.stored else None,
        program.sources.get("functions"),
    )


def run_remote(keys: dict[str, str], payload: bytes) -> bytes:
    """Run one chunk as an ipyparallel task of its own (engines on other hosts)."""
    fn, program = _setup(keys)
    publisher = _ProgressPublisher() if program.live else None
    try:
        return _run(fn, program, payload, publisher, _worker())
    finally:
        if publisher is not None:
            publisher.stop()


def serve_chunks(address: str, key: bytes, ident: str, keys: dict[str, str]) -> int:
    """Run chunks until the kernel says stop: the one task of this engine in a
    run on the kernel's host (see :mod:`parloop.channel`).  Returns the number
    of chunks it ran.

    It runs in the engine's main thread like any task, so a kernel interrupt
    (SIGINT) halts the running chunk, whose result still goes back, and ends
    the task; an interrupt while waiting for a chunk just ends it."""
    from .channel import EngineLink

    fn, program = _setup(keys)
    publisher = _ProgressPublisher() if program.live else None
    link = EngineLink(address, key, ident)
    worker = _worker()  # once per run, not per chunk
    ran = 0
    try:
        while True:
            try:
                got = link.next_chunk()
            except KeyboardInterrupt:
                return ran
            if got is None:
                return ran
            seq, payload = got
            link.result(seq, _run(fn, program, payload, publisher, worker))
            ran += 1
    finally:
        if publisher is not None:
            publisher.stop()
        link.close()
