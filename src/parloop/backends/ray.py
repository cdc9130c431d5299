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
:func:`~parloop.backends.engines.worker.run_remote`'s work, whose result
comes back as bytes the kernel unpickles with its own classes.

Progress: a chunk's worker process tells a small actor of the kernel's
connection (:class:`_Progress`, no CPU, on the kernel's node) which chunk
runs there and how many of its iterations are done (:class:`_Reporter`):
before the chunk starts, then from a thread of its own every
:data:`LIVE_PERIOD` seconds (:data:`QUIET_PERIOD` without a live view).
The kernel reads the actor between its waits -- one call for all the
chunks -- for the live view's rows (:meth:`RayBackend.running`) and for its
own deadline (:meth:`RayBackend.poll`).  The reports come from a timer, not
from the iterations, so they say the worker is alive however long an
iteration runs.  Measured on the 2-core machine (kernel, workers and actor
sharing it), chunks of one trivial iteration: plain tasks cost 1.0-2.0 ms a
chunk end to end, 0.6-0.9 ms more with the reports -- nearly all of it the
report before each chunk, ~0.3 % of a quarter-second chunk -- of which
0.1-0.3 ms is the kernel's own CPU; streaming generator tasks cost 1.5-2.5
ms more, 0.9-1.1 ms of it the kernel's (it reads every record itself).

Why not a streaming generator task, yielding the records and then the
result (measured, Ray 2.60): its cost above, in the kernel; a generator
yields only between its own steps, so for records during a long iteration
the body would have to leave the worker's main thread (no ``signal.signal``
in a body, and a cancel could not stop a ``time.sleep``); Ray drops a
cancelled stream's result, so an interrupt would lose the iterations a
running chunk had done; and Ray's retry of a stream replays it from the
start but hands on only the items past those already read -- a retry that
yields fewer records than the first attempt loses its result, the stream
just ends.

Failures: a worker process that dies is Ray's to handle -- the task runs again
(``max_retries=retries``); once the retries are used up the chunk fails with
:class:`~parloop.errors.WorkerLostError`.  A running chunk whose worker has
not reported for :attr:`RayBackend.SILENT_SECONDS` (stopped, or cut off:
after a network partition Ray took ~65 s to declare the node dead and had
not re-run its tasks 120 s later, measured) is submitted again by parloop,
``retries`` times; the first copy to finish is the one committed.  An input
a worker cannot load (a module missing there) is found before any chunk
runs: the first task of a cell only loads the inputs, and its
``TransportError`` names the variable.

Interrupt: ``ray.cancel`` raises ``KeyboardInterrupt`` in the running task
(through ``_thread.interrupt_main``, which does nothing in a worker whose
SIGINT is ignored -- workers started from a non-interactive shell): the chunk
stops and returns the iterations it completed; a task still running after
:attr:`RayBackend.GRACE` seconds is killed (``force=True``: its worker process
goes, Ray starts another).

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
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import cloudpickle

from ..errors import WorkerLostError
from ..runtime import ChunkResult
from .base import Backend, Job
from .engines.worker import TransportError, _engine_store, _ProgressPublisher, _run, _setup, _worker

if TYPE_CHECKING:
    from ..analysis import LoopPlan
    from ..options import Options

log = logging.getLogger("parloop.ray")

#: seconds between a running chunk's reports with a live view (its row
#: moves four times a second) and without one (the kernel's deadline only
#: needs to hear that the worker is alive)
LIVE_PERIOD = 0.25
QUIET_PERIOD = 1.0


# ---------------------------------------------------------------------------
# on a Ray worker
# ---------------------------------------------------------------------------
#: the epochs (cells) whose inputs this worker process holds: one at a time
_STORED: set[str] = set()
#: the content keys this process stored for that epoch (dropped at the next)
_HELD: set[str] = set()


