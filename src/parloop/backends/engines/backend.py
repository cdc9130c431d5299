"""``%%parallel``: chunks on ipyparallel engines (docs/design.md §4, §7).

The cluster's life cycle lives in :mod:`parloop.backends.engines.cluster`, the inputs' journey
in :mod:`parloop.backends.engines.transport`, the engine side in :mod:`parloop.backends.engines.worker`; this
module hands chunks out, re-runs the chunks of a lost engine (``retries``),
and turns what comes back into :class:`~parloop.runtime.ChunkResult` futures
for the dispatcher.

Two ways to the engines: when every engine shares the kernel's host, one
ipyparallel task per engine per run pulls its chunks over
:mod:`parloop.backends.engines.channel` (a chunk costs ~0.1 ms); engines elsewhere get each
chunk as an ipyparallel task of its own, sent to the engine directly (2-5 ms
a chunk, which the chunk sizes make up for).
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import sys
import threading
import time
import types
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ...analysis import LoopPlan
from ...errors import WorkerLostError
from ...options import Options
from ...runtime import ChunkResult
from ..base import Backend, Job
from .channel import ChunkChannel
from .transport import loads as transport_loads
from .worker import Program, run_remote, serve_chunks

_last_client: Any = None


@dataclass
class ClientState:
    """What the kernel keeps per ipyparallel client across cells: the
    transport (what each engine already holds) and the chunk channel (its
    socket and thread, made at the first run that uses it)."""

    client: Any
    transport: Any
    channel: ChunkChannel | None = None

    def close(self) -> None:
        self.transport.close()  # its shared-memory segments
        if self.channel is not None:
            self.channel.close()


#: id(client) -> its state (checked against the client itself: ids get reused)
CLIENTS: dict[int, ClientState] = {}


def _state_for(client: Any) -> ClientState:
    from .transport import Transport

    state = CLIENTS.get(id(client))
    if state is None or state.client is not client:
        if state is not None:
            state.close()  # a client that was replaced (same id)
        state = CLIENTS[id(client)] = ClientState(client, Transport(client))
    return state


def stop_managed() -> bool:
    """``%parallel_stop`` / ``%unload_ext``: stop the cluster parloop started."""
    from .cluster import MANAGER

    global _last_client
    _last_client = None
    for state in CLIENTS.values():
        state.close()
    CLIENTS.clear()
    return MANAGER.stop()


def status() -> dict | None:
    from .cluster import MANAGER

    info = MANAGER.status()
    return info if info.get("engines") or info.get("managed") else None


class EngineBackend(Backend):
    """Chunks on the engines of one ipyparallel client (the managed local
    cluster, or the user's: ``profile=`` / ``cluster_id=``)."""

    name = "engines"
    worker_noun = "engine"
    shares_memory = False
    #: measured on the 2-core machine: ~1.5 us per iteration, ~20 ms per run
    native_costs = (1.5e-6, 0.020)
    live_rows = True
    #: an ipyparallel task costs the engine 2-4 ms between chunks (its reply,
    #: status messages, the next request); chunks of about a quarter second
    #: make that 1-2 % (measured: 60 ms iterations one per chunk lost 7 %), cut
    #: as multiprocessing.Pool.map does (a quarter of each engine's share; see
    #: ChunkSizer.first_share).  Through the channel a chunk costs the engine
    #: ~0.4 ms: the dispatcher's 0.1 s guided chunks (measured on W1: quarter-
    #: second ones left a 5-iteration chunk queued behind a running one near the
    #: end, 60 ms of imbalance; wall ÷ per-engine work 1.18 against Pool's 1.07)
    TASK_CHUNK_SECONDS = 0.25
    first_share = False
    #: chunks go over parloop's own socket when every engine is on the
    #: kernel's host (``PARLOOP_CHANNEL=0``: always one ipyparallel task per chunk)
    use_channel = os.environ.get("PARLOOP_CHANNEL", "1") != "0"

    def __init__(self, client: Any, opts: Options):
        super().__init__()
        self.client = client
        self.opts = opts
        self.ids = list(client.ids)
        self.views = {eid: client[eid] for eid in self.ids}
        self.load = {eid: 0 for eid in self.ids}  # chunks queued on each engine
        self.sent = {eid: 0 for eid in self.ids}
        from .cluster import MANAGER

        self._labels: dict[int, str] = {}
        info = MANAGER.engine_info(client)
        for e in info:
            where = f" ({e.get('host')}:{e.get('pid')})" if e.get("pid") else ""
            self._labels[e["id"]] = f"engine {e['id']}{where}"
        local = bool(info) and all(e.get("local") for e in info)
        self.via_channel = self.use_channel and local
        if not self.via_channel:
            self.chunk_seconds = self.TASK_CHUNK_SECONDS
            self.first_share = True
        self.channel: ChunkChannel | None = None
        self.run = 0  # this run's number on the channel
        self._serving: dict[int, Any] = {}  # engine -> its serve task (the channel's runs)
        # one Transport per client, kept across cells: it remembers what each
        # engine already holds, so an unchanged big input is not sent again
        self.state = _state_for(client)
        self.transport = self.state.transport
        self.keys: dict[str, str] = {}
        self._inputs: dict[str, Any] | None = None
        self.retries = opts.retries
        # msg_id -> (async result, start, engine id)
        self._pending: dict[str, tuple[Any, int, int]] = {}
        self._lock = threading.Lock()
        self._cancel_from: int | None = None
        self._polled = time.monotonic()

    @classmethod
    def status_lines(cls) -> list[str]:
        info = status()
        if not info:
            return []
        kind = "managed local cluster" if info.get("managed") else "external cluster"
        lines = [f"backend: ipyparallel ({kind}), {len(info.get('engines', []))} engine(s)"]
        for e in info.get("engines", []):
            state = "busy" if e.get("busy") else "idle"
            lines.append(
                f"  engine {e.get('id')}: host {e.get('host')}, pid {e.get('pid')}, {state}"
            )
        return lines

    @classmethod
    def stop_cluster(cls) -> bool:
        return stop_managed()

    @classmethod
    def shutdown(cls) -> None:
        stop_managed()

    @classmethod
    def for_run(cls, opts: Options, plan: LoopPlan) -> "EngineBackend":
        from .cluster import MANAGER

        global _last_client
        client = MANAGER.client(
            processes=opts.processes, profile=opts.profile, cluster_id=opts.cluster_id
        )
        _last_client = client
        return cls(client, opts)

    def worker_count(self) -> int:
        return max(len(self.ids), 1)

    def max_in_flight(self) -> int:
        # two chunks per engine: one running, one queued on it, so no engine
        # waits for the kernel between chunks
        return 2 * len(self.ids)

    def precheck(self, ns: dict[str, Any], names: set[str]) -> None:
        """Before the cell runs at all: the inputs already bound in the
        notebook must be able to travel (a lock, an open file, a generator
        is reported by name, nothing having run)."""
        from .transport import check_picklable

        check_picklable({n: ns[n] for n in sorted(names) if n in ns})

    def prepare(self, job: Job) -> None:
        # sent with the first chunk: a loop that runs natively needs none of it
        self._inputs = job_inputs(job, live=job.live)

    def submit(self, items: list, start: int) -> "Future[ChunkResult]":
        if self._inputs is not None:
            local = _local_modules(self._inputs.values())
            for module in local:
                cloudpickle.register_pickle_by_value(module)
            try:
                self.keys = self._broadcast(self._inputs)
            finally:
                for module in local:
                    cloudpickle.unregister_pickle_by_value(module)
            self._inputs = None
            if self.via_channel and self.ids:
                self._open_channel()
        payload = cloudpickle.dumps((items, start), protocol=pickle.HIGHEST_PROTOCOL)
        if self.channel is not None:
            return self.channel.submit(start, payload, self.retries)
        fut: Future[ChunkResult] = Future()
        self._send(fut, payload, start, self.retries)
        return fut

    def _broadcast(self, inputs: dict[str, Any]) -> dict[str, str]:
        """The inputs to the engines; one that is lost meanwhile (hung, cut
        off, killed: the controller says so after its heartbeat) is dropped
        and the others get them -- or, with none left, a WorkerLostError."""
        while True:
            # an engine the controller dropped since (a hung one, after its
            # heartbeat) cannot even be addressed: ipyparallel says IndexError
            alive = set(self.client.ids)
            for eid in [eid for eid in self.ids if eid not in alive]:
                self._lost(eid, "was lost while the inputs were sent")
            if not self.ids:
                raise WorkerLostError(
                    "no engine is left to run the loop (they were lost while the inputs were sent)"
                )
            try:
                return self.transport.broadcast(inputs, self.ids)
            except Exception as e:
                if not (_engine_lost(e) or "No such engine" in str(e)):
                    raise
                alive = set(self.client.ids)
                gone = [eid for eid in self.ids if eid not in alive] or self.ids[:1]
                for eid in gone:
                    self._lost(eid, "was lost while the inputs were sent")

    @property
    def dispatch(self) -> str:
        return "channel" if self.channel is not None else "tasks"

    def tail(self) -> None:
        """The dispatcher handed out its last chunk (see parloop.backends.engines.channel)."""
        if self.channel is not None:
            self.channel.tail()

    def _open_channel(self) -> None:
        """One serve task per engine, all pulling from the client's channel."""
        if self.state.channel is None:
            self.state.channel = ChunkChannel()
        channel = self.state.channel
        run = self.run = channel.begin(list(self.ids), self._channel_result, self._retried)
        self.channel = channel
        for eid in list(self.ids):
            ar = self.views[eid].apply_async(
                serve_chunks, channel.address, channel.key, channel.ident(run, eid), self.keys
            )
            self._serving[eid] = ar
            ar.add_done_callback(lambda ar_, eid=eid: self._serve_ended(eid, ar_))

    def _channel_result(self, fut: Future, start: int, eid: int, payload: memoryview) -> None:
        try:
            res: ChunkResult = transport_loads(payload)
        except BaseException as e:  # noqa: BLE001 - a result the kernel cannot load
            fut.set_exception(e)
            return
        self._deliver(fut, res, eid)

    def _retried(self, start: int) -> None:
        self.events.append(
            f"the engine running iterations from {start} died; they were re-run on another engine"
        )
        self.retried.add(start)

    def _serve_ended(self, eid: int, ar: Any) -> None:
        """An engine's serve task ended: normally at the run's end (or after
        an interrupt), or because the engine died or the task failed."""
        error: BaseException | None = None
        try:
            ar.get(0)
        except BaseException as e:  # noqa: BLE001
            error = e
        lost = error is not None and _engine_lost(error)
        if lost:
            self._lost(eid)
        self._forget(ar)
        if self.channel is not None:
            self.channel.engine_gone(
                self.run,
                eid,
                retry=lost,
                make_error=lambda s: (
                    _as_local(error, s)
                    if error is not None
                    else WorkerLostError(f"the engines stopped before iterations from {s} ran")
                ),
            )

    def label(self, eid: int) -> str:
        """``engine 3 (host:pid)``: the worker's name in the live view and report."""
        # asked once, in the kernel's thread when the backend is made: never from
        # ipyparallel's IO thread (the callbacks), where asking the engines
        # would wait on the very thread that delivers the answer
        return self._labels.get(eid) or f"engine {eid}"

    def running(self) -> dict[int, tuple[str, int]]:
        """chunk start -> (engine, iterations done in it so far): engines
        publish their progress while a chunk runs (ipyparallel's data
        publication, four times a second)."""
        out: dict[int, tuple[str, int]] = {}
        if self.channel is not None:
            on_engines = {(eid, start) for eid, start in self.channel.in_flight().values()}
            for eid, ar in list(self._serving.items()):
                data = getattr(ar, "data", None) or {}
                start = data.get("parloop_start")
                if start is not None and (eid, start) in on_engines:
                    out[start] = (self.label(eid), int(data.get("parloop_done", 0)))
            return out
        with self._lock:
            pending = list(self._pending.values())
        for ar, start, eid in pending:
            data = getattr(ar, "data", None) or {}
            if "parloop_done" in data:
                out[start] = (self.label(eid), int(data["parloop_done"]))
        return out

    def _pick_engine(self) -> int:
        """The live engine with the fewest chunks queued on it.  Chunks go to
        an engine directly (not through the controller's load balancer, which
        hands an engine its next task only after the last one is done, a
        round trip of idle time per chunk: measured 3-5 ms per 60 ms chunk)."""
        with self._lock:
            live = [e for e in self.ids if e in self.views]
            if not live:
                raise WorkerLostError("no engine is left to run the loop")
            eid = min(live, key=lambda e: (self.load[e], self.sent[e]))
            self.load[eid] += 1
            self.sent[eid] += 1
            return eid

    def _send(self, fut: Future, payload: bytes, start: int, retries_left: int) -> None:
        eid = self._pick_engine()
        ar = self.views[eid].apply_async(run_remote, self.keys, payload)
        with self._lock:
            self._pending[ar.msg_ids[0]] = (ar, start, eid)

        def done(ar_: Any) -> None:
            with self._lock:
                self._pending.pop(ar.msg_ids[0], None)
                self.load[eid] -= 1
            try:
                # transport.loads, not pickle.loads: it leaves the kernel's own
                # notebook classes as they are when instances of them come back
                res: ChunkResult = transport_loads(ar_.get())
                self._forget(ar_)
            except BaseException as e:  # noqa: BLE001
                if self._cancel_from is not None and start > self._cancel_from:
                    fut.set_exception(WorkerLostError(f"chunk at {start} cancelled"))
                    return
                if _engine_lost(e):
                    self._lost(eid)
                if _engine_lost(e) and retries_left > 0:
                    self._retried(start)
                    try:
                        self._send(fut, payload, start, retries_left - 1)
                    except WorkerLostError as again:  # no engine left
                        fut.set_exception(
                            WorkerLostError(f"iterations from {start} could not run again: {again}")
                        )
                    except Exception as again:  # noqa: BLE001
                        fut.set_exception(_as_local(again, start))
                    return
                fut.set_exception(_as_local(e, start))
                return
            self._deliver(fut, res, eid)

        ar.add_done_callback(done)

    def _deliver(self, fut: Future, res: ChunkResult, eid: int) -> None:
        res.worker = self.label(eid)
        fut.set_result(res)

    def poll(self) -> None:
        """Called by the dispatcher between waits: a managed engine whose
        process is gone is unregistered now, so its chunks fail at once and
        are re-run, rather than after the controller's heartbeat timeout.
        (A pid check; at most twice a second.)"""
        from .cluster import MANAGER

        now = time.monotonic()
        if now - self._polled < 0.5:
            return
        self._polled = now
        dead = MANAGER.dead_engines(self.client)
        for eid in dead:
            self._lost(eid)
            if self.channel is not None:
                self.channel.engine_gone(self.run, eid, retry=True, make_error=_retries_used_up)

    def _lost(self, eid: int, why: str = "was lost during the run") -> None:
        with self._lock:
            if eid in self.views:
                del self.views[eid]
                self.ids.remove(eid)
                self.events.append(f"engine {eid} {why}")

    def _forget(self, ar: Any) -> None:
        """Let the chunk's result go once it is read.  The Client keeps every
        result it received, and ipyparallel's AsyncResult caches its methods
        with ``functools.lru_cache``, which keeps the last 128 AsyncResults
        alive -- each holding its payload and, through our callback, the
        decoded chunk (measured: a 1 000 000-iteration loop grew the kernel by
        ~100 MB per run)."""
        try:
            self.client.purge_local_results(ar)
        except Exception:  # noqa: BLE001 - a cache entry left behind costs memory only
            pass
        ar._result = None
        ar._done_callbacks = []  # the list being run now is not this new one

    def cancel_after(self, index: int) -> None:
        self._cancel_from = index if self._cancel_from is None else min(index, self._cancel_from)
        if self.channel is not None:
            self.channel.cancel_after(index, lambda s: WorkerLostError(f"chunk at {s} cancelled"))
            return
        with self._lock:
            doomed = [ar for ar, start, _ in self._pending.values() if start > index]
        for ar in doomed:
            try:
                self.client.abort(ar, block=False)
            except Exception:  # noqa: BLE001 - already running: its result is ignored
                pass

    def interrupt(self) -> None:
        import sys

        from .cluster import MANAGER

        print("parloop: interrupting the engines (SIGINT)", file=sys.stderr)
        self.cancel_after(-1)
        MANAGER.signal_engines(self.client, signal.SIGINT)

    def finish(self) -> None:
        if self.channel is not None:
            self.channel.end()


def job_inputs(job: Job, *, live: bool) -> dict[str, Any]:
    """What a worker in another process needs for a run, by name: the inputs
    the body reads and, as ``___program``, the chunk function's code and the
    run's settings (worker.Program).  Raises, naming the variable, for an
    input that cannot travel.  Shared by every backend whose workers are
    other processes (engines, Dask, Ray)."""
    from . import transport
    from .transport import check_picklable

    transport.KERNEL_NS[0] = job.ns  # results refer to the kernel's own objects
    inputs: dict[str, Any] = {name: job.ns[name] for name in sorted(job.inputs)}
    check_picklable(inputs)
    inputs["___program"] = Program(
        chunk_module=job.chunk_module,
        filename=job.filename,
        cell_lines=[line + "\n" for line in ("\n" + job.cell_source).splitlines()],
        private=job.private,
        on_error=job.on_error,
        seed=job.seed,
        timeout=job.timeout,
        live=live,
        shape=job.shape,
        imports=job.imports,
        sources=job.sources,
    )
    return inputs


@functools.lru_cache(maxsize=None)
def _installed_roots() -> tuple[str, ...]:
    import sysconfig

    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(os.path.realpath(p) + os.sep for p in paths)


@functools.lru_cache(maxsize=1024)
def _realpath(path: str) -> str:
    return os.path.realpath(path)  # per cell, for every input's module: a dozen lstat calls


def _local_modules(values: Any) -> list[types.ModuleType]:
    """Modules of the notebook's own making (``helpers.py`` beside the
    notebook) that inputs come from: engines need not have them -- a cluster
    on other machines, or started from another directory -- so their
    functions and classes travel by value, like the notebook's own."""
    roots = _installed_roots()
    found: dict[str, types.ModuleType] = {}
    for v in values:
        module = (
            v
            if isinstance(v, types.ModuleType)
            else sys.modules.get(getattr(v, "__module__", None) or "")
        )
        name = getattr(module, "__name__", "")
        path = getattr(module, "__file__", None)
        if module is None or not path or name == "__main__" or name.startswith("parloop"):
            continue
        if not _realpath(path).startswith(roots) and name not in found:
            found[name] = module
    return list(found.values())


def _engine_lost(e: BaseException) -> bool:
    from ipyparallel.error import EngineError

    return isinstance(e, EngineError) or getattr(e, "ename", None) == "EngineError"


def _retries_used_up(start: int) -> WorkerLostError:
    return WorkerLostError(
        f"the engine running iterations from {start} died and the retries are used up"
    )


def _as_local(e: BaseException, start: int) -> BaseException:
    """A failure of the machinery (not of an iteration: those come back inside
    the result) turned into something the user can act on."""
    if _engine_lost(e):
        return _retries_used_up(start)
    from ipyparallel.error import RemoteError

    if isinstance(e, RemoteError):
        return RuntimeError(
            f"parloop engine-side failure: {e.ename}: {e.evalue}\n{getattr(e, 'traceback', '')}"
        )
    return e
