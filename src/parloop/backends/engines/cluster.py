"""The ipyparallel clusters behind ``%%parallel`` (docs/design.md §7): one entry point.

One :class:`ClusterManager` (the module-level :data:`MANAGER`) gives the engines
backend a connected ``ipyparallel.Client`` and answers for whichever cluster it
gave last.  Behind it, one concern per module:

* :mod:`.managed` -- at most one *managed* local cluster, a controller plus
  ``processes`` engines that parloop started itself and keeps warm between
  cells: start, resize, health, stop, logs;
* :mod:`.external` -- clusters that somebody else started (``profile=`` /
  ``cluster_id=``): only connected to, never stopped;
* :mod:`.processes` -- the ledger of every process parloop started, so that
  none outlives the kernel (:meth:`ClusterManager.stop`, also registered with
  atexit, waits until they are gone; a killed kernel takes them along);
* :mod:`.engine_info` -- where each engine runs (host, pid), asked once;
* :mod:`parloop.aioloop` -- the event loop thread that ipyparallel's launcher
  coroutines run on, shared with ``%%threaded``'s asyncio tasks.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from typing import Any

from .engine_info import EngineInfoCache
from .external import ExternalClusters
from .managed import ManagedCluster
from .processes import ProcessLedger

__all__ = ["ClusterManager", "MANAGER"]


class ClusterManager:
    """Owns at most one managed local cluster (started by parloop); connects to external ones.

    All methods are thread-safe (one reentrant lock, shared with the managed
    and external parts).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._engines = EngineInfoCache()
        self._managed = ManagedCluster(
            self._lock, ProcessLedger(), self._engines, on_stop=self._forget
        )
        self._external = ExternalClusters(self._lock, self._engines)
        self._current: Any = None  # the client that client() returned last
        self._current_desc: dict[str, Any] = {}

    def client(
        self,
        processes: int | None = None,
        profile: str | None = None,
        cluster_id: str | None = None,
        timeout: float = 120,
    ):
        """A connected ``ipyparallel.Client``.

        Without ``profile``/``cluster_id``: the managed local cluster, started on
        first use and resized to exactly ``processes`` engines (default
        ``os.cpu_count()``); ``client.ids`` are then exactly the engines to use.
        With ``profile`` (a profile name or a profile directory) and/or
        ``cluster_id``: a cluster someone else started; waits until it has at
        least ``processes`` (default 1) engines.  Raises ``RuntimeError`` when
        the cluster cannot be started or reached within ``timeout`` seconds.
        """
        if processes is not None and (not isinstance(processes, int) or processes < 1):
            raise ValueError(f"processes must be a positive integer, not {processes!r}")
        if profile or cluster_id:
            client = self._external.client(processes, profile, cluster_id, timeout)
            with self._lock:
                self._current, self._current_desc = (
                    client,
                    {"managed": False, "profile": profile, "cluster_id": cluster_id},
                )
            return client
        n = processes or os.cpu_count() or 1
        with self._lock:
            client = self._managed.sized_client(n, timeout)
            self._current = client
            self._current_desc = {
                "managed": True,
                "profile": self._managed.profile_dir,
                "cluster_id": self._managed.cluster.cluster_id,
            }
            return client

    def prestart(self, processes: int | None = None) -> None:
        """Start the managed cluster in the background and return at once.

        A later :meth:`client` with the same ``processes`` then only waits for
        what is left of the start-up.  Does nothing if a managed cluster exists.
        """
        self._managed.prestart(processes or os.cpu_count() or 1)

    def engine_info(self, client) -> list[dict[str, Any]]:
        """One dict per registered engine of ``client``: ``{"id", "host", "pid", "local"}``
        (``local``: on the kernel's machine and network namespace).

        Asked once per engine and cached.  An engine that does not answer within
        5 s (busy, or dead but not yet unregistered) gets ``host``/``pid`` None.
        """
        return self._engines.engine_info(client)

    def status(self) -> dict[str, Any]:
        """What ``%parallel_status`` shows, for the cluster that :meth:`client` returned last.

        ``{"managed", "profile", "cluster_id", "engines": [{"id", "host", "pid", "busy"}],
        "processes"}``; ``busy`` is None when the controller does not answer.
        """
        with self._lock:
            client = self._current
            desc = dict(self._current_desc)
            controller_dead = (
                client is not None
                and client is self._managed.client
                and not self._managed.controller_alive()
            )
        if client is None or getattr(client, "_closed", False):
            return {
                "managed": False,
                "profile": None,
                "cluster_id": None,
                "engines": [],
                "processes": 0,
            }
        if controller_dead:
            desc.update(engines=[], processes=0)
            return desc
        engines = self.engine_info(client)
        queues = self._queue_status(client)
        for e in engines:
            q = queues.get(e["id"]) if queues is not None else None
            e["busy"] = None if q is None else bool(q.get("queue", 0) or q.get("tasks", 0))
        desc.update(engines=engines, processes=len(engines))
        return desc

    def stop(self) -> bool:
        """Stop the managed cluster (never an external one) and wait until its processes are gone.

        Returns True if something was stopped.  Idempotent; safe to call from atexit.
        """
        return self._managed.stop()

    def dead_engines(self, client) -> list[int]:
        """Ids of ``client``'s registered engines whose process is gone.

        They are also unregistered at the controller, so that the tasks they
        held fail at once (``ipyparallel.error.EngineError``) instead of after
        the heartbeat timeout.

        Instant for the managed cluster (a pid check); an external cluster's
        engines may live on other hosts, so this returns [] for them and the
        controller's heartbeat (ipyparallel's ``EngineError``) is the signal there.
        """
        return self._managed.dead_engines(client)

    def signal_engines(
        self, client, sig: int = signal.SIGINT, targets: list[int] | None = None
    ) -> None:
        """Send ``sig`` (default SIGINT: interrupt the running task) to engines.

        Managed engines get it directly by pid; an external cluster's engines
        through the controller (``Client.send_signal``, which needs their nanny).
        """
        targets = list(client.ids) if targets is None else list(targets)
        if client is self._managed.client:
            self._managed.signal_engines(client, sig, targets)
        else:
            client.send_signal(sig, targets=targets, block=False)

    def kill_engine(self, engine_id: int) -> None:
        """SIGKILL one engine of the managed cluster (for fault-injection tests)."""
        self._managed.kill_engine(engine_id)

    def owned_pids(self) -> list[int]:
        """Pids of the controller, engine and helper processes parloop started that are still running."""
        return self._managed.owned_pids()

    def _forget(self, client) -> None:
        """The managed cluster behind ``client`` stopped: it is no longer the current one."""
        if self._current is client:
            self._current, self._current_desc = None, {}

    @staticmethod
    def _queue_status(client, timeout: float = 2.0) -> dict | None:
        # Client.queue_status() waits for the controller without a timeout.
        result: list = []
        t = threading.Thread(target=lambda: result.append(client.queue_status()), daemon=True)
        t.start()
        t.join(timeout)
        return result[0] if result else None


MANAGER = ClusterManager()


def _stop_at_exit() -> None:
    try:
        MANAGER.stop()
    except Exception:  # noqa: BLE001 - never raise from atexit
        pass


atexit.register(_stop_at_exit)