def _run_chunk(
    epoch: str,
    keys: dict[str, str],
    store: list,
    payload: bytes | None,
    progress: tuple[str, tuple[str, int, int], float] | None = None,
) -> bytes:
    """Runs ON A RAY WORKER: one chunk of the cell ``epoch`` (``payload`` is
    ``cloudpickle((items, start))``), or with ``payload=None`` only load the
    cell's inputs (the kernel's first task of a cell: a ``TransportError``
    then comes before anything ran).

    ``store`` is ``[ObjectRef]`` of the cell's store message: in a list, so
    that Ray does not resolve it for each task -- this process fetches it
    only on its first chunk of the cell.  ``progress`` is ``(the progress
    actor's name, (run, chunk start, copy), seconds between reports)``.

    The chunk runs in this, the task's main thread, as any Ray task does: a
    cancel's KeyboardInterrupt stops it between two iterations, or in a
    ``time.sleep``, and what it completed still comes back."""
    if epoch not in _STORED:
        _store_inputs(epoch, store[0])
    if payload is None:
        return b""
    fn, program = _setup(keys)
    reading = _Reading()
    if progress is not None:
        _REPORTER.begin(progress, reading)
    try:
        return _run(fn, program, payload, reading, _worker())
    finally:
        if progress is not None:
            _REPORTER.end()


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


class _Reading(_ProgressPublisher):
    """The running chunk's control, kept for the reporter thread to read
    (``len(ctl.marks)``: its iterations done).  No thread of its own."""

    def watch(self, ctl: Any) -> None:
        self._ctl = ctl

    def done(self) -> int:
        ctl = self._ctl
        return len(ctl.marks) if ctl is not None else 0


