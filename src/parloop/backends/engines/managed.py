"""The local cluster parloop starts itself, and keeps warm between cells (docs/design.md §7).

A controller plus ``processes`` engines.  Engines are subprocesses of the
kernel running ``python -m ipyparallel.engine`` with the kernel's own
interpreter (``sys.executable``) in the kernel's working directory.  They are
not forked from the kernel and nothing in them depends on the kernel's
``__main__``: code and data travel by value (:mod:`.transport`).  The
controller listens on 127.0.0.1 only, and its files live in a private profile
directory (removed by :meth:`ManagedCluster.stop`), so neither the user's
default profile configuration nor ``~/.ipython`` is involved.  Every process is
recorded, and started so that it dies with the kernel (:mod:`.processes`).

ipyparallel's launcher API is asynchronous: its coroutines run on parloop's
event loop thread (:mod:`parloop.aioloop`), so this works the same inside a
kernel (whose main thread already runs an asyncio loop) and outside one.

Start-up cost (2-core machine, 2 engines; see ``tests/test_cluster.py``):

* ``ipyparallel.Cluster(n=2).start_and_connect_sync()`` takes ~6.7 s, and about
  5 s of that is the controller's heartbeat: an engine's registration only
  completes at the heart monitor's next beat after the engine's first pong, and
  the default period is 3 s.  We run the controller with
  ``HeartMonitor.period=250`` ms (the heart monitor is a process of its own and
  engines answer pings from a C thread, so a short period costs nothing and
  busy engines are not dropped).  Cold start is then ~1.7 s (2.4 s in a fresh
  kernel, which also imports ipyparallel): ~0.6 s until the controller has
  written its connection files, ~1 s for the engines to import and register.
* ``Cluster.delay`` (1 s sleep between controller and engines) is useless here
  because engines are handed the controller's connection info and only start
  after it exists; it is set to 0, as is the 0.1 s between engines.
* Engines run without ipyparallel's "nanny" helper process (~0.1 s less).  The
  nanny is the engine's child and outlives it for up to 3 s (zmq LINGER) and,
  where PID 1 does not reap orphans (containers, sandboxes), stays a zombie for
  good, which orphan checks count as a leftover.  What it offers is covered
  otherwise: a dead engine is seen at once by :meth:`ManagedCluster.dead_engines`
  (its pid) and by the controller after ``HEARTBEAT_MISSES`` beats (5 s);
  signals go straight to the engine's pid (:meth:`ManagedCluster.signal_engines`).
* Tried and not worth it: ``--usethreads`` for the controller's schedulers,
  starting engines before the controller (``send_engines_connection_env=False``),
  a lower engine log level.
* Warm reuse (same ``processes``) is ~0.3 ms: a pid check of the processes.
  Growing adds an engine set (~1 s); shrinking stops the newest engines (~0.3 s);
  both keep the other engines warm.
* :meth:`ManagedCluster.prestart` starts the cluster in the background (e.g. at
  ``%load_ext``), so that the first cell only waits for what is left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Callable

from ...aioloop import call_before_stop, event_loop, run_on_loop
from .engine_info import EngineInfoCache
from .processes import ProcessLedger, launch_command

__all__ = ["ManagedCluster", "HEARTBEAT_MS", "HEARTBEAT_MISSES"]

log = logging.getLogger("parloop.cluster")
# ipyparallel's launchers log every engine's whole output as a warning when it
# exits with a nonzero code -- which a SIGTERMed engine does.  Keep that out of
# the notebook unless somebody asks for it.
_ipp_log = logging.getLogger("parloop.cluster.ipyparallel")
_ipp_log.setLevel(logging.ERROR)

#: controller heartbeat period (ms); ipyparallel's default is 3000, which makes
#: every engine registration take 3-6 s (see the module docstring).
HEARTBEAT_MS = 250
#: missed heartbeats before the controller unregisters an engine (5 s).
HEARTBEAT_MISSES = 20


def _tail(text: str, lines: int = 15) -> str:
    return "".join(text.splitlines(True)[-lines:])


class ManagedCluster:
    """At most one local cluster started by parloop: its start, size, health and stop.

    ``lock`` is the cluster manager's (reentrant): every public method takes it.
    ``on_stop(client)`` is called, under it, when the cluster behind ``client``
    is stopped (the manager forgets it was the current one).
    """

    def __init__(
        self,
        lock: threading.RLock,
        ledger: ProcessLedger,
        engines: EngineInfoCache,
        on_stop: Callable[[Any], None],
    ) -> None:
        self._lock = lock
        self._ledger = ledger
        self._engines = engines
        self._on_stop = on_stop
        self._owner = os.getpid()
        self.cluster: Any = None  # ipyparallel.Cluster
        self.client: Any = None  # ipyparallel.Client connected to it
        self.processes = 0
        self.profile_dir: str | None = None
        self._pending: concurrent.futures.Future | None = None  # prestart()
        self._pending_n = 0
        # The processes are children of parloop's event loop thread and get
        # SIGTERM when it ends (PR_SET_PDEATHSIG): whoever stops the loop stops
        # the cluster first, properly.
        call_before_stop(self.stop)

    # -- public API -----------------------------------------------------------
    def sized_client(self, n: int, timeout: float):
        """The client of the managed cluster with exactly ``n`` live engines:
        started, connected, resized or replaced as needed."""
        with self._lock:
            self._check_owner()
            return self._managed_client(n, timeout)

    def prestart(self, n: int) -> None:
        """Start the cluster in the background and return at once.

        A later :meth:`sized_client` with the same ``n`` then only waits for
        what is left of the start-up.  Does nothing if a managed cluster exists.
        """
        with self._lock:
            self._check_owner()
            if self.cluster is not None or self._pending is not None:
                return
            self._pending_n = n
            self._pending = asyncio.run_coroutine_threadsafe(self._astart(n), event_loop())

    def stop(self) -> bool:
        """Stop the cluster and wait until its processes are gone.

        Returns True if something was stopped.  Idempotent; safe to call from atexit.
        """
        with self._lock:
            if os.getpid() != self._owner:
                return False  # a forked child: the cluster is the parent's
            pending, self._pending = self._pending, None
            if pending is not None and self.cluster is None:
                try:
                    self.cluster = pending.result(timeout=60)
                except Exception:  # noqa: BLE001 - a start that failed is started again
                    pass
            cluster, client = self.cluster, self.client
            if cluster is None and client is None and not self.owned_pids():
                if self.profile_dir:  # left by a start that failed
                    shutil.rmtree(self.profile_dir, ignore_errors=True)
                    self.profile_dir = None
                return False
            self.cluster = self.client = None
            self.processes = 0
            self._on_stop(client)
            self._engines.drop(client)
            self._ledger.snapshot_descendants()
            if client is not None:
                try:
                    client.close(linger=0)
                except Exception:  # noqa: BLE001 - closing a client that may be gone
                    pass
            if cluster is not None:
                try:
                    # Engines first, while the controller can still take
                    # their goodbyes; then the controller and its schedulers.
                    run_on_loop(cluster.stop_engines(), timeout=20)
                except Exception as e:  # noqa: BLE001 - fall through to killing by pid
                    log.debug("stop_engines failed: %r", e)
                try:
                    run_on_loop(cluster.stop_controller(), timeout=20)
                except Exception as e:  # noqa: BLE001 - stopping what may be gone
                    log.debug("stop_controller failed: %r", e)
            self._ledger.kill_leftovers()
            if self.profile_dir:
                shutil.rmtree(self.profile_dir, ignore_errors=True)
                self.profile_dir = None
            return True

    def dead_engines(self, client) -> list[int]:
        """Ids of ``client``'s registered engines whose process is gone ([] for
        a client of another cluster).

        They are also unregistered at the controller, so that the tasks they
        held fail at once (``ipyparallel.error.EngineError``) instead of after
        the heartbeat timeout.  Instant: a pid check.
        """
        with self._lock:
            if client is None or client is not self.client:
                return []
            out = []
            for i in client.ids:
                info = self._engines.cached(client, i)
                if info and info["pid"] is not None and not self._ledger.alive(info["pid"]):
                    out.append(i)
            self._unregister(client, out)
            return out

    def signal_engines(self, client, sig: int, targets: list[int]) -> None:
        """Send ``sig`` to the engines ``targets`` of the managed ``client``, by pid."""
        info = {e["id"]: e for e in self._engines.engine_info(client)}
        for i in targets:
            pid = info.get(i, {}).get("pid")
            if pid is not None and pid in self._ledger:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass

    def kill_engine(self, engine_id: int) -> None:
        """SIGKILL one engine of the managed cluster (for fault-injection tests)."""
        with self._lock:
            client = self.client
            if client is None or engine_id not in client.ids:
                raise ValueError(f"engine {engine_id} is not an engine of the managed cluster")
            info = {e["id"]: e for e in self._engines.engine_info(client)}
            pid = info[engine_id]["pid"]
            if pid is None or pid not in self._ledger:
                raise ValueError(f"engine {engine_id} (pid {pid}) was not started by parloop")
            os.kill(pid, signal.SIGKILL)

    def owned_pids(self) -> list[int]:
        """Pids of the controller, engine and helper processes parloop started that are still running."""
        with self._lock:
            return self._ledger.live()

    def controller_alive(self) -> bool:
        cluster, client = self.cluster, self.client
        if cluster is None or client is None or getattr(client, "_closed", False):
            return False
        controller = cluster.controller
        return controller is not None and self._ledger.alive(controller.pid)

    # -- start, resize, replace -----------------------------------------------
    def _check_owner(self) -> None:
        if os.getpid() != self._owner:
            # forked child of the kernel: it must not drive the parent's cluster
            raise RuntimeError("parloop's cluster belongs to the process that started it")

    def _managed_client(self, n: int, timeout: float):
        deadline = time.monotonic() + timeout
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                self.cluster = pending.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                pending.cancel()
                raise RuntimeError(
                    f"parloop's local cluster did not start within {timeout} s"
                ) from None
            except Exception as e:
                self._ledger.kill_leftovers()
                raise RuntimeError(f"parloop could not start a local cluster: {e}") from e
            self.processes = self._pending_n
        if self.cluster is not None and self.client is None:
            try:  # started by prestart(): connect now
                self._connect(self.processes, deadline)
            except Exception:
                self.stop()
                raise
        if self.cluster is not None and (n != self.processes or not self._healthy()):
            if not self.controller_alive():
                log.info("the managed cluster's controller is gone: starting a new cluster")
                self.stop()
            else:
                try:  # another size, or lost engines: fix it in place
                    self._reconcile(n, deadline)
                except Exception as e:  # noqa: BLE001 - any failure: a new cluster instead
                    log.info("resizing the managed cluster failed (%r): starting a new one", e)
                    self.stop()
        if self.cluster is None:
            self._start(n, deadline)
        return self.client

    def _healthy(self) -> bool:
        cluster, client = self.cluster, self.client
        if cluster is None or client is None or getattr(client, "_closed", False):
            return False
        controller = cluster.controller
        if controller is None or not self._ledger.alive(controller.pid):
            return False
        pids = self._engine_pids()
        if len(pids) != self.processes or not all(self._ledger.alive(p) for p in pids):
            return False
        return len(client.ids) == self.processes

    def _engine_pids(self) -> list[int]:
        return [
            launcher.pid
            for es in list(self.cluster.engines.values())
            for launcher in list(es.launchers.values())
        ]

    def _start(self, n: int, deadline: float) -> None:
        timeout = max(1.0, deadline - time.monotonic())
        fut = asyncio.run_coroutine_threadsafe(self._astart(n), event_loop())
        try:
            self.cluster = fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            self._ledger.kill_leftovers()
            raise RuntimeError(
                f"parloop's local cluster did not start within {timeout:.0f} s"
            ) from None
        except Exception as e:
            self._ledger.kill_leftovers()
            raise RuntimeError(f"parloop could not start a local cluster: {e}") from e
        self.processes = n
        try:
            self._connect(n, deadline)
        except Exception:
            self.stop()
            raise

    async def _astart(self, n: int):
        """Start a controller and ``n`` engines (on parloop's event loop thread)."""
        import ipyparallel as ipp
        from traitlets.config import Config

        if self.profile_dir is None:
            # A private, empty profile: no ipcontroller/ipengine_config.py of the
            # user's default profile applies, nothing is left in ~/.ipython.
            self.profile_dir = tempfile.mkdtemp(prefix="parloop-cluster-")
        config = Config()
        config.LocalEngineSetLauncher.delay = 0.0
        config.LocalEngineSetLauncher.engine_args = ["--IPEngine.enable_nanny=False"]
        # PR_SET_PDEATHSIG fires when the *thread* that started the child ends:
        # these run on parloop's event loop thread, which lives as long as the kernel.
        config.LocalControllerLauncher.controller_cmd = launch_command("ipyparallel.controller")
        config.LocalEngineSetLauncher.engine_cmd = launch_command("ipyparallel.engine")
        cluster = ipp.Cluster(
            config=config,
            log=_ipp_log,
            profile_dir=self.profile_dir,
            load_profile=False,
            controller_ip="127.0.0.1",
            controller_args=[
                f"--HeartMonitor.period={HEARTBEAT_MS}",
                f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}",
            ],
            delay=0,
            n=n,
            shutdown_atexit=False,  # MANAGER.stop is registered with atexit instead
        )
        try:
            await cluster.start_controller()
            self._ledger.record(cluster.controller.pid)
            await cluster.start_engines(n)
        finally:
            for pid in self._launcher_pids(cluster):
                self._ledger.record(pid)
        return cluster

    @staticmethod
    def _launcher_pids(cluster) -> list[int]:
        pids = []
        if cluster.controller is not None and cluster.controller.pid > 0:
            pids.append(cluster.controller.pid)
        for es in list(cluster.engines.values()):
            pids.extend(
                launcher.pid for launcher in list(es.launchers.values()) if launcher.pid > 0
            )
        return pids

    def _connect(self, n: int, deadline: float) -> None:
        import ipyparallel as ipp

        cluster = self.cluster
        info = run_on_loop(
            cluster.controller.get_connection_info(), timeout=max(1.0, deadline - time.monotonic())
        )
        client = ipp.Client(
            info["client"],
            cluster=cluster,
            profile_dir=cluster.profile_dir,
            cluster_id=cluster.cluster_id,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        self.client = client
        self._wait_for(n, deadline)

    def _wait_for(self, n: int, deadline: float) -> None:
        client = self.client
        timeout = max(0.5, deadline - time.monotonic())
        try:
            client.wait_for_engines(n, timeout=timeout, interactive=False)
        except Exception as e:
            raise RuntimeError(
                f"parloop's local cluster: {len(client.ids)} of {n} engines registered "
                f"within {timeout:.0f} s ({e}).\n{self._logs()}"
            ) from e
        self._ledger.snapshot_descendants()
        # Learn every engine's pid while the engines are idle (kill_engine and
        # the progress view need it during a run, when engines do not answer).
        self._engines.engine_info(client)

    def _launchers(self) -> dict[int, Any]:
        """pid -> launcher of every engine process of the managed cluster still running."""
        out = {}
        for es in list(self.cluster.engines.values()):
            for launcher in list(es.launchers.values()):
                if self._ledger.alive(launcher.pid):
                    out[launcher.pid] = launcher
        return out

    def _reconcile(self, n: int, deadline: float) -> None:
        """Bring the managed cluster to exactly ``n`` live, registered engines.

        Dead engines are unregistered, extra ones stopped and unregistered
        (the newest first), missing ones started as a new engine set.
        """
        client = self.client
        self._engines.engine_info(client)
        info = {i: self._engines.cached(client, i) for i in client.ids}
        launchers = self._launchers()
        gone = {
            i for i, e in info.items() if e and e["pid"] is not None and e["pid"] not in launchers
        }
        extra = len(launchers) - n
        stop = []
        if extra > 0:
            by_pid = {e["pid"]: i for i, e in info.items() if e and i not in gone}
            # the newest engines go first
            for pid in sorted(launchers, key=lambda p: by_pid.get(p, 1 << 30), reverse=True)[
                :extra
            ]:
                stop.append(launchers[pid])
                if pid in by_pid:
                    gone.add(by_pid[pid])

        async def stop_some():
            await asyncio.gather(*(launcher.stop() for launcher in stop))
            # let the launchers' stop callbacks (scheduled on this loop by their
            # wait threads) remove them from their engine sets
            await asyncio.sleep(0.05)

        if stop:
            run_on_loop(stop_some(), timeout=max(1.0, deadline - time.monotonic()))
        self._unregister(client, gone)
        if extra < 0:
            run_on_loop(
                self.cluster.start_engines(-extra), timeout=max(1.0, deadline - time.monotonic())
            )
            for pid in self._launcher_pids(self.cluster):
                self._ledger.record(pid)
        self.processes = n
        limit = min(deadline, time.monotonic() + 20)
        while True:
            ids = set(client.ids)
            if len(ids) == n and not ids & gone:
                break
            if time.monotonic() > limit:
                raise RuntimeError(
                    f"engines {sorted(ids)} registered, expected {n} without {sorted(gone)}"
                )
            time.sleep(0.01)
        self._engines.drop(client, gone)
        self._ledger.snapshot_descendants()
        self._engines.engine_info(client)

    @staticmethod
    def _unregister(client, ids) -> None:
        """Tell the controller that engines are gone (what an engine's nanny would do).

        Without it the controller notices only after HEARTBEAT_MISSES missed
        beats; with it, tasks still assigned to those engines fail at once with
        ipyparallel's EngineError in the client.
        """
        for eid in ids:
            # The hub's query handler takes the same request an engine's nanny sends;
            # it sends no reply, so the returned future is left alone.
            client._send(client._query_stream, "unregistration_request", content={"id": eid})

    def _logs(self) -> str:
        out = []
        cluster = self.cluster
        if cluster is None:
            return ""
        try:
            if cluster.controller is not None:
                out.append("controller log:\n" + _tail(cluster.controller.get_output()))
            for es in cluster.engines.values():
                out.append(_tail(es.get_output(), 40))
        except Exception:  # noqa: BLE001 - a diagnostic must not fail
            pass
        return "\n".join(o for o in out if o.strip())
