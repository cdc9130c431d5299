"""Everything that runs ON AN ENGINE: the contract an external cluster's
engines execute (they need parloop installed, nothing of the kernel's state).

* the chunk entry points ipyparallel calls: :func:`run_remote` (one task per
  chunk) and :func:`serve_chunks` (one task per run, pulling chunks over the
  channel);
* the broadcast store: :func:`_engine_store` receives the payloads of
  :class:`~parloop.backends.engines.transport.Transport`, :func:`engine_resolve`
  hands the inputs out, unpickled once per cell;
* :class:`EngineLink`, the engine's end of the chunk channel;
* :func:`_whoami`, where the engine is (host, pid, network namespace).

Engines share nothing with the kernel but the installed packages: the chunk
function arrives as an AST (compiled here under the cell's name, with the
cell's text put into linecache so tracebacks show the user's lines), the
inputs arrive by value, and payloads travel as cloudpickle bytes so instances
of notebook classes survive the round trip (cloudpickle's class tracking gives
the kernel back its own classes).
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
from typing import Any, Callable, Mapping

import cloudpickle

from ... import seeding
from ...runtime import ChunkResult, LoopShape, OutputCapture, run_chunk
from . import shm as _shm

#: the Dask event topic of live progress (Program.progress == "dask")
PROGRESS_TOPIC = "parloop-progress"

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
    #: how live progress reaches the kernel: "datapub" (ipyparallel's data
    #: publication) or "dask" (a Dask worker event on topic PROGRESS_TOPIC,
    #: tagged with ``run``)
    progress: str = "datapub"
    run: str = ""

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
    from ...log.entries import SCALARS

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
        err.remote_traceback = _traceback_text(err.exc, functions or {})
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

    def __init__(self, program: Program | None = None) -> None:
        self._stop = threading.Event()
        self._ctl: Any = None
        self._program = program
        self._dask_worker: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, ctl: Any) -> None:
        self._ctl = ctl
        if self._program is not None and self._program.progress == "dask":
            # only the task's own thread knows its worker
            from distributed import get_worker

            self._dask_worker = get_worker()
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def _publisher(self) -> Callable[[dict], None] | None:
        if self._dask_worker is not None:
            worker, program, me = self._dask_worker, self._program, _worker()
            assert program is not None

            def send(data: dict) -> None:
                # Worker.log_event is safe from any thread (it hops to the
                # worker's loop); the scheduler forwards it to subscribers
                worker.log_event(PROGRESS_TOPIC, dict(data, run=program.run, worker=me))

            return send
        try:
            from ipyparallel.datapub import publish_data
        except ImportError:  # not on an engine (tests calling run_remote directly)
            return None
        return publish_data

    def _run(self) -> None:
        publish_data = self._publisher()
        if publish_data is None:
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
    publisher = _ProgressPublisher(program) if program.live else None
    try:
        return _run(fn, program, payload, publisher, _worker())
    finally:
        if publisher is not None:
            publisher.stop()


def serve_chunks(address: str, key: bytes, ident: str, keys: dict[str, str]) -> int:
    """Run chunks until the kernel says stop: the one task of this engine in a
    run on the kernel's host (see :mod:`parloop.backends.engines.channel`).  Returns the number
    of chunks it ran.

    It runs in the engine's main thread like any task, so a kernel interrupt
    (SIGINT) halts the running chunk, whose result still goes back, and ends
    the task; an interrupt while waiting for a chunk just ends it."""

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


# ---------------------------------------------------------------------------
# inputs: the payloads of the broadcasts (parloop.backends.engines.transport)
# ---------------------------------------------------------------------------
#: content key -> payload: ("pickle"|"bytes", pickle stream, buffer keys) or a read-only buffer
#: (a received frame, or a map of one of the kernel's shared-memory segments)
_STORE: dict[str, object] = {}
#: (name, content key) -> (epoch, object): the objects handed out in the current epoch
_LIVE: dict[tuple[str, str], tuple[str, object]] = {}
_EPOCH: list[str | None] = [None]


class TransportError(RuntimeError):
    """An input could not be loaded on an engine (e.g. a module missing there)."""

    def __init__(self, message: str, *, name: str | None = None):
        self.name = name
        super().__init__(message)


def _materialize(key: str) -> object:
    try:
        entry: Any = _STORE[key]  # (kind, pickle stream, buffer keys)
        kind, data, bkeys = entry
    except KeyError:
        raise TransportError(
            f"parloop: input {key} is not on this engine (pid {os.getpid()}); "
            "was the engine restarted? Transport.forget() resends everything"
        ) from None
    bufs = [_STORE[b] for b in bkeys]
    if kind == "bytes":
        return bytes(bufs[0])  # type: ignore[call-overload]
    return pickle.loads(data, buffers=bufs)  # type: ignore[arg-type]


def _enter_epoch(epoch: str) -> None:
    if _EPOCH[0] != epoch:
        _EPOCH[0] = epoch
        _LIVE.clear()  # objects of earlier cells: a new cell starts from the kernel's values


def engine_resolve(keys: Mapping[str, str]) -> dict[str, object]:
    """Runs ON THE ENGINE: name -> value for the keys that :meth:`Transport.broadcast` returned."""
    out = {}
    for name, key in keys.items():
        content, _, epoch = key.partition("@")
        _enter_epoch(epoch)
        live = _LIVE.get((name, content))
        if live is None:
            live = _LIVE[(name, content)] = (epoch, _materialize(content))
        out[name] = live[1]
    return out


def _engine_store(index: dict, *blobs) -> dict:
    """Runs ON THE ENGINE: store the payloads of one broadcast, load the new values once.

    Returns ``{"pid", "stored", "errors": {name: "ExcType: message"}, "unmapped": [buffer keys]}``
    (``unmapped``: segments this engine could not map; the values that need them
    are in ``errors``, and the kernel sends those buffers again as frames).
    """
    for key in index["drop"]:
        _STORE.pop(key, None)
    if index["drop"]:
        dropped = set(index["drop"])
        for live_key in [k for k in _LIVE if k[1] in dropped]:
            del _LIVE[live_key]
    for bkey, i in index["buffers"].items():
        # a read-only view of the received frame: zero-copy, and inputs cannot be corrupted
        _STORE[bkey] = memoryview(blobs[i]).toreadonly()
    unmapped = []
    for bkey, size in index.get("segments", {}).items():
        try:
            # a read-only (PROT_READ) map of the kernel's segment: zero-copy too
            _STORE[bkey] = _shm.attach(bkey[1:], size)
        except (OSError, ValueError):  # the kernel sends it again as a frame
            unmapped.append(bkey)
    for vkey, (kind, i, bkeys) in index["values"].items():
        _STORE[vkey] = (kind, None if i is None else blobs[i], tuple(bkeys))
    errors = {}
    if index["load"]:
        _enter_epoch(index["epoch"])
        for name, vkey in index["load"].items():
            try:
                _LIVE[(name, vkey)] = (index["epoch"], _materialize(vkey))
            except Exception as e:  # noqa: BLE001 - reported in the kernel with the variable's name
                errors[name] = f"{type(e).__name__}: {e}"
    return {"pid": os.getpid(), "stored": len(_STORE), "errors": errors, "unmapped": unmapped}


# ---------------------------------------------------------------------------
# the chunk channel, engine side (parloop.backends.engines.channel)
# ---------------------------------------------------------------------------
class EngineLink:
    """Engine side: the DEALER socket of one serve task.

    The channel module (and pyzmq with it) is imported here, on first use,
    not with this module: a Dask or Ray worker runs :func:`run_remote` only,
    and its environment need not have pyzmq (nor IPython, nor parloop itself:
    see parloop.backends.shipping)."""

    def __init__(self, address: str, key: bytes, ident: str):
        from . import channel

        self.ch = channel
        self.key = key
        self.sock: Any = channel.zmq.Context.instance().socket(channel.zmq.DEALER)
        self.sock.setsockopt(channel.zmq.LINGER, 2000)
        self.sock.setsockopt(channel.zmq.IDENTITY, ident.encode())
        self.sock.connect(address)
        channel.send(self.sock, key, channel.HELLO, str(channel.CREDITS).encode())

    def next_chunk(self) -> tuple[int, memoryview] | None:
        """The next ``(seq, payload)``, or None when the run is over (or the
        kernel stopped answering)."""
        ch = self.ch
        missed = 0
        while True:
            if self.sock.poll(int(ch.PING_AFTER * 1000)):
                msg = ch.verified(self.key, self.sock.recv_multipart(copy=False))
                if msg is None:
                    continue
                kind, body = msg
                if kind == ch.CHUNK:
                    return ch.unpack(body)
                if kind == ch.STOP:
                    return None
                missed = 0  # a pong
            else:
                missed += 1
                if missed > ch.MISSED_PINGS:
                    return None
                ch.send(self.sock, self.key, ch.PING)

    def result(self, seq: int, payload: bytes) -> None:
        self.ch.send(self.sock, self.key, self.ch.RESULT, self.ch.pack(seq, payload))

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------
# where this engine is (parloop.backends.engines.cluster asks)
# ---------------------------------------------------------------------------
def _whoami() -> tuple[str, int, object]:
    """Runs on an engine: its host, pid, and which machine and network
    namespace it is in (Linux boot id and ``/proc/self/ns/net``), which says
    whether it can reach the kernel's 127.0.0.1."""
    import os
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        place: object = (boot, os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        place = socket.gethostname()
    return socket.gethostname(), os.getpid(), place


# Travel by value (ipyparallel and cloudpickle both do that for __main__
# functions): the engines of an external cluster need not have parloop.
_whoami.__module__ = "__main__"