class _Reporter:
    """A worker process's reporter: one daemon thread that reports the
    running chunk at once when it begins (the kernel then knows it runs,
    rather than waits in Ray's queue), then every period, however long the
    iterations are: it is a timer, so only a stopped or cut-off worker goes
    silent.  Reports are fire-and-forget actor calls.

    Every Ray call of the reports -- the actor's lookup included -- is made
    from that thread, never from the task's own: a cancel's
    KeyboardInterrupt lands in the task's thread, and one that landed inside
    ``actor.report.remote()`` left that process's later reports queued
    behind a call that was never sent (the actor runs one caller's calls in
    the order they were numbered).  Its reports then never arrived: no live
    rows from it, and no deadline for its chunks, for the rest of the
    connection."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._chunk: tuple[str, tuple[str, int, int], float, _Reading] | None = None
        self._begun = False  # a chunk began that has not been reported yet
        self._thread: threading.Thread | None = None
        self.me = ""

    def begin(self, progress: tuple[str, tuple[str, int, int], float], reading: _Reading) -> None:
        name, key, period = progress
        self.me = self.me or _worker()
        with self._cond:
            self._chunk = (name, key, period, reading)
            self._begun = True
            self._cond.notify()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="parloop-ray-progress", daemon=True
                )
                self._thread.start()

    def end(self) -> None:
        with self._cond:
            self._chunk = None

    def _send(self, actor: Any, key: tuple[str, int, int], done: int) -> None:
        try:
            actor.report.remote(key, self.me, done)
        except Exception as e:  # noqa: BLE001 - the actor gone: the kernel copes
            log.debug("parloop progress report: %s", e)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._chunk is None:
                    self._cond.wait()
                chunk = self._chunk
                if not self._begun:
                    self._cond.wait(chunk[2])  # woken early by the next chunk
                    if self._chunk is not chunk:
                        continue
                self._begun = False
            name, key, _, reading = chunk
            # not reachable now: looked up again at a later report
            actor = _actor(name)
            if actor is not None:
                self._send(actor, key, reading.done())


def _actor(name: str) -> Any:
    """The progress actor called ``name``, looked up once per process and
    called once and waited for (so that its address is known here and the
    next reports go out at once); None if it cannot be reached now (asked
    again RETRY_SECONDS later: a minute, as it was,
    kept a worker process silent through the next runs when the actor was
    not registered yet at the first chunk of a connection)."""
    actor = _ACTORS.get(name)
    if actor is not None or time.monotonic() < _MISSING.get(name, 0.0):
        return actor
    import ray

    try:
        actor = ray.get_actor(name)
        ray.get(actor.ping.remote(), timeout=10)
    except Exception as e:  # noqa: BLE001 - the run goes on without reports
        log.debug("parloop progress actor %s: %s", name, e)
        _MISSING[name] = time.monotonic() + RETRY_SECONDS
        return None
    _ACTORS[name] = actor
    return actor


_REPORTER = _Reporter()
#: the progress actors by name, looked up once per process (a handle in
#: every task's arguments costs each task ~0.25 ms, measured)
_ACTORS: dict[str, Any] = {}
#: actors that could not be reached: not before this time again
_MISSING: dict[str, float] = {}
#: seconds before an actor that could not be reached is looked up again (a
#: failed lookup is one quick GCS request; 2 s let a whole 2 s chunk go unseen)
RETRY_SECONDS = 0.5


class _Progress:
    """The progress actor (one per kernel connection, no CPU): what the
    workers report, by ``(run, chunk start, copy)``; the kernel asks for a
    run's reports, with their ages on the actor's own clock (no clocks of
    other hosts compared)."""

    def __init__(self) -> None:
        self.heard: dict[tuple[str, int, int], tuple[str, int, float]] = {}

    def report(self, key: tuple[str, int, int], worker: str, done: int) -> None:
        self.heard[key] = (worker, done, time.monotonic())

    def ping(self) -> None:
        """Answered once by each worker process's first call (see _actor)."""

    def snapshot(
        self, run: str, forget: list[tuple[int, int]]
    ) -> dict[tuple[int, int], tuple[str, int, float]]:
        """``{(start, copy): (worker, iterations done, seconds since its
        last report)}`` for the run; the chunks in ``forget`` are over."""
        for start, copy in forget:
            self.heard.pop((run, start, copy), None)
        now = time.monotonic()
        return {
            (start, copy): (worker, done, now - t)
            for (r, start, copy), (worker, done, t) in self.heard.items()
            if r == run
        }

    def drop(self, run: str) -> None:
        for key in [k for k in self.heard if k[0] == run]:
            del self.heard[key]


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
    #: the progress actor (:class:`_Progress`) and its name, made on the first run
    progress: tuple[Any, str] | None = None
    progress_ready: bool = False  # it answered once (or was waited for long enough)
    #: the workers lack parloop: the connection's job takes this kernel's
    #: package along (``{"py_modules": [its directory]}``)
    runtime_env: dict[str, Any] | None = None
    #: said once, by the first run after parloop was found missing
    note: str = ""


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
    a clear error before anything runs.

    A cluster at ``ray=ADDRESS`` that lacks only parloop gets this kernel's:
    parloop connects again with Ray's own ``runtime_env={"py_modules":
    [...]}``, which Ray uploads once (by content) and unpacks on each node
    (per task it takes only remote URIs; see parloop.backends.shipping for
    why a package, not by-value pickling).  On the notebook's own
    ``ray.init()`` the job's environment is the notebook's to set: the
    error says how."""
    from .versions import VersionMismatchError, check_versions, process_versions

    if conn.checked:
        return
    remote = _probe(ray, conn, process_versions)
    if remote.get("parloop") is None and conn.how == "connected" and conn.runtime_env is None:
        import parloop

        conn.runtime_env = {"py_modules": [os.path.dirname(parloop.__file__)]}
        ray.shutdown()  # its progress actor goes with the job: made again
        conn.progress, conn.progress_ready, conn.chunk_task = None, False, None
        ray.init(
            address=str(conn.asked),
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env=conn.runtime_env,
        )
        remote = _probe(ray, conn, process_versions)
        conn.note = (
            "parloop is not installed on the Ray cluster's workers: this kernel's parloop "
            "goes with its tasks (runtime_env py_modules)"
        )
    try:
        check_versions(remote, f"a Ray worker of {conn.address}")
    except VersionMismatchError as e:
        if remote.get("parloop") is None and conn.how == "notebook":
            raise VersionMismatchError(
                f"{e} Or let Ray send this kernel's parloop with the job: "
                "ray.init(..., runtime_env={'py_modules': [parloop]})"
            ) from None
        raise
    conn.checked = True


def _probe(ray: Any, conn: _Connection, fn: Any) -> dict[str, Any]:
    probe = ray.remote(fn).options(num_cpus=0, max_retries=1)
    try:
        return ray.get(probe.remote(), timeout=300)
    except ray.exceptions.GetTimeoutError:
        raise WorkerLostError(
            f"parloop: no Ray worker at {conn.address} answered within 300 s"
        ) from None


# ---------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------
@dataclass(eq=False)
class _Chunk:
    """One chunk of the run, however many tasks (copies) it took."""

    start: int
    n: int
    payload: bytes
    fut: Future
    copies_left: int  # parloop's own resubmissions (after silent workers)
    attempts: list[_Attempt] = field(default_factory=list)
    settled: bool = False  # its future has (or is about to have) its outcome

    @property
    def which(self) -> str:
        return f"iterations {self.start}..{self.start + self.n - 1}"


@dataclass(eq=False)
class _Attempt:
    """One task running a chunk (Ray's own retries of it included)."""

    chunk: _Chunk
    copy: int  # 0, then 1, 2... for the copies after silent workers
    seq: int  # the order the run submitted its tasks in
    ref: Any = None
    worker: str = ""  # "host:pid", from its reports
    done: int = 0  # iterations done, from its reports
    age: float | None = None  # seconds since its last report (None: none yet)
    since: float | None = None  # never reported: when it was known to have started
    silent: bool = False  # given up on by the deadline (it may still finish first)
    over: bool = False


class RayBackend(Backend):
    """Chunks as Ray tasks, one task per chunk (and a copy of a chunk whose
    worker went silent), on the kernel's Ray connection."""

    name = "ray"
    worker_noun = "worker"
    shares_memory = False
    #: the workers report each running chunk's progress to the progress actor
    live_rows = True
    #: a task costs milliseconds (scheduling, result through the object
    #: store): chunks of a quarter second make that ~1 %, cut a quarter of
    #: each worker's share up front as multiprocessing.Pool.map does
    chunk_seconds = 0.25
    first_share = True
    #: seconds a cancelled task may take to stop before its worker is killed
    GRACE: ClassVar[float] = 2.0
    #: a running chunk not reported for this long (its reports come at least
    #: once a second, whatever its iterations do) has a stopped or cut-off
    #: worker: it runs again, long before Ray gives up on a node it cannot reach
    SILENT_SECONDS: ClassVar[float] = 10.0

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
        if conn.note:
            self.events.append(conn.note)
            conn.note = ""
        self.actor, self.actor_name = _progress_actor(ray, conn)
        self.run = uuid.uuid4().hex[:12]
        self.period = QUIET_PERIOD
        self._inputs: dict[str, Any] | None = None
        self._store: Any = None  # the cell's store message in Ray's object store
        self.epoch = ""
        self.keys: dict[str, str] = {}
        self._lock = threading.Lock()
        #: chunk start -> the chunks not settled yet
        self._chunks: dict[int, _Chunk] = {}
        #: the tasks not finished (settled chunks' losers too)
        self._live: set[_Attempt] = set()
        self._cancel_from: int | None = None
        self._asked = 0.0  # when the actor was last asked
        self._asking = False  # and has not answered yet
        #: its answer, for the next poll(): {(start, copy): (worker, done, age)}
        self._answer: dict[tuple[int, int], tuple[str, int, float]] | None = None
        self._forget: list[tuple[int, int]] = []  # (start, copy) over, for the actor
        self._seq = itertools.count()
        self._started = -1  # the last task (by seq) known to have started

    @classmethod
    def for_run(cls, opts: Options, plan: LoopPlan) -> RayBackend:
        conn = _connect(opts)
        ray = _import_ray()
        _progress_actor(ray, conn)  # starts while the versions are compared
        _check_versions(ray, conn)
        _progress_actor(ray, conn)  # again if the check had to send parloop along
        _progress_ready(ray, conn)
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
        self.period = LIVE_PERIOD if job.live else QUIET_PERIOD

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
        fut: Future[ChunkResult] = Future()
        chunk = _Chunk(start, len(items), payload, fut, self.retries)
        with self._lock:
            self._chunks[start] = chunk
        self._launch(chunk)
        return fut

    def _launch(self, chunk: _Chunk) -> None:
        """One more task for ``chunk`` (the first, or a copy)."""
        att = _Attempt(chunk, len(chunk.attempts), next(self._seq))
        progress = (self.actor_name, (self.run, chunk.start, att.copy), self.period)
        att.ref = self.task.remote(self.epoch, self.keys, [self._store], chunk.payload, progress)
        with self._lock:
            chunk.attempts.append(att)
            self._live.add(att)
        if self._cancel_from is not None and chunk.start > self._cancel_from:
            self._cancel([att])  # not needed any more (cancelled meanwhile)
        att.ref.future().add_done_callback(lambda rf: self._done(att, rf))

    def _done(self, att: _Attempt, rf: Future) -> None:
        """A task ended (in Ray's thread): the chunk's result unless a copy
        came first, or what went wrong."""
        from .engines.transport import loads as transport_loads

        chunk = att.chunk
        ran = rf.exception() is None
        with self._lock:
            att.over = True
            self._live.discard(att)
            if ran:  # then every task submitted before it started too
                self._started = max(self._started, att.seq)
            if chunk.settled:
                return
        try:
            data = rf.result()
        except BaseException as e:  # noqa: BLE001 - becomes the chunk's error
            self._failed(att, e)
            return
        others = self._settle(chunk)
        if others is None:
            return
        self._cancel(others)  # copies still running: not needed
        try:
            # transport.loads, not pickle.loads: it leaves the kernel's own
            # notebook classes as they are when instances of them come back
            res: ChunkResult = transport_loads(data)
        except BaseException as e:  # noqa: BLE001 - a result the kernel cannot load
            chunk.fut.set_exception(e)
            return
        res.worker = f"worker {res.worker}"
        chunk.fut.set_result(res)

    def _settle(self, chunk: _Chunk) -> list[_Attempt] | None:
        """Mark ``chunk`` decided (None: it was already); its tasks still running."""
        with self._lock:
            if chunk.settled:
                return None
            chunk.settled = True
            self._chunks.pop(chunk.start, None)
            self._forget += [(chunk.start, a.copy) for a in chunk.attempts]
            return [a for a in chunk.attempts if not a.over]

    def _failed(self, att: _Attempt, e: BaseException) -> None:
        """A task failed as a task (an iteration's own error comes back
        inside the result): cancelled, a failure of the machinery, or its
        worker lost with Ray's retries used up -- then the chunk fails,
        unless another copy of it still runs."""
        chunk = att.chunk
        exc = self.ray.exceptions
        lost = isinstance(e, exc.RayError) and not isinstance(
            e, (exc.RayTaskError, exc.TaskCancelledError)
        )
        if self._cancel_from is not None and chunk.start > self._cancel_from:
            error: BaseException = WorkerLostError(f"chunk at {chunk.start} cancelled")
        else:
            if lost:
                with self._lock:
                    if any(not a.over and not a.silent for a in chunk.attempts):
                        return  # another copy runs on
            error = self._as_local(e, chunk.start, chunk.n, att.worker)
        if self._settle(chunk) is not None:
            chunk.fut.set_exception(error)

    def _as_local(self, e: BaseException, start: int, n: int, worker: str = "") -> BaseException:
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
                f"the Ray worker {worker + ' ' if worker else ''}running {which} died and the "
                f"retries ({self.retries}) are used up: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
        return e

    # -- the progress actor, between the dispatcher's waits -----------------
    def poll(self) -> None:
        """Take the progress actor's last answer if it came (never waiting
        for it), and ask again once a period: the live rows, and parloop's
        own deadline -- a running chunk whose worker has not reported for
        SILENT_SECONDS (stopped, or cut off from the kernel's node) runs
        again while retries last; the silent task may still finish first,
        and the first copy to finish is the one committed.  The decision
        rests on the actor's latest answer only: an actor that does not
        answer (restarting, busy) makes no chunk look silent."""
        answer, self._answer = self._answer, None
        if answer is not None:
            self._heard(answer)
        now = time.monotonic()
        if now - self._asked >= self.period and not self._asking:
            self._asked = now
            self._asking = True
            with self._lock:
                forget, self._forget = self._forget, []
            _ACTOR_CALLS.submit(self.actor.snapshot.remote, self.run, forget).add_done_callback(
                self._asked_actor
            )

    def _asked_actor(self, sent: Future) -> None:
        """The question went (in the actor-call thread): wait for the answer."""
        try:
            ref = sent.result()
        except Exception as e:  # noqa: BLE001 - the connection went meanwhile
            log.debug("the progress actor: %s", e)
            self._asking = False
            return
        ref.future().add_done_callback(self._answered)

    def _answered(self, fut: Future) -> None:
        """The actor answered (in Ray's thread): kept for the next poll()."""
        self._asking = False
        try:
            self._answer = fut.result()
        except Exception as e:  # noqa: BLE001 - the actor died (Ray restarts it)
            log.debug("the progress actor: %s", e)

    def _heard(self, heard: dict[tuple[int, int], tuple[str, int, float]]) -> None:
        """The actor's answer: each task's reports; the silent ones given up on.

        A task that never reported (its worker stopped or was cut off before
        the first report got out) counts as started once a task submitted
        after it was heard from: Ray hands one owner's tasks of one kind to
        workers in the order they were submitted."""
        now = time.monotonic()
        silent: list[tuple[_Chunk, _Attempt, bool]] = []  # (chunk, task, copy again)
        with self._lock:
            for chunk in self._chunks.values():
                for att in chunk.attempts:
                    got = heard.get((chunk.start, att.copy))
                    if got is not None:
                        att.worker, att.done, att.age = got
                        self._started = max(self._started, att.seq)
            for chunk in self._chunks.values():
                for att in chunk.attempts:
                    if att.over or att.silent:
                        continue
                    if att.age is None:
                        if att.seq > self._started:
                            continue  # waiting in Ray's queue, as far as anyone knows
                        if att.since is None:
                            att.since = now
                        if now - att.since <= self.SILENT_SECONDS:
                            continue
                    elif att.age <= self.SILENT_SECONDS:
                        continue
                    att.silent = True
                    if any(not a.over and not a.silent for a in chunk.attempts):
                        continue  # another copy runs on
                    again = chunk.copies_left > 0
                    chunk.copies_left -= again
                    silent.append((chunk, att, again))
        for chunk, att, again in silent:
            why = (
                f"the Ray worker {att.worker or '(never heard from)'} running {chunk.which} "
                f"was silent for {self.SILENT_SECONDS:.0f} s (stopped, or cut off)"
            )
            if again:
                self.events.append(f"{why}: its iterations ran again")
                self.retried.add(chunk.start)
                try:
                    self._launch(chunk)
                except BaseException as e:  # noqa: BLE001 - handed to the dispatcher
                    if self._settle(chunk) is not None:
                        chunk.fut.set_exception(e)
            else:
                self.events.append(why)
                if self._settle(chunk) is not None:
                    chunk.fut.set_exception(
                        WorkerLostError(f"{why} and the retries ({self.retries}) are used up")
                    )

    def running(self) -> dict[int, tuple[str, int]]:
        with self._lock:
            rows = {}
            for chunk in self._chunks.values():
                heard = [a for a in chunk.attempts if a.age is not None and not a.over]
                if heard:
                    best = max(heard, key=lambda a: (not a.silent, a.done))
                    rows[chunk.start] = (f"worker {best.worker}", best.done)
            return rows

    @property
    def dispatch(self) -> str:
        return "tasks"

    # -- stopping ---------------------------------------------------------
    def _attempts(self, after: int) -> list[_Attempt]:
        with self._lock:
            return [a for a in self._live if a.chunk.start > after]

    def _cancel(self, attempts: list[_Attempt], *, force: bool = False) -> None:
        for att in attempts:
            try:
                self.ray.cancel(att.ref, force=force)
            except Exception:  # noqa: BLE001 - finished meanwhile: nothing to cancel
                pass

    def cancel_after(self, index: int) -> None:
        self._cancel_from = index if self._cancel_from is None else min(index, self._cancel_from)
        self._cancel(self._attempts(index))

    def interrupt(self) -> None:
        """Cancel every task; kill those still running after :attr:`GRACE`
        seconds (a worker that ignores SIGINT: the plain cancel did nothing)."""
        print("parloop: interrupting the Ray tasks (ray.cancel)", file=sys.stderr)
        self._cancel_from = -1
        attempts = self._attempts(-1)
        self._cancel(attempts)
        futures = {a.ref.future(): a for a in attempts}
        _, left = wait(futures, timeout=self.GRACE)
        stuck = [futures[f] for f in left]
        if stuck:
            print(
                f"parloop: {len(stuck)} Ray task(s) still running {self.GRACE:g} s after the "
                "cancel (workers that ignore SIGINT?): killing their workers",
                file=sys.stderr,
            )
            self._cancel(stuck, force=True)

    def finish(self) -> None:
        # whatever still runs is not needed any more (after an error, an
        # interrupt, or a silent worker's task that a copy beat)
        self._cancel(self._attempts(-1))
        self._store = None  # Ray frees the object once no task refers to it
        _ACTOR_CALLS.submit(self.actor.drop.remote, self.run)  # an error: the actor is gone


#: the kernel's calls to its progress actors go from this one thread, never
#: from the cell's: a KeyboardInterrupt (the stop button) that lands inside
#: an actor call leaves this process's later calls to that actor queued
#: behind it for good (see _Reporter) -- no live rows and no deadlines for
#: the rest of the connection
_ACTOR_CALLS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parloop-ray-actor")


def _progress_actor(ray: Any, conn: _Connection) -> tuple[Any, str]:
    """The connection's progress actor and its name, started on its first
    run (it needs no CPU; on the kernel's node, so that a node cut off from
    the kernel is cut off from it too)."""
    if conn.progress is None:
        name = f"parloop-progress-{_UID}-{next(_EPOCHS)}"
        options: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, "name": name}
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(here, soft=True)
        except Exception as e:  # noqa: BLE001 - Ray Client: wherever Ray puts it
            log.debug("no node affinity for the progress actor: %s", e)
        conn.progress = (ray.remote(_Progress).options(**options).remote(), name)
    return conn.progress


def _progress_ready(ray: Any, conn: _Connection) -> None:
    """Wait for the progress actor's first answer, once per connection: the
    first run's rows then show from its start.  Not for ever (a busy cluster
    may start it late): until it is up, the reports wait in Ray and no chunk
    looks silent."""
    if conn.progress is None or conn.progress_ready:
        return
    conn.progress_ready = True
    try:
        sent = _ACTOR_CALLS.submit(conn.progress[0].snapshot.remote, "", [])
        ray.get(sent.result(timeout=30), timeout=30)
    except Exception as e:  # noqa: BLE001 - the run goes on without rows for now
        log.debug("the progress actor is not up yet: %s", e)
