"""The ipyparallel clusters behind ``%%parallel`` (docs/design.md §7).

One :class:`ClusterManager` (the module-level :data:`MANAGER`) owns at most one
*managed* local cluster -- a controller plus ``processes`` engines that parloop
started itself -- and keeps it warm between cells.  Clusters that somebody else
started (``profile=`` / ``cluster_id=``) are only connected to, never stopped.

Engines are subprocesses of the kernel running ``python -m ipyparallel.engine``
with the kernel's own interpreter (``sys.executable``) in the kernel's working
directory.  They are not forked from the kernel and nothing in them depends on
the kernel's ``__main__``: code and data travel by value (``parloop.backends.engines.transport``).
The controller listens on 127.0.0.1 only, and its files live in a private
profile directory (removed by :meth:`ClusterManager.stop`), so neither the
user's default profile configuration nor ``~/.ipython`` is involved.

No orphans: :meth:`ClusterManager.stop` (also registered with atexit) waits until
every process it started has exited, killing stragglers by pid.  Every process
is started through a small ``python -c`` wrapper that sets Linux's
``PR_SET_PDEATHSIG`` before exec-ing ``python -m ipyparallel.…`` (~20 ms): if the
kernel is killed or crashes, so that atexit never runs, the controller and the
engines get SIGTERM and exit.

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
  otherwise: a dead engine is seen at once by :meth:`ClusterManager.dead_engines`
  (its pid) and by the controller after ``HEARTBEAT_MISSES`` beats (5 s);
  signals go straight to the engine's pid (:meth:`ClusterManager.signal_engines`).
* Tried and not worth it: ``--usethreads`` for the controller's schedulers,
  starting engines before the controller (``send_engines_connection_env=False``),
  a lower engine log level.
* Warm reuse (same ``processes``) is ~0.3 ms: a pid check of the processes.
  Growing adds an engine set (~1 s); shrinking stops the newest engines (~0.3 s);
  both keep the other engines warm.
* :meth:`ClusterManager.prestart` starts the cluster in the background (e.g. at
  ``%load_ext``), so that the first cell only waits for what is left.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from .worker import _whoami

__all__ = ["ClusterManager", "MANAGER"]

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


# ---------------------------------------------------------------------------
# process helpers (psutil is a dependency of ipyparallel, so it is always there)
# ---------------------------------------------------------------------------
def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def _alive(pid: int, ctime: float | None = None) -> bool:
    """Is ``pid`` a running (not zombie) process, and the one created at ``ctime``?"""
    import psutil

    try:
        p = psutil.Process(pid)
        if ctime is not None and abs(p.create_time() - ctime) > 0.01:
            return False  # the pid was reused by an unrelated process
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return False


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except (psutil.Error, OSError):
        return []


def _reap(pid: int) -> None:
    """Collect the exit status of a child of ours, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


# The command that starts the controller and every engine: `python -m MODULE ARGS`,
# after asking Linux to SIGTERM the process when the kernel dies (prctl
# PR_SET_PDEATHSIG, kept across exec).  A kernel that is killed, crashes or runs
# out of memory -- so that atexit never runs -- then leaves no cluster behind:
# on SIGTERM the controller stops its scheduler processes and engines exit.
_EXEC_WATCHING_PARENT = """\
import os, signal, sys
if sys.platform.startswith("linux"):
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except Exception:
        pass
    if os.getppid() != int(sys.argv[1]):
        sys.exit("parloop: the kernel exited while its cluster was starting")
os.execv(sys.executable, [sys.executable, "-m", *sys.argv[2:]])
"""


def _command(module: str) -> list[str]:
    return [sys.executable, "-c", _EXEC_WATCHING_PARENT, str(os.getpid()), module]


_HERE = _whoami()[2]


def _tail(text: str, lines: int = 15) -> str:
    return "".join(text.splitlines(True)[-lines:])


