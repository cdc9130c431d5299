"""``%%parallel dask``: chunks as tasks on a Dask ``distributed`` cluster
(docs/design.md §7).

Which cluster: ``dask`` alone runs on the notebook's own client
(``distributed.default_client()``) when the user made one, which parloop
never closes; otherwise on a ``LocalCluster`` that parloop starts, owns and
stops at ``%parallel_stop`` / ``%unload_ext`` (as ``processes=N`` does for
ipyparallel).  ``dask=tcp://HOST:PORT`` or ``dask=scheduler.json`` connects
to that scheduler; parloop only ever closes its own connection.

What travels is what travels to ipyparallel engines, through the same code:
the inputs and the chunk function's program are serialised once per cell by
:class:`~parloop.backends.engines.transport.Transport` and stored in each
worker *process* (``worker._STORE``), keyed by parloop's own content digests
-- not as scattered Dask data, whose replicas the active memory manager
drops (measured: from 2 workers to 1 within 5 s).  An unchanged input is not
sent again in the next cell.  A chunk is one task running
:func:`~parloop.backends.engines.worker.run_remote`; its result comes back as
bytes the kernel unpickles with its own classes.

Failures: a worker that dies takes its tasks with it, and the scheduler runs
them again elsewhere (up to ``distributed.scheduler.allowed-failures``); a
task that lands on a worker which has not got the inputs (one that joined or
was restarted by its nanny) is sent them and run again, ``retries`` times.

Interrupt: ``client.cancel`` does not stop a running task (dask/distributed
#4694), and SIGINT would shut the worker down; so the kernel raises
``KeyboardInterrupt`` asynchronously in the threads running parloop's tasks
(``client.run``), which stops them at once and keeps the workers.

``timeout=`` is refused (options.py): no alarm signal reaches a worker thread.
"""

from __future__ import annotations

import logging
import pickle
import sys
import threading
import uuid
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ClassVar

import cloudpickle

from ..errors import WorkerLostError
from ..runtime import ChunkResult
from .base import Backend, Job
from .dask_remote import call, raise_in_tasks, silent_workers
from .engines.backend import _local_modules, job_inputs
from .engines.transport import Transport, TransportError
from .engines.transport import loads as transport_loads
from .engines.worker import PROGRESS_TOPIC, run_remote

if TYPE_CHECKING:
    from ..analysis import LoopPlan
    from ..options import Options

log = logging.getLogger("parloop.dask")

#: the message worker._materialize raises for an input a process has not got
_MISSING = "is not on this engine"


class _Reply:
    """What Transport waits on: a Dask future's result."""

    def __init__(self, fut: Any):
        self.fut = fut

    def get(self, timeout: float | None = None) -> Any:
        try:
            return self.fut.result(timeout=timeout)
        finally:
            self.fut.release()


class _WorkerView:
    """One Dask worker as Transport addresses an engine: ``apply_async``
    runs a function in that worker's process (as a task pinned to it)."""

    def __init__(self, client: Any, address: str):
        self.client, self.address = client, address

    def apply_async(self, fn: Any, *args: Any) -> _Reply:
        # frames travel as bytes: Dask pickles task arguments whole
        args = tuple(bytes(a) if isinstance(a, memoryview) else a for a in args)
        fut = self.client.submit(
            call,
            cloudpickle.dumps((fn, args)),
            workers=[self.address],
            allow_other_workers=False,
            pure=False,
            key=f"parloop-store-{uuid.uuid4().hex}",
        )
        return _Reply(fut)


class _Workers:
    """The client as Transport sees one: workers by number (stable for a
    worker's address as long as it lives), ``_engines`` their identities."""

    def __init__(self, client: Any):
        self.client = client
        self._engines: dict[int, str] = {}
        self._numbers: dict[str, int] = {}

    def refresh(self, silent: float | None = None) -> list[int]:
        """The workers now: their numbers, in address order -- without those
        the scheduler has not heard from for ``silent`` seconds (hung, or cut
        off: Dask keeps listing them until its 5-minute worker-ttl, and a
        message to one of them would wait as long)."""
        import time

        workers = self.client.scheduler_info()["workers"]
        now = time.time()
        addresses = sorted(
            a
            for a, w in workers.items()
            if silent is None or now - w.get("last_seen", now) <= silent
        )
        self._engines = {}
        for address in addresses:
            n = self._numbers.setdefault(address, len(self._numbers))
            self._engines[n] = address
        return sorted(self._engines)

    def __getitem__(self, number: int) -> _WorkerView:
        return _WorkerView(self.client, self._engines[number])


