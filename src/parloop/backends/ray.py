"""``%%parallel ray``: chunks as Ray tasks (docs/design.md §7).

Which cluster: ``ray`` alone runs on the Ray this process is connected to
(the notebook's own ``ray.init()``, which parloop never shuts down);
otherwise parloop starts a local Ray of its own (``processes=N`` CPUs, else
one per core) and owns it: ``%parallel_stop`` / ``%unload_ext`` stop it.
``ray=ADDRESS`` connects to that cluster; parloop only ever drops its own
connection, never the cluster.

What travels is what travels to ipyparallel engines, through the same code:
the inputs and the chunk function's program (``job_inputs``), serialised as
:class:`~parloop.backends.engines.transport.Transport` does (content keys,
notebook functions and classes by value, big buffers out of band) into one
store message -- the one ``Transport`` would send an engine that holds
nothing.  It is ``ray.put`` once per cell (big buffers go into Ray's object
store zero-copy) and every chunk task gets its ObjectRef, nested in a list
so that Ray does not fetch it for every task: a worker *process* fetches
and loads it once per cell, on its first chunk of the cell
(:func:`_run_chunk`), into the same per-process cache engines use
(``worker._STORE``); the chunk itself is
:func:`~parloop.backends.engines.worker.run_remote`, whose result comes back
as bytes the kernel unpickles with its own classes.

Failures: a worker process that dies is Ray's to handle -- the task runs again
(``max_retries=retries``); once the retries are used up the chunk fails with
:class:`~parloop.errors.WorkerLostError`.  An input a worker cannot load
(a module missing there) is found before any chunk runs: the first task of a
cell only loads the inputs, and its ``TransportError`` names the variable.

Interrupt: ``ray.cancel`` raises ``KeyboardInterrupt`` in the running task
(through ``_thread.interrupt_main``, which does nothing in a worker whose
SIGINT is ignored -- workers started from a non-interactive shell); a task
still running after :attr:`RayBackend.GRACE` seconds is killed
(``force=True``: its worker process goes, Ray starts another).

``timeout=`` is refused (options.py): Ray runs a task where parloop has no
alarm signal of its own to stop an iteration.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import cloudpickle

from ..errors import WorkerLostError
from ..runtime import ChunkResult
from .base import Backend, Job
from .engines.worker import TransportError, _engine_store, run_remote

if TYPE_CHECKING:
    from ..analysis import LoopPlan
    from ..options import Options


# ---------------------------------------------------------------------------
# on a Ray worker
# ---------------------------------------------------------------------------
#: the epochs (cells) whose inputs this worker process holds: one at a time
_STORED: set[str] = set()
#: the content keys this process stored for that epoch (dropped at the next)
_HELD: set[str] = set()


def _run_chunk(epoch: str, keys: dict[str, str], store: list, payload: bytes | None) -> bytes:
    """Runs ON A RAY WORKER: one chunk of the cell ``epoch`` (``payload`` is
    ``cloudpickle((items, start))``), or with ``payload=None`` only load the
    cell's inputs (the kernel's first task of a cell: a ``TransportError``
    then comes before anything ran).

    ``store`` is ``[ObjectRef]`` of the cell's store message: in a list, so
    that Ray does not resolve it for each task -- this process fetches it
    only on its first chunk of the cell."""
    if epoch not in _STORED:
        _store_inputs(epoch, store[0])
    if payload is None:
        return b""
    return run_remote(keys, payload)


def _store_inputs(epoch: str, ref: Any) -> None:
    """Load a cell's inputs into this process's cache, once per cell: what
    the last cell stored and this one does not use is dropped (a cell's store
    message holds everything the cell needs)."""
    import ray

    index, blobs = ray.get(ref)
    held = set(index["values"]) | set(index["buffers"])
    reply = _engine_store(dict(index, drop=sorted(_HELD - held)), *blobs)
    _HELD.clear()
    _HELD.update(held)
    if reply["errors"]:
        # not marked stored: the next chunk here says the same, by name
        name, error = sorted(reply["errors"].items())[0]
        raise TransportError(
            f"parloop: the Ray worker {socket.gethostname()}:{os.getpid()} cannot load the "
            f"input {name!r}: {error}. Modules are imported on the workers by name, so they "
            "must be installed there too; or create the value inside the loop.",
            name=name,
        )
    _STORED.clear()
    _STORED.add(epoch)


# ---------------------------------------------------------------------------
# the kernel's connection
# ---------------------------------------------------------------------------
@dataclass
class _Connection:
    """The Ray this kernel runs chunks on, and what parloop did to get it."""

    address: str  # the GCS address (``host:port``)
    #: "owned": a local Ray parloop started; "connected": parloop's
    #: ``ray.init(address=...)``; "notebook": the notebook's own ``ray.init()``
    how: str
    asked: str | bool = True  # the option's value that made it
    cpus: int | None = None  # owned: the CPUs it was started with
    temp_dir: str | None = None  # owned: its private temp dir
    checked: bool = False  # a worker's versions matched the kernel's
    chunk_task: Any = None  # ray.remote(_run_chunk), made once per connection


_CONN: list[_Connection | None] = [None]
_EPOCHS = itertools.count(1)
_UID = uuid.uuid4().hex[:12]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        from IPython.core.error import UsageError

        raise UsageError(
            "%%parallel ray: Ray is not installed in the kernel's environment "
            '(pip install "parloop[ray]")'
        ) from e
    return ray


def _gcs_address(ray: Any) -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - Ray Client connections have no GCS address here
        return "?"


def _connect(opts: Options) -> _Connection:
    """The connection for a run: the one there is, when the option allows it;
    else a local Ray parloop starts (``ray``) or the cluster at ADDRESS."""
    ray = _import_ray()
    conn = _CONN[0]
    if ray.is_initialized():
        address = _gcs_address(ray)
        if conn is None or conn.address != address:
            if conn is not None:
                _forget(conn)  # the notebook shut it down and connected elsewhere
            conn = _CONN[0] = _Connection(address, "notebook")
        if opts.ray is True:
            if not (conn.how == "owned" and opts.processes and opts.processes != conn.cpus):
                return conn
            _disconnect()  # processes=N: the owned Ray, restarted at its new size
        elif opts.ray in (conn.asked, conn.address):
            return conn
        elif conn.how == "notebook":
            from IPython.core.error import UsageError

            raise UsageError(
                f"%%parallel ray={opts.ray}: this kernel is connected to the Ray at "
                f"{conn.address} (the notebook's ray.init()); use `ray` alone to run there, "
                "or call ray.shutdown() first"
            )
        else:
            _disconnect()
    elif conn is not None:
        _forget(conn)  # the notebook shut it down (ray.shutdown())
    if opts.ray is True:
        conn = _start_local(ray, opts.processes or os.cpu_count() or 1)
    else:
        ray.init(address=str(opts.ray), log_to_driver=False, logging_level=logging.WARNING)
        conn = _Connection(_gcs_address(ray), "connected", asked=str(opts.ray))
    _CONN[0] = conn
    return conn


def _start_local(ray: Any, cpus: int) -> _Connection:
    """A local Ray that parloop owns: no dashboard, no usage statistics, no
    worker output forwarded (parloop captures the iterations' own), its files
    in a private temp dir removed when it stops."""
    temp_dir = tempfile.mkdtemp(prefix="parloop-ray-")
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # inherited by the processes Ray starts
    try:
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            _temp_dir=temp_dir,
        )
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    finally:
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved
    return _Connection(_gcs_address(ray), "owned", cpus=cpus, temp_dir=temp_dir)


def _disconnect(*, connections: bool = True) -> bool:
    """Shut down what parloop started (its local Ray) and, with
    ``connections``, what it made (its connection to a cluster: the cluster
    stays); never the notebook's own connection.  Returns whether a Ray that
    parloop owned was stopped."""
    conn = _CONN[0]
    if conn is None or conn.how == "notebook" or (conn.how == "connected" and not connections):
        return False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and _gcs_address(ray) == conn.address:
        ray.shutdown()
    _forget(conn)
    return conn.how == "owned"


def _forget(conn: _Connection) -> None:
    if conn.temp_dir:
        shutil.rmtree(conn.temp_dir, ignore_errors=True)
    if _CONN[0] is conn:
        _CONN[0] = None


def _check_versions(ray: Any, conn: _Connection) -> None:
    """First contact: one tiny task (no CPU asked, so a busy cluster runs it
    too) reports a worker's Python, cloudpickle and parloop; a difference is
    a clear error before anything runs."""
    from .versions import check_versions, process_versions

    if conn.checked:
        return
    probe = ray.remote(process_versions).options(num_cpus=0, max_retries=1)
    try:
        remote = ray.get(probe.remote(), timeout=300)
    except ray.exceptions.GetTimeoutError:
        raise WorkerLostError(
            f"parloop: no Ray worker at {conn.address} answered within 300 s"
        ) from None
    check_versions(remote, f"a Ray worker of {conn.address}")
    conn.checked = True


# ---------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------
class RayBackend(Backend):
    """Chunks as Ray tasks, one task per chunk, on the kernel's Ray connection."""

    name = "ray"
    worker_noun = "worker"
    shares_memory = False
    #: per-iteration live rows would need a streaming generator task (a record
    #: per iteration: measured 0.7 ms each); future work -- the views show
    #: chunks as they complete
    live_rows = False
    #: a task costs milliseconds (scheduling, result through the object
    #: store): chunks of a quarter second make that ~1 %, cut a quarter of
    #: each worker's share up front as multiprocessing.Pool.map does
    chunk_seconds = 0.25
    first_share = True
    #: seconds a cancelled task may take to stop before its worker is killed
    GRACE: ClassVar[float] = 2.0

    def __init__(self, conn: _Connection, opts: Options):
        super().__init__()
        import ray

        self.ray = ray
        self.conn = conn
        self.opts = opts
        self.retries = opts.retries
        self.workers = max(int(ray.cluster_resources().get("CPU", 0)), 1)
        if conn.chunk_task is None:
            conn.chunk_task = ray.remote(_run_chunk)
        self.task = conn.chunk_task.options(max_retries=self.retries, retry_exceptions=False)
        self._inputs: dict[str, Any] | None = None
        self._store: Any = None  # the cell's store message in Ray's object store
        self.epoch = ""
        self.keys: dict[str, str] = {}
        self._lock = threading.Lock()
        #: chunk start -> (ObjectRef, our future): the tasks not finished yet
        self._pending: dict[int, tuple[Any, Future]] = {}
        self._cancel_from: int | None = None

    @classmethod
    def for_run(cls, opts: Options, plan: LoopPlan) -> RayBackend:
        conn = _connect(opts)
        ray = _import_ray()
        _check_versions(ray, conn)
        return cls(conn, opts)

    # -- the process's Ray as a whole -------------------------------------
    @classmethod
    def status_lines(cls) -> list[str]:
        conn = _CONN[0]
        ray = sys.modules.get("ray")
        if conn is None or ray is None or not ray.is_initialized():
            return []
        kind = {
            "owned": "local cluster parloop started",
            "connected": "cluster parloop connected to",
            "notebook": "the notebook's ray.init()",
        }[conn.how]
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            cpus = int(ray.cluster_resources().get("CPU", 0))
        except Exception as e:  # noqa: BLE001 - the status says what went wrong
            return [f"backend: Ray ({kind}) at {conn.address}: cannot be asked ({e})"]
        lines = [f"backend: Ray ({kind}) at {conn.address}: {len(nodes)} node(s), {cpus} CPU(s)"]
        for n in nodes:
            lines.append(
                f"  node {n.get('NodeManagerAddress')}: "
                f"{int(n.get('Resources', {}).get('CPU', 0))} CPU(s)"
            )
        return lines

    @classmethod
    def stop_cluster(cls) -> bool:
        """``%parallel_stop``: the local Ray parloop started (a connection to
        a cluster at ``ray=ADDRESS`` stays: there is nothing of parloop's to stop)."""
        return _disconnect(connections=False)

    @classmethod
    def shutdown(cls) -> None:
        """``%unload_ext`` / ``parloop.shutdown()``: the local Ray parloop
        started, and the connection it made to a cluster (which keeps running)."""
        _disconnect()

    # -- the life cycle ---------------------------------------------------
    def worker_count(self) -> int:
        return self.workers

    def max_in_flight(self) -> int:
        # two per CPU: one running, one queued behind it, so that no worker
        # waits for the kernel between chunks
        return 2 * self.workers

    def precheck(self, ns: dict[str, Any], names: set[str]) -> None:
        from .engines.transport import check_picklable

        check_picklable({n: ns[n] for n in sorted(names) if n in ns})

    def prepare(self, job: Job) -> None:
        from .engines.backend import job_inputs

        # shipped with the first chunk: a loop that runs natively needs none of it
        self._inputs = job_inputs(job, live=False)

    def _ship(self, inputs: dict[str, Any]) -> None:
        """The cell's store message, ``ray.put`` once; then one task loads it
        on a worker, so that an input that cannot be loaded there is reported
        (by name) before any chunk runs."""
        from .engines.backend import _local_modules
        from .engines.serialize import _serialize
        from .engines.transport import Transport, TransportStats, _hash_key, _pack

        local = _local_modules(inputs.values())
        for module in local:
            cloudpickle.register_pickle_by_value(module)
        try:
            pickled = {name: _serialize(name, value) for name, value in inputs.items()}
        finally:
            for module in local:
                cloudpickle.unregister_pickle_by_value(module)
        packed = {name: _pack(*p, _hash_key) for name, p in pickled.items()}
        self.epoch = f"{_UID}.{next(_EPOCHS)}"
        index, blobs = Transport._index(packed, {}, False, self.epoch, TransportStats())
        # PickleBuffers: Ray keeps them out of band, so that workers map the
        # big ones from its object store instead of copying them
        self._store = self.ray.put((index, [pickle.PickleBuffer(b) for b in blobs]))
        self.keys = {name: f"{p.key}@{self.epoch}" for name, p in packed.items()}
        try:
            self.ray.get(self.task.remote(self.epoch, self.keys, [self._store], None))
        except self.ray.exceptions.RayError as e:
            raise self._as_local(e, 0, 0) from None

    def submit(self, items: list, start: int) -> Future[ChunkResult]:
        if self._inputs is not None:
            inputs, self._inputs = self._inputs, None
            self._ship(inputs)
        payload = cloudpickle.dumps((items, start), protocol=pickle.HIGHEST_PROTOCOL)
        ref = self.task.remote(self.epoch, self.keys, [self._store], payload)
        fut: Future[ChunkResult] = Future()
        with self._lock:
            self._pending[start] = (ref, fut)
        n = len(items)
        ref.future().add_done_callback(lambda rf: self._done(rf, fut, start, n))
        return fut

    def _done(self, rf: Future, fut: Future, start: int, n: int) -> None:
        """A task ended (in Ray's thread): its result, or what went wrong."""
        from .engines.transport import loads as transport_loads

        with self._lock:
            self._pending.pop(start, None)
        try:
            data = rf.result()
        except BaseException as e:  # noqa: BLE001 - becomes the chunk's error
            if self._cancel_from is not None and start > self._cancel_from:
                fut.set_exception(WorkerLostError(f"chunk at {start} cancelled"))
            else:
                fut.set_exception(self._as_local(e, start, n))
            return
        try:
            # transport.loads, not pickle.loads: it leaves the kernel's own
            # notebook classes as they are when instances of them come back
            res: ChunkResult = transport_loads(data)
        except BaseException as e:  # noqa: BLE001 - a result the kernel cannot load
            fut.set_exception(e)
            return
        res.worker = f"worker {res.worker}"
        fut.set_result(res)

    def _as_local(self, e: BaseException, start: int, n: int) -> BaseException:
        """A failure of the machinery (an iteration's own error comes back
        inside the result) as something the user can act on."""
        exc = self.ray.exceptions
        which = f"iterations {start}..{start + n - 1}" if n else "the inputs"
        if isinstance(e, exc.TaskCancelledError):
            return WorkerLostError(f"the Ray task running {which} was cancelled")
        if isinstance(e, exc.RayTaskError):
            cause = getattr(e, "cause", None)
            if isinstance(cause, TransportError):
                return TransportError(str(cause), name=cause.name)
            return RuntimeError(f"parloop Ray-side failure: {e}")
        if isinstance(e, exc.RayError):
            # the worker process (or its node) died, and Ray's retries are used up
            return WorkerLostError(
                f"the Ray worker running {which} died and the retries ({self.retries}) "
                f"are used up: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
        return e

    @property
    def dispatch(self) -> str:
        return "tasks"

    def _refs(self, after: int) -> list[tuple[Any, Future]]:
        with self._lock:
            return [rf for start, rf in self._pending.items() if start > after]

    def _cancel(self, refs: list[tuple[Any, Future]], *, force: bool = False) -> None:
        for ref, _ in refs:
            try:
                self.ray.cancel(ref, force=force)
            except Exception:  # noqa: BLE001 - finished meanwhile: nothing to cancel
                pass

    def cancel_after(self, index: int) -> None:
        self._cancel_from = index if self._cancel_from is None else min(index, self._cancel_from)
        self._cancel(self._refs(index))

    def interrupt(self) -> None:
        """Cancel every task; kill those still running after :attr:`GRACE`
        seconds (a worker that ignores SIGINT: the plain cancel did nothing)."""
        print("parloop: interrupting the Ray tasks (ray.cancel)", file=sys.stderr)
        self._cancel_from = -1
        refs = self._refs(-1)
        self._cancel(refs)
        _, left = wait([fut for _, fut in refs], timeout=self.GRACE)
        stuck = [(ref, fut) for ref, fut in refs if fut in left]
        if stuck:
            print(
                f"parloop: {len(stuck)} Ray task(s) still running {self.GRACE:g} s after the "
                "cancel (workers that ignore SIGINT?): killing their workers",
                file=sys.stderr,
            )
            self._cancel(stuck, force=True)

    def finish(self) -> None:
        # whatever still runs is not needed any more (after an error, an interrupt)
        self._cancel(self._refs(-1))
        self._store = None  # Ray frees the object once no task refers to it