class ClusterManager:
    """Owns at most one managed local cluster (started by parloop); connects to external ones.

    All methods are thread-safe.  ipyparallel's asynchronous launcher API runs on
    a private event loop thread, so the manager works the same inside a kernel
    (whose main thread already runs an asyncio loop) and outside one.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner = os.getpid()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # the managed cluster
        self._cluster: Any = None  # ipyparallel.Cluster
        self._client: Any = None  # ipyparallel.Client connected to it
        self._processes = 0
        self._profile_dir: str | None = None
        self._pending: concurrent.futures.Future | None = None  # prestart()
        self._pending_n = 0
        # every process a managed cluster started: pid -> create time.  Own lock:
        # the loop thread records pids while the caller holds self._lock.
        self._procs: dict[int, float | None] = {}
        self._procs_lock = threading.Lock()
        # external clusters: (profile or profile dir, cluster_id) -> (client, url file, mtime)
        self._external: dict[tuple[str, str], tuple[Any, str, float]] = {}
        self._current: Any = None  # the client that client() returned last
        self._current_desc: dict[str, Any] = {}
        # (id(client), engine id) -> {"id", "host", "pid"}
        self._info: dict[tuple[int, int], dict[str, Any]] = {}

    # -- public API -----------------------------------------------------------
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
            return self._external_client(processes, profile, cluster_id, timeout)
        n = processes or os.cpu_count() or 1
        with self._lock:
            self._check_owner()
            client = self._managed_client(n, timeout)
            self._current = client
            self._current_desc = {
                "managed": True,
                "profile": self._profile_dir,
                "cluster_id": self._cluster.cluster_id,
            }
            return client

    def prestart(self, processes: int | None = None) -> None:
        """Start the managed cluster in the background and return at once.

        A later :meth:`client` with the same ``processes`` then only waits for
        what is left of the start-up.  Does nothing if a managed cluster exists.
        """
        n = processes or os.cpu_count() or 1
        with self._lock:
            self._check_owner()
            if self._cluster is not None or self._pending is not None:
                return
            self._pending_n = n
            self._pending = asyncio.run_coroutine_threadsafe(self._astart(n), self._ensure_loop())

    def engine_info(self, client) -> list[dict[str, Any]]:
        """One dict per registered engine of ``client``: ``{"id", "host", "pid", "local"}``
        (``local``: on the kernel's machine and network namespace).

        Asked once per engine and cached.  An engine that does not answer within
        5 s (busy, or dead but not yet unregistered) gets ``host``/``pid`` None.
        """
        ids = list(client.ids)
        missing = [i for i in ids if (id(client), i) not in self._info]
        if missing:
            pending = {i: client[i].apply_async(_whoami) for i in missing}
            deadline = time.monotonic() + 5.0
            for i, ar in pending.items():
                try:
                    host, pid, place = ar.get(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - an engine that does not answer
                    continue  # not cached: asked again next time
                self._info[(id(client), i)] = {
                    "id": i,
                    "host": host,
                    "pid": pid,
                    "local": place == _HERE,
                }
        return [
            dict(
                self._info.get(
                    (id(client), i), {"id": i, "host": None, "pid": None, "local": False}
                )
            )
            for i in ids
        ]

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
                and client is self._client
                and not _alive(
                    self._cluster.controller.pid, self._procs.get(self._cluster.controller.pid)
                )
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
        with self._lock:
            if os.getpid() != self._owner:
                return False  # a forked child: the cluster is the parent's
            pending, self._pending = self._pending, None
            if pending is not None and self._cluster is None:
                try:
                    self._cluster = pending.result(timeout=60)
                except Exception:  # noqa: BLE001 - a start that failed is started again
                    pass
            cluster, client = self._cluster, self._client
            if cluster is None and client is None and not self.owned_pids():
                if self._profile_dir:  # left by a start that failed
                    shutil.rmtree(self._profile_dir, ignore_errors=True)
                    self._profile_dir = None
                return False
            self._cluster = self._client = None
            self._processes = 0
            if self._current is client:
                self._current, self._current_desc = None, {}
            self._drop_info(client)
            self._snapshot_descendants()
            if client is not None:
                try:
                    client.close(linger=0)
                except Exception:  # noqa: BLE001 - closing a client that may be gone
                    pass
            if cluster is not None:
                try:
                    # Engines first, while the controller can still take
                    # their goodbyes; then the controller and its schedulers.
                    self._run(cluster.stop_engines(), timeout=20)
                except Exception as e:  # noqa: BLE001 - fall through to killing by pid
                    log.debug("stop_engines failed: %r", e)
                try:
                    self._run(cluster.stop_controller(), timeout=20)
                except Exception as e:  # noqa: BLE001 - stopping what may be gone
                    log.debug("stop_controller failed: %r", e)
            self._kill_leftovers()
            if self._profile_dir:
                shutil.rmtree(self._profile_dir, ignore_errors=True)
                self._profile_dir = None
            return True

    def dead_engines(self, client) -> list[int]:
        """Ids of ``client``'s registered engines whose process is gone.

        They are also unregistered at the controller, so that the tasks they
        held fail at once (``ipyparallel.error.EngineError``) instead of after
        the heartbeat timeout.

        Instant for the managed cluster (a pid check); an external cluster's
        engines may live on other hosts, so this returns [] for them and the
        controller's heartbeat (ipyparallel's ``EngineError``) is the signal there.
        """
        with self._lock:
            if client is None or client is not self._client:
                return []
            out = []
            for i in client.ids:
                info = self._info.get((id(client), i))
                if (
                    info
                    and info["pid"] is not None
                    and not _alive(info["pid"], self._procs.get(info["pid"]))
                ):
                    out.append(i)
            self._unregister(client, out)
            return out

    def signal_engines(
        self, client, sig: int = signal.SIGINT, targets: list[int] | None = None
    ) -> None:
        """Send ``sig`` (default SIGINT: interrupt the running task) to engines.

        Managed engines get it directly by pid; an external cluster's engines
        through the controller (``Client.send_signal``, which needs their nanny).
        """
        targets = list(client.ids) if targets is None else list(targets)
        if client is self._client:
            info = {e["id"]: e for e in self.engine_info(client)}
            for i in targets:
                pid = info.get(i, {}).get("pid")
                if pid is not None and pid in self._procs:
                    try:
                        os.kill(pid, sig)
                    except OSError:
                        pass
        else:
            client.send_signal(sig, targets=targets, block=False)

    def kill_engine(self, engine_id: int) -> None:
        """SIGKILL one engine of the managed cluster (for fault-injection tests)."""
        with self._lock:
            client = self._client
            if client is None or engine_id not in client.ids:
                raise ValueError(f"engine {engine_id} is not an engine of the managed cluster")
            info = {e["id"]: e for e in self.engine_info(client)}
            pid = info[engine_id]["pid"]
            if pid is None or pid not in self._procs:
                raise ValueError(f"engine {engine_id} (pid {pid}) was not started by parloop")
            os.kill(pid, signal.SIGKILL)

    def owned_pids(self) -> list[int]:
        """Pids of the controller, engine and helper processes parloop started that are still running."""
        with self._lock:
            self._snapshot_descendants()
            return sorted(p for p, ct in self._recorded() if _alive(p, ct))

    # -- the managed cluster --------------------------------------------------
    def _check_owner(self) -> None:
        if os.getpid() != self._owner:
            # forked child of the kernel: it must not drive the parent's cluster
            raise RuntimeError("parloop's cluster belongs to the process that started it")

    def _managed_client(self, n: int, timeout: float):
        deadline = time.monotonic() + timeout
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                self._cluster = pending.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                pending.cancel()
                raise RuntimeError(
                    f"parloop's local cluster did not start within {timeout} s"
                ) from None
            except Exception as e:
                self._kill_leftovers()
                raise RuntimeError(f"parloop could not start a local cluster: {e}") from e
            self._processes = self._pending_n
        if self._cluster is not None and self._client is None:
            try:  # started by prestart(): connect now
                self._connect(self._processes, deadline)
            except Exception:
                self.stop()
                raise
        if self._cluster is not None and (n != self._processes or not self._managed_healthy()):
            if not self._controller_alive():
                log.info("the managed cluster's controller is gone: starting a new cluster")
                self.stop()
            else:
                try:  # another size, or lost engines: fix it in place
                    self._reconcile(n, deadline)
                except Exception as e:  # noqa: BLE001 - any failure: a new cluster instead
                    log.info("resizing the managed cluster failed (%r): starting a new one", e)
                    self.stop()
        if self._cluster is None:
            self._start(n, deadline)
        return self._client

    def _controller_alive(self) -> bool:
        cluster, client = self._cluster, self._client
        if cluster is None or client is None or getattr(client, "_closed", False):
            return False
        controller = cluster.controller
        return controller is not None and _alive(controller.pid, self._procs.get(controller.pid))

    def _managed_healthy(self) -> bool:
        cluster, client = self._cluster, self._client
        if cluster is None or client is None or getattr(client, "_closed", False):
            return False
        controller = cluster.controller
        if controller is None or not _alive(controller.pid, self._procs.get(controller.pid)):
            return False
        pids = self._engine_pids()
        if len(pids) != self._processes or not all(_alive(p, self._procs.get(p)) for p in pids):
            return False
        return len(client.ids) == self._processes

    def _engine_pids(self) -> list[int]:
        return [
            launcher.pid
            for es in list(self._cluster.engines.values())
            for launcher in list(es.launchers.values())
        ]

    def _start(self, n: int, deadline: float) -> None:
        timeout = max(1.0, deadline - time.monotonic())
        fut = asyncio.run_coroutine_threadsafe(self._astart(n), self._ensure_loop())
        try:
            self._cluster = fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            self._kill_leftovers()
            raise RuntimeError(
                f"parloop's local cluster did not start within {timeout:.0f} s"
            ) from None
        except Exception as e:
            self._kill_leftovers()
            raise RuntimeError(f"parloop could not start a local cluster: {e}") from e
        self._processes = n
        try:
            self._connect(n, deadline)
        except Exception:
            self.stop()
            raise

    async def _astart(self, n: int):
        """Start a controller and ``n`` engines (on the manager's loop thread)."""
        import ipyparallel as ipp
        from traitlets.config import Config

        if self._profile_dir is None:
            # A private, empty profile: no ipcontroller/ipengine_config.py of the
            # user's default profile applies, nothing is left in ~/.ipython.
            self._profile_dir = tempfile.mkdtemp(prefix="parloop-cluster-")
        config = Config()
        config.LocalEngineSetLauncher.delay = 0.0
        config.LocalEngineSetLauncher.engine_args = ["--IPEngine.enable_nanny=False"]
        # PR_SET_PDEATHSIG fires when the *thread* that started the child ends:
        # these run on the manager's loop thread, which lives as long as the kernel.
        config.LocalControllerLauncher.controller_cmd = _command("ipyparallel.controller")
        config.LocalEngineSetLauncher.engine_cmd = _command("ipyparallel.engine")
        cluster = ipp.Cluster(
            config=config,
            log=_ipp_log,
            profile_dir=self._profile_dir,
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
            self._record(cluster.controller.pid)
            await cluster.start_engines(n)
        finally:
            for pid in self._launcher_pids(cluster):
                self._record(pid)
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

    def _record(self, pid: int) -> None:
        if pid and pid > 0 and pid not in self._procs:
            ct = _create_time(pid)
            with self._procs_lock:
                self._procs.setdefault(pid, ct)

    def _recorded(self) -> list[tuple[int, float | None]]:
        with self._procs_lock:
            return list(self._procs.items())

    def _snapshot_descendants(self) -> None:
        """Add children of our processes (controller schedulers, engine nannies) to the record."""
        for pid, ct in self._recorded():
            if _alive(pid, ct):
                for child in _descendants(pid):
                    self._record(child)

    def _connect(self, n: int, deadline: float) -> None:
        import ipyparallel as ipp

        cluster = self._cluster
        info = self._run(
            cluster.controller.get_connection_info(), timeout=max(1.0, deadline - time.monotonic())
        )
        client = ipp.Client(
            info["client"],
            cluster=cluster,
            profile_dir=cluster.profile_dir,
            cluster_id=cluster.cluster_id,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        self._client = client
        self._wait_for(n, deadline)

    def _wait_for(self, n: int, deadline: float) -> None:
        client = self._client
        timeout = max(0.5, deadline - time.monotonic())
        try:
            client.wait_for_engines(n, timeout=timeout, interactive=False)
        except Exception as e:
            raise RuntimeError(
                f"parloop's local cluster: {len(client.ids)} of {n} engines registered "
                f"within {timeout:.0f} s ({e}).\n{self._logs()}"
            ) from e
        self._snapshot_descendants()
        # Learn every engine's pid while the engines are idle (kill_engine and
        # the progress view need it during a run, when engines do not answer).
        self.engine_info(client)

    def _launchers(self) -> dict[int, Any]:
        """pid -> launcher of every engine process of the managed cluster still running."""
        out = {}
        for es in list(self._cluster.engines.values()):
            for launcher in list(es.launchers.values()):
                if _alive(launcher.pid, self._procs.get(launcher.pid)):
                    out[launcher.pid] = launcher
        return out

    def _reconcile(self, n: int, deadline: float) -> None:
        """Bring the managed cluster to exactly ``n`` live, registered engines.

        Dead engines are unregistered, extra ones stopped and unregistered
        (the newest first), missing ones started as a new engine set.
        """
        client = self._client
        self.engine_info(client)
        info = {i: self._info.get((id(client), i)) for i in client.ids}
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
            self._run(stop_some(), timeout=max(1.0, deadline - time.monotonic()))
        self._unregister(client, gone)
        if extra < 0:
            self._run(
                self._cluster.start_engines(-extra), timeout=max(1.0, deadline - time.monotonic())
            )
            for pid in self._launcher_pids(self._cluster):
                self._record(pid)
        self._processes = n
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
        self._drop_info(client, gone)
        self._snapshot_descendants()
        self.engine_info(client)

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
        cluster = self._cluster
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

    def _kill_leftovers(self, grace: float = 10.0) -> None:
        """Wait for every recorded process to exit; SIGKILL what is left after ``grace`` s."""
        self._snapshot_descendants()
        end = time.monotonic() + grace
        for sig in (None, signal.SIGKILL):
            if sig is not None:
                for pid, ct in self._recorded():
                    if _alive(pid, ct):
                        log.warning("parloop: killing leftover process %d", pid)
                        try:
                            os.kill(pid, sig)
                        except OSError:
                            pass
                end = time.monotonic() + 5
            while True:
                for pid, _ in self._recorded():
                    _reap(pid)
                left = [p for p, ct in self._recorded() if _alive(p, ct)]
                if not left or time.monotonic() > end:
                    break
                time.sleep(0.02)
            if not left:
                break
        with self._procs_lock:
            self._procs = {p: ct for p, ct in self._procs.items() if _alive(p, ct)}

    def _drop_info(self, client, ids=None) -> None:
        if client is not None:
            for k in [k for k in self._info if k[0] == id(client) and (ids is None or k[1] in ids)]:
                del self._info[k]

    # -- external clusters ----------------------------------------------------
    def _external_client(self, processes, profile, cluster_id, timeout):
        import ipyparallel as ipp
        from IPython.paths import get_ipython_dir

        if profile and (os.sep in profile or os.path.isdir(profile)):
            profile_dir = os.path.abspath(os.path.expanduser(profile))
        else:
            profile_dir = os.path.join(get_ipython_dir(), f"profile_{profile or 'default'}")
        name = f"profile={profile or 'default'!r}" + (
            f", cluster_id={cluster_id!r}" if cluster_id else ""
        )
        client_json = (
            f"ipcontroller-{cluster_id}-client.json" if cluster_id else "ipcontroller-client.json"
        )
        url_file = os.path.join(profile_dir, "security", client_json)
        key = (profile_dir, cluster_id or "")
        deadline = time.monotonic() + timeout
        with self._lock:
            cached = self._external.get(key)
            if cached is not None:
                client, old_file, mtime = cached
                if not getattr(client, "_closed", False) and _mtime(url_file) == mtime:
                    try:
                        client.wait_for_engines(
                            processes or 1, timeout=max(0.5, timeout), interactive=False
                        )
                    except Exception as e:
                        raise RuntimeError(
                            f"the ipyparallel cluster ({name}) has {len(client.ids)} engines: {e}"
                        ) from e
                    self._current, self._current_desc = (
                        client,
                        {"managed": False, "profile": profile, "cluster_id": cluster_id},
                    )
                    return client
                self._drop_info(client)
                try:
                    client.close(linger=0)
                except Exception:  # noqa: BLE001 - closing a client that may be gone
                    pass
                del self._external[key]
        # Wait for the connection file ourselves: ipyparallel.Client would print
        # "Waiting for connection file" into the cell's output.
        while not os.path.exists(url_file):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no ipyparallel cluster found for {name}: {url_file} does not exist. "
                    f"Start one (e.g. `ipcluster start --profile={profile or 'default'}"
                    + (f" --cluster-id={cluster_id}" if cluster_id else "")
                    + "`) or leave out profile/cluster_id to use a local cluster."
                )
            time.sleep(0.1)
        mtime = _mtime(url_file)
        try:
            client = ipp.Client(
                url_file,
                profile_dir=profile_dir,
                cluster_id=cluster_id or None,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        except Exception as e:
            raise RuntimeError(f"cannot connect to the ipyparallel cluster ({name}): {e}") from e
        want = processes or 1
        try:
            client.wait_for_engines(
                want, timeout=max(0.5, deadline - time.monotonic()), interactive=False
            )
        except Exception as e:
            n = len(client.ids)
            client.close(linger=0)
            raise RuntimeError(
                f"the ipyparallel cluster ({name}) has {n} engines registered; "
                f"{want} did not come up within {timeout} s ({e})"
            ) from e
        with self._lock:
            self._external[key] = (client, url_file, mtime)
            self._current, self._current_desc = (
                client,
                {"managed": False, "profile": profile, "cluster_id": cluster_id},
            )
        return client

    @staticmethod
    def _queue_status(client, timeout: float = 2.0) -> dict | None:
        # Client.queue_status() waits for the controller without a timeout.
        result: list = []
        t = threading.Thread(target=lambda: result.append(client.queue_status()), daemon=True)
        t.start()
        t.join(timeout)
        return result[0] if result else None

    # -- the private event loop -------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def main():
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(
                    target=main, name="parloop-cluster-loop", daemon=True
                )
                self._thread.start()
                ready.wait(5)
                self._loop = loop
            return self._loop

    def _run(self, coro, timeout: float | None = None):
        fut = asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"timed out after {timeout} s") from None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


MANAGER = ClusterManager()


def _stop_at_exit() -> None:
    try:
        MANAGER.stop()
    except Exception:  # noqa: BLE001 - never raise from atexit
        pass


atexit.register(_stop_at_exit)