class _ClientState:
    """Kept per client across cells: what each worker already holds."""

    def __init__(self, client: Any):
        self.client = client
        self.workers = _Workers(client)
        self.transport = Transport(self.workers)
        self.checked: set[str] = set()  # workers whose versions were compared
        self.shipped = False  # parloop sent to the workers (parloop.backends.shipping)


def _spawnable_main() -> None:
    """Nannies start (and restart, after a worker died) their workers with
    multiprocessing's spawn, which reads ``__main__.__spec__``.  The module
    IPython installs as ``__main__`` (again after ``%reset``) has none, and
    spawn then fails ("Nanny failed to start"): give it the value a
    ``python -c`` main module has."""
    main = sys.modules.get("__main__")
    if main is not None and not hasattr(main, "__spec__"):
        main.__spec__ = None


class DaskBackend(Backend):
    """Chunks as tasks on the workers of one ``distributed`` client."""

    name = "dask"
    worker_noun = "worker"
    shares_memory = False
    #: a Dask task costs a few milliseconds between chunks: quarter-second
    #: chunks, cut as for ipyparallel tasks
    chunk_seconds = 0.25
    first_share = True
    #: measured on the 2-core machine (W2 through tasks: ~3 us an iteration
    #: end to end); a cell's round trip to the workers ~30 ms: cheaper
    #: iterations run as the plain loop in the kernel (parloop.native)
    native_costs = (3e-6, 0.030)
    #: a worker silent for this long (no heartbeat to the scheduler, which
    #: expects one every ~0.5 s on a small cluster) is given up on: its chunks
    #: run again elsewhere, rather than after Dask's 5-minute ``worker-ttl``
    SILENT_SECONDS = 10.0
    #: how often poll() asks the scheduler
    POLL_SECONDS = 1.0
    #: workers report each running chunk's progress four times a second, as
    #: Dask worker events the scheduler forwards to the client (~1 ms)
    live_rows = True

    #: the LocalCluster and client parloop started (and will stop)
    _owned: ClassVar[tuple[Any, Any] | None] = None
    #: clients parloop connected to by address (closed at shutdown; the
    #: clusters behind them are never stopped)
    _connected: ClassVar[dict[str, Any]] = {}
    _states: ClassVar[dict[int, _ClientState]] = {}

    # -- which cluster ----------------------------------------------------
    @classmethod
    def for_run(cls, opts: Options, plan: LoopPlan) -> DaskBackend:
        _spawnable_main()
        return cls(cls._client_for(opts), opts)

    @classmethod
    def _client_for(cls, opts: Options) -> Any:
        from distributed import Client, default_client

        if opts.dask is True:
            try:
                return default_client()  # the notebook's own client
            except ValueError:
                return cls._owned_client(opts.processes)
        address = str(opts.dask)
        client = cls._connected.get(address)
        if client is None or client.status != "running":
            if address.endswith(".json"):
                client = Client(scheduler_file=address, set_as_default=False, timeout=15)
            else:
                client = Client(address, set_as_default=False, timeout=15)
            cls._connected[address] = client
        return client

    @classmethod
    def _owned_client(cls, processes: int | None) -> Any:
        from distributed import Client, LocalCluster

        from ..schedule import cpu_count

        n = processes or cpu_count()
        if cls._owned is not None:
            cluster, client = cls._owned
            if client.status == "running" and len(cluster.workers) == n:
                return client
            cls._stop_owned()
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster, set_as_default=False)
        client.wait_for_workers(n, timeout=60)
        cls._owned = (cluster, client)
        return client

    @classmethod
    def _stop_owned(cls) -> bool:
        if cls._owned is None:
            return False
        cluster, client = cls._owned
        cls._owned = None
        cls._states.pop(id(client), None)
        try:
            client.close()
        finally:
            cluster.close()
        return True

    @classmethod
    def stop_cluster(cls) -> bool:
        return cls._stop_owned()

    @classmethod
    def shutdown(cls) -> None:
        """Stop the LocalCluster parloop started; close its connections to
        clusters it did not start (never those clusters themselves)."""
        for client in cls._connected.values():
            cls._states.pop(id(client), None)
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a connection already gone
                pass
        cls._connected.clear()
        cls._stop_owned()

    @classmethod
    def status_lines(cls) -> list[str]:
        lines = []
        clients = [c for c in cls._connected.values()]
        if cls._owned is not None:
            clients.insert(0, cls._owned[1])
        for client in clients:
            if client.status != "running":
                continue
            info = client.scheduler_info()
            owned = cls._owned is not None and client is cls._owned[1]
            kind = "local cluster parloop started" if owned else "scheduler"
            lines.append(
                f"backend: dask ({kind} {info.get('address')}), {len(info['workers'])} worker(s)"
            )
            for address, w in sorted(info["workers"].items()):
                lines.append(
                    f"  worker {address}: host {w.get('host')}, {w.get('nthreads')} thread(s)"
                )
        return lines

    # -- one run ----------------------------------------------------------
    def __init__(self, client: Any, opts: Options):
        super().__init__()
        self.client = client
        self.retries = opts.retries
        state = self._states.get(id(client))
        if state is None or state.client is not client:
            state = self._states[id(client)] = _ClientState(client)
        self.state = state
        # the workers the last cell saw, without a round trip to the scheduler:
        # a loop that runs natively needs no more (a cell's first chunk asks
        # the scheduler again, and compares the versions of new workers)
        known = sorted(state.workers._engines)
        self.ids = known or state.workers.refresh(self.SILENT_SECONDS)
        if not self.ids:
            raise WorkerLostError("the Dask cluster has no workers")
        self._inputs: dict[str, Any] | None = None
        self._sent = False
        self.keys: dict[str, str] = {}
        self._lock = threading.Lock()
        # task key -> (its future, chunk start, the chunk's future, payload, retries left)
        self._running: dict[str, tuple[Any, int, Future, bytes, int]] = {}
        self._cancel_from: int | None = None
        self._polled = 0.0
        self._given_up: set[str] = set()  # silent workers
        self._run_id = uuid.uuid4().hex[:12]
        self._progress: dict[int, tuple[str, int]] = {}  # chunk start -> (worker, done)
        self._subscribed = False
        if not known:
            self._check_versions()

    def _check_versions(self) -> None:
        """First contact with a worker: Python, cloudpickle and parloop as in
        the kernel, or a clear error before anything runs.  Workers that lack
        only parloop are sent this kernel's (parloop.backends.shipping) and
        asked again."""
        from .versions import check_versions

        new = [
            a
            for a in self.state.workers._engines.values()
            if a not in self.state.checked and a not in self._given_up
        ]
        if not new:
            return
        answers = self._versions(new)
        lacking = [a for a, v in answers.items() if v.get("parloop") is None]
        if lacking and not self.state.shipped:
            from .shipping import ship_to_dask

            ship_to_dask(self.client)
            self.state.shipped = True
            answers.update(self._versions(lacking))
            self.events.append(
                f"parloop is not installed on {len(lacking)} Dask worker(s): this kernel's "
                "parloop was sent to the cluster's workers (and to those that join later)"
            )
        for address, versions in answers.items():
            check_versions(versions, f"Dask worker {address}")
            self.state.checked.add(address)
        self.ids = self.state.workers.refresh(self.SILENT_SECONDS)
        self.ids = [n for n in self.ids if self.state.workers._engines[n] not in self._given_up]

    def _versions(self, workers: list[str]) -> dict[str, Any]:
        """Each worker's :func:`~parloop.backends.versions.process_versions`
        (it travels by value: it answers where parloop is not installed)."""
        from .versions import process_versions

        tasks = {
            a: self.client.submit(
                process_versions,
                workers=[a],
                allow_other_workers=False,
                pure=False,
                key=f"parloop-versions-{uuid.uuid4().hex}",
            )
            for a in workers
        }
        return self._answers(tasks)

    def _answers(self, tasks: dict[str, Any]) -> dict[str, Any]:
        """Wait for one task per worker; a worker that stops answering (the
        scheduler has not heard from it for SILENT_SECONDS: hung, or cut off)
        is given up on instead of being waited for until Dask's worker-ttl."""
        import time

        out: dict[str, Any] = {}
        try:
            while tasks:
                # (distributed.wait needs a default client: the one parloop
                # owns is not one)
                until = time.monotonic() + self.POLL_SECONDS
                while time.monotonic() < until and not all(t.done() for t in tasks.values()):
                    time.sleep(0.005)
                for address, task in list(tasks.items()):
                    if task.done():
                        out[address] = task.result()
                        del tasks[address]
                if not tasks:
                    break
                silent = self._silent_now(set(tasks))
                for address in silent:
                    self._give_up(address, "did not answer")
                    tasks.pop(address).cancel()
        except BaseException:
            for task in tasks.values():
                task.cancel()
            raise
        return out

    def _silent_now(self, among: set[str]) -> set[str]:
        """Which of ``among`` the scheduler has not heard from for SILENT_SECONDS."""
        import time

        workers = self.client.scheduler_info()["workers"]
        now = time.time()
        return {
            a
            for a in among
            if a not in workers or now - workers[a].get("last_seen", now) > self.SILENT_SECONDS
        }

    def _give_up(self, address: str, why: str) -> None:
        if address not in self._given_up:
            self._given_up.add(address)
            self.events.append(
                f"worker {address} {why} for {self.SILENT_SECONDS:.0f} s: given up on, "
                "the other workers run the loop"
            )

    def worker_count(self) -> int:
        return len(self.ids)

    def max_in_flight(self) -> int:
        # one running and one waiting per worker, so none idles between chunks
        return 2 * len(self.ids)

    def precheck(self, ns: dict[str, Any], names: set[str]) -> None:
        from .engines.transport import check_picklable

        check_picklable({n: ns[n] for n in sorted(names) if n in ns})

    def prepare(self, job: Job) -> None:
        self._inputs = job_inputs(job, live=job.live)
        program = self._inputs["___program"]
        program.progress, program.run = "dask", self._run_id
        if job.live:
            self.client.subscribe_topic(PROGRESS_TOPIC, self._on_progress)
            self._subscribed = True

    def _on_progress(self, event: Any) -> None:
        """A worker's progress event (in the client's thread): which chunk,
        how many of its iterations are done."""
        msg = event[1] if isinstance(event, tuple) else event
        if isinstance(msg, dict) and msg.get("run") == self._run_id:
            with self._lock:
                self._progress[msg["parloop_start"]] = (msg["worker"], msg["parloop_done"])

    def running(self) -> dict[int, tuple[str, int]]:
        with self._lock:
            starts = {start for _t, start, *_ in self._running.values()}
            return {
                start: (f"worker {worker}", int(done))
                for start, (worker, done) in self._progress.items()
                if start in starts
            }

    def _broadcast(self) -> None:
        """The inputs to every worker now in the cluster (each gets only what
        it has not got)."""
        assert self._inputs is not None
        import cloudpickle as cp

        local = _local_modules(self._inputs.values())
        for module in local:
            cp.register_pickle_by_value(module)
        try:
            while True:
                self.ids = self.state.workers.refresh(self.SILENT_SECONDS)
                self._check_versions()
                if not self.ids:
                    raise WorkerLostError(
                        "no Dask worker answers (all were silent for "
                        f"{self.SILENT_SECONDS:.0f} s); nothing ran"
                    )
                try:
                    self.keys = self.state.transport.broadcast(
                        self._inputs, self.ids, timeout=self.SILENT_SECONDS + 2
                    )
                    break
                except TimeoutError:
                    # a worker took long to store the inputs: the silent ones
                    # are given up on, the others asked again (each only
                    # for what it has not got)
                    engines = self.state.workers._engines
                    for address in self._silent_now({engines[n] for n in self.ids}):
                        self._give_up(address, "did not take the inputs")
        finally:
            for module in local:
                cp.unregister_pickle_by_value(module)

    def submit(self, items: list, start: int) -> Future[ChunkResult]:
        if not self._sent:
            self._broadcast()
            self._sent = True
        payload = cloudpickle.dumps((items, start), protocol=pickle.HIGHEST_PROTOCOL)
        fut: Future[ChunkResult] = Future()
        self._send(fut, payload, start, self.retries)
        return fut

    def _send(self, fut: Future, payload: bytes, start: int, retries_left: int) -> None:
        key = f"parloop-chunk-{start}-{uuid.uuid4().hex[:8]}"
        # once a worker was given up on, chunks go to the others only
        avoid = self._given_up
        others = [a for a in self.state.workers._engines.values() if a not in avoid]
        where: dict[str, Any] = (
            {"workers": others, "allow_other_workers": False} if avoid and others else {}
        )
        blob = cloudpickle.dumps((run_remote, (self.keys, payload)))
        task = self.client.submit(call, blob, pure=False, key=key, **where)
        with self._lock:
            self._running[key] = (task, start, fut, payload, retries_left)

        def done(task_: Any) -> None:
            with self._lock:
                self._running.pop(key, None)
            if fut.done():  # a copy sent elsewhere (a silent worker) came first
                task_.release()
                return
            try:
                res: ChunkResult = transport_loads(task_.result())
            except BaseException as e:  # noqa: BLE001 - sorted out below
                self._failed(fut, payload, start, retries_left, e)
                return
            finally:
                task_.release()
            res.worker = f"worker {res.worker}"
            with self._lock:
                if not fut.done():
                    fut.set_result(res)

        task.add_done_callback(done)

    def poll(self) -> None:
        """Between the dispatcher's waits, once a second: a worker the
        scheduler has not heard from for SILENT_SECONDS (cut off, or
        stopped) is given up on, and its chunks are sent to the others; the
        first copy of a chunk to finish is the one committed."""
        import time

        now = time.monotonic()
        if now - self._polled < self.POLL_SECONDS or not self._running:
            return
        self._polled = now
        try:
            silent = self.client.run_on_scheduler(silent_workers, self.SILENT_SECONDS)
        except Exception as e:  # noqa: BLE001 - the scheduler itself is unreachable
            log.debug("asking the scheduler for silent workers: %s", e)
            return
        for address, keys in silent.items():
            with self._lock:
                ours = [(k, self._running[k]) for k in keys if k in self._running]
            if not ours:
                continue
            self._give_up(address, "was silent")
            for key, (_task, start, fut, payload, retries_left) in ours:
                with self._lock:
                    self._running.pop(key, None)
                if fut.done():
                    continue
                if retries_left <= 0:
                    fut.set_exception(
                        WorkerLostError(
                            f"the Dask worker {address} running iterations from {start} "
                            "stopped answering and the retries are used up"
                        )
                    )
                    continue
                self.retried.add(start)
                self._send(fut, payload, start, retries_left - 1)

    def _failed(
        self, fut: Future, payload: bytes, start: int, retries_left: int, e: BaseException
    ) -> None:
        """A task failed as a task (an iteration's failure comes back inside
        its result): cancelled, a worker lost, or inputs missing there."""
        if fut.done():  # a copy of it, sent elsewhere, already finished
            return
        if self._cancel_from is not None and start > self._cancel_from:
            fut.set_exception(WorkerLostError(f"chunk at {start} cancelled"))
            return
        missing = isinstance(e, TransportError) and _MISSING in str(e)
        lost = type(e).__name__ in ("KilledWorker", "CancelledError", "FutureCancelledError")
        if (missing or lost) and retries_left > 0:
            self.retried.add(start)
            self.events.append(
                f"iterations from {start} ran again: "
                + ("a worker without the inputs took them" if missing else "their worker was lost")
            )
            # the worker set may have changed: send the inputs where they lack
            threading.Thread(
                target=self._resend,
                args=(fut, payload, start, retries_left - 1),
                daemon=True,
                name="parloop-dask-resend",
            ).start()
            return
        if missing or lost:
            fut.set_exception(
                WorkerLostError(
                    f"the Dask worker running iterations from {start} was lost and the "
                    f"retries are used up ({type(e).__name__}: {e})"
                )
            )
            return
        fut.set_exception(e)

    def _resend(self, fut: Future, payload: bytes, start: int, retries_left: int) -> None:
        try:
            self._broadcast()
            self._send(fut, payload, start, retries_left)
        except BaseException as again:  # noqa: BLE001 - handed to the dispatcher
            if not fut.done():
                fut.set_exception(again)

    def cancel_after(self, index: int) -> None:
        self._cancel_from = index if self._cancel_from is None else min(index, self._cancel_from)
        with self._lock:
            doomed = [task for task, start, *_ in self._running.values() if start > index]
        if doomed:
            self.client.cancel(doomed)

    def interrupt(self) -> None:
        """Running tasks get KeyboardInterrupt in their worker thread (they
        stop at once and send back the iterations they completed, which the
        dispatcher commits); the tasks not started yet are cancelled.  The
        workers stay up."""
        import sys

        print("parloop: interrupting the Dask tasks", file=sys.stderr)
        self._cancel_from = -1
        with self._lock:
            keys = list(self._running)
        hit: set[str] = set()
        if keys:
            try:
                for stopped in self.client.run(raise_in_tasks, keys).values():
                    hit.update(stopped)
            except Exception as e:  # noqa: BLE001 - a worker gone meanwhile
                log.debug("interrupting the Dask tasks: %s", e)
        with self._lock:
            waiting = [task for key, (task, *_) in self._running.items() if key not in hit]
        if waiting:
            self.client.cancel(waiting)

    def finish(self) -> None:
        if self._subscribed:
            self._subscribed = False
            try:
                self.client.unsubscribe_topic(PROGRESS_TOPIC)
            except Exception as e:  # noqa: BLE001 - the client closed meanwhile
                log.debug("unsubscribing: %s", e)
        with self._lock:
            left = [task for task, *_ in self._running.values()]
        for task in left:
            task.release()

    @property
    def dispatch(self) -> str:
        return "dask tasks"
