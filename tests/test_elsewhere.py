"""``%%parallel`` on engines and Dask workers that really are on another host.

The workers run in a network namespace of their own (tests/netns.py) with a
hostname of their own: the kernel's 127.0.0.1 is not theirs and
``/proc/self/ns/net`` differs, so parloop must take the ``tasks`` path (one
ipyparallel task per chunk through the controller) rather than its same-host
chunk channel.  The controller (or the Dask scheduler) runs in the kernel's
namespace, listening on the veth address only, as a head node would; the cell
reaches it as any external cluster: ``profile=<profile dir>`` or
``dask=tcp://ADDRESS``.

The faults are the ones a real cluster has: a worker killed, a worker hung
(SIGSTOP: alive to the OS, silent to the cluster), the network between the
hosts cut, and a cell started while a worker is hung.  Each cell must end with
the serial answer or a clear error within a bounded time, never hang.

ipyparallel engines run with their default nanny, as ``ipcluster`` starts
them: it relays parloop's interrupt (the kernel cannot signal a pid on another
host) and reports an engine's death at once.  Otherwise detection rests on the
controller's heartbeat, here ``HEARTBEAT_MS`` x ``HEARTBEAT_MISSES`` (5 s), the
settings of parloop's own clusters (ipyparallel's defaults make it 30 s).
Dask workers run under their nanny too (``dask worker``'s default).
"""

from __future__ import annotations

import _thread
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import netns
from helpers import (
    deep_diff,
    differential,
    materialize,
    reset,
    run_cell,
    run_cell_result,
    snapshot,
)

ipp = pytest.importorskip("ipyparallel")

_why = netns.unavailable()
if _why:
    pytest.skip(_why, allow_module_level=True)

import parloop  # noqa: E402
from parloop.backends.engines.managed import HEARTBEAT_MISSES, HEARTBEAT_MS  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(120)]

#: the controller's notice of a silent engine (heartbeat), in seconds
HEARTBEAT_S = HEARTBEAT_MS * HEARTBEAT_MISSES / 1000


# ---------------------------------------------------------------------------
# the other host: a namespace, a controller on the veth address, two engines
# ---------------------------------------------------------------------------
@dataclass
class Site:
    """A controller on the veth address and two engines in the namespace."""

    ns: netns.Netns
    profile_dir: Path
    hostname: str
    logs: Path
    monitor: Any  # an ipyparallel.Client of the test's own, to see the controller's view
    engines: dict[int, subprocess.Popen] = field(default_factory=dict)  # engine id -> process
    #: engine id -> time.monotonic() at which the controller unregistered it
    gone: dict[int, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    #: what the report says of the workers the cluster dropped
    dropped = "the controller unregistered engine"

    @property
    def magic(self) -> str:
        return f"%%parallel profile={self.profile_dir} progress=off"

    def log_tail(self) -> str:
        return _log_tail(self.logs)

    def busy(self, engines: list[int], abort: threading.Event) -> bool:
        """Wait until the controller has a task of this run on each of
        ``engines`` (so that a fault hits chunks in flight, however slow the
        start on a busy machine); False if the cell ended first or 30 s passed."""
        end = time.monotonic() + 30
        while not abort.is_set() and time.monotonic() < end:
            queues = self.monitor.queue_status()
            if all(queues.get(e, {}).get("queue", 0) > 0 for e in engines):
                return True
            abort.wait(0.05)
        return False


def _log_tail(logs: Path, lines: int = 15) -> str:
    """The end of the controller's and engines' logs, for a failure's message."""
    out = []
    for f in sorted(logs.glob("*.log")):
        text = f.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {f.name}\n" + "\n".join(text))
    return "\n".join(out)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        assert time.monotonic() < end, f"{what} did not write {path} within {timeout} s"
        time.sleep(0.02)


def _logged(start, log: Path, *args, **kwargs) -> subprocess.Popen:
    """``start(*args, **kwargs)`` (a Popen) with stdout and stderr to ``log``."""
    with log.open("w") as f:
        return start(*args, stdout=f, stderr=subprocess.STDOUT, **kwargs)


def _watch(site: Site, stop: threading.Event) -> None:
    """Record when the controller unregisters each engine (the client's
    ``ids`` follow the controller's notifications, on ipyparallel's own IO thread)."""
    known = set(site.monitor.ids)
    while not stop.wait(0.02):
        now = set(site.monitor.ids)
        for eid in known - now:
            site.gone.setdefault(eid, time.monotonic())
        known = now


def _forget_parloop_client(profile_dir: Path) -> None:
    """Close the client parloop keeps for this test's cluster.

    parloop keeps one client per external profile for the kernel's life and
    has no public way to drop one; every test here has a cluster of its own,
    so without this the session would pile up clients (and their sockets and
    threads) of controllers that are gone.
    """
    from parloop.backends.engines import backend
    from parloop.backends.engines.cluster import MANAGER

    with MANAGER._lock:
        entry = MANAGER._external._clients.pop((str(profile_dir), ""), None)
    if entry is None:
        return
    client = entry[0]
    state = backend.CLIENTS.pop(id(client), None)
    if state is not None:
        state.close()
    MANAGER._engines.drop(client)
    MANAGER._forget(client)
    if backend._last_client is client:
        backend._last_client = None
    client.close(linger=0)


@pytest.fixture
def site(tmp_path):
    """A namespace, a controller in ours listening on the veth address, and
    two engines inside the namespace, registered; all of it gone afterwards.

    One per test: the cases kill, stop and cut off engines.
    """
    t0 = time.perf_counter()
    ns = netns.Netns().create()
    logs = tmp_path / "logs"
    logs.mkdir()
    far = tmp_path / "far"  # the engines' working directory: not the kernel's
    (far / "profile").mkdir(parents=True)
    profile_dir = tmp_path / "profile_elsewhere"
    env = dict(os.environ, IPYTHONDIR=str(tmp_path / "ipython"))
    monitor = None
    stop = threading.Event()
    watcher = None
    try:
        controller = ns.adopt(
            _logged(
                subprocess.Popen,
                logs / "controller.log",
                [
                    sys.executable,
                    "-m",
                    "ipyparallel.controller",
                    f"--profile-dir={profile_dir}",
                    f"--ip={ns.host_addr}",
                    f"--HeartMonitor.period={HEARTBEAT_MS}",
                    f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}",
                ],
                env=env,
                start_new_session=True,
            )
        )
        security = profile_dir / "security"
        engine_json = security / "ipcontroller-engine.json"
        client_json = security / "ipcontroller-client.json"
        _wait_for(engine_json, controller, 60, "the controller")
        _wait_for(client_json, controller, 60, "the controller")
        t_controller = time.perf_counter()
        hostname = f"far-{ns.name[-8:]}"
        procs = [
            _logged(
                ns.popen,
                logs / f"engine-{k}.log",
                [
                    sys.executable,
                    "-m",
                    "ipyparallel.engine",
                    f"--file={engine_json}",
                    f"--profile-dir={far / 'profile'}",
                ],
                hostname=hostname,
                cwd=far,
                env=env,
            )
            for k in range(2)
        ]
        monitor = ipp.Client(str(client_json), profile_dir=str(profile_dir), timeout=30)
        end = time.monotonic() + 60
        while len(monitor.ids) < 2:
            dead = [p.returncode for p in procs if p.poll() is not None]
            assert not dead and time.monotonic() < end, (
                f"engines did not register (exit codes {dead})\n{_log_tail(logs)}"
            )
            time.sleep(0.02)
        pids = monitor[:].apply_sync(os.getpid)
        by_pid = {p.pid: p for p in procs}
        assert set(pids) == set(by_pid), (pids, list(by_pid))
        site = Site(ns, profile_dir, hostname, logs, monitor)
        site.engines = {eid: by_pid[pid] for eid, pid in zip(monitor.ids, pids)}
        site.timings = {
            "namespace": ns.setup_seconds,
            "controller": t_controller - t0 - ns.setup_seconds,
            "engines": time.perf_counter() - t_controller,
        }
        print(
            f"\nset-up: namespace {ns.setup_seconds * 1000:.0f} ms, controller "
            f"{site.timings['controller']:.2f} s, 2 engines registered {site.timings['engines']:.2f} s"
        )
        watcher = threading.Thread(target=_watch, args=(site, stop), daemon=True)
        watcher.start()
        yield site
    finally:
        try:
            stop.set()
            if watcher is not None:
                watcher.join(5)
            _forget_parloop_client(profile_dir)
            if monitor is not None:
                monitor.close(linger=0)
        finally:
            ns.close()
    assert (
        ns.name
        not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )


# ---------------------------------------------------------------------------
# the loop, its serial answer, a run with a fault injected mid-run
# ---------------------------------------------------------------------------
#: ``delay`` makes the iterations worth shipping (and the run long enough to
#: hit mid-way); it is not in the results, so the serial answer is computed
#: with ``delay = 0`` in a moment
SETUP = "import time\ndelay = {delay}\nresults = {{}}\ntotal = 0\n"
CELL = (
    "for i in range({n}):\n"
    "    time.sleep(delay)\n"
    "    total += i\n"
    "    results[i] = (i * i) % 7\n"
    "    if i % 20 == 0:\n"
    "        print('at', i)\n"
)
CHECKS = ["results", "total", "i"]


def _serial(ip, n: int):
    """The serial answer (snapshot of CHECKS, stdout) without the sleeps."""
    reset(ip)
    _, err = run_cell(ip, SETUP.format(delay=0))
    assert err is None, err
    out, err = run_cell(ip, CELL.format(n=n))
    assert err is None, err
    return snapshot(ip, CHECKS), out


@dataclass
class Run:
    """A cell run with a fault injected: its output, error, and timing."""

    out: str
    err: BaseException | None
    elapsed: float  # seconds the cell took
    fired: float  # time.monotonic() of the fault
    t0: float  # time.monotonic() of the cell's start

    @property
    def after_fault(self) -> float:
        """Seconds from the fault to the cell's end."""
        return self.elapsed - (self.fired - self.t0)


def _faulty_run(ip, site, n: int, fault, busy: list, options: str = "", after=0.5) -> Run:
    """Run the loop (``delay`` 0.05 s) on the site's workers with ``fault()``
    called ``after`` seconds once each worker of ``busy`` runs a chunk of it."""
    reset(ip)
    _, err = run_cell(ip, SETUP.format(delay=0.05))
    assert err is None, err
    fired: list[float] = []
    ended = threading.Event()

    def inject():
        if site.busy(busy, ended) and not ended.wait(after):
            fired.append(time.monotonic())
            fault()

    injector = threading.Thread(target=inject, daemon=True)
    t0 = time.monotonic()
    injector.start()
    out = ""
    try:
        try:
            out, res = run_cell_result(ip, f"{site.magic} {options}\n" + CELL.format(n=n))
            error = res.error_in_exec or res.error_before_exec
        except KeyboardInterrupt as e:  # should IPython let an interrupt through
            error = e
    finally:
        ended.set()
        injector.join(10)
    elapsed = time.monotonic() - t0
    assert fired, f"the fault was not injected mid-run (the cell took {elapsed:.2f} s)"
    return Run(out, error, elapsed, fired[0], t0)


def _assert_serial_answer(ip, expected, out: str) -> None:
    snap, s_out = expected
    got = materialize(snapshot(ip, CHECKS))
    for expr, (sk, sv), (mk, mv) in zip(CHECKS, materialize(snap), got):
        assert sk == mk == "value", (expr, sk, mk)
        d = deep_diff(sv, mv, expr)
        assert d is None, d
    assert out == s_out


def _assert_prefix(ip, n: int) -> int:
    """Whatever the run applied is a contiguous prefix of the serial answer."""
    results = ip.user_ns["results"]
    k = len(results)
    assert list(results) == list(range(k)), sorted(results)[:20]
    assert results == {i: (i * i) % 7 for i in range(k)}
    assert ip.user_ns["total"] == sum(range(k))
    assert k < n
    return k


def _next_cell(ip, site, n: int = 40) -> None:
    """The cluster is still usable after the fault: the next cell gives the serial answer."""
    expected = _serial(ip, n)
    reset(ip)
    run_cell(ip, SETUP.format(delay=0.01))
    t0 = time.monotonic()
    out, err = run_cell(ip, f"{site.magic}\n" + CELL.format(n=n))
    assert err is None, f"{type(err).__name__}: {err}\n{site.log_tail()}"
    _assert_serial_answer(ip, expected, out)
    print(f"next cell: {time.monotonic() - t0:.2f} s")


# ---------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------
def test_engines_elsewhere_use_tasks_and_give_the_serial_answer(ip, site):
    """Engines in another namespace cannot reach the kernel's 127.0.0.1: the
    ``tasks`` dispatch path, and the cell ends as it would serially."""
    t0 = time.monotonic()
    differential(
        ip,
        SETUP.format(delay=0.04),
        CELL.format(n=60),
        site.magic,
        CHECKS,
    )
    run = parloop.last_run
    print(f"serial + parallel run: {time.monotonic() - t0:.2f} s; parallel wall {run.wall:.2f} s")
    assert run.dispatch == "tasks", run.dispatch
    assert not run.native
    # both engines worked, and are named by the host they are on
    assert len(run.by_worker) == 2, run.by_worker
    assert all(site.hostname in name for name in run.by_worker), list(run.by_worker)
    assert all(w.done > 0 for w in run.by_worker.values()), run.by_worker

    out, err = run_cell(ip, "%parallel_status")
    assert err is None, err
    print(out)
    assert "external cluster" in out and "2 engine(s)" in out, out
    for eid, proc in site.engines.items():
        assert f"engine {eid}: host {site.hostname}, pid {proc.pid}" in out, out


def test_interrupt_stops_remote_engines(ip, site):
    """The kernel interrupt reaches engines on another host (through the
    controller and their nanny): the committed prefix is applied and the
    cell ends within a few seconds; the engines are free for the next cell."""
    n = 200  # 10 s of sleeps: 5 s on 2 engines
    # 2 s into the engines' chunks: a first chunk has come back by then (at
    # 1 s a busy CI machine once had none: "interrupted after 0 of 200")
    run = _faulty_run(ip, site, n, _thread.interrupt_main, list(site.engines), after=2.0)
    err = run.err
    print(f"\ninterrupt: the cell ended {run.after_fault:.2f} s after it: {err}")
    assert isinstance(err, KeyboardInterrupt), repr(err)
    assert parloop.last_run.interrupted
    assert run.after_fault < 3.5, run.after_fault
    k = _assert_prefix(ip, n)
    assert 0 < k, k
    assert ip.user_ns["i"] == k - 1
    assert f"after {k} of {n}" in str(err), str(err)
    # both engines were interrupted (not left running their chunks): the next
    # cell runs at once on both
    t1 = time.monotonic()
    _next_cell(ip, site)
    assert time.monotonic() - t1 < 15
    assert len(parloop.last_run.by_worker) == 2, parloop.last_run.by_worker


def _report(what: str, site, run: Run) -> None:
    """One line for the log: how long the cell took, when the cluster
    dropped the worker, what the cell ended with."""
    noticed = ", ".join(f"{w} after {t - run.fired:.2f} s" for w, t in sorted(site.gone.items()))
    err = f"{type(run.err).__name__}: {run.err}" if run.err else None
    notes = parloop.last_run.notes if parloop.last_run else None
    print(
        f"\n{what}: the cell took {run.elapsed:.2f} s, ended {run.after_fault:.2f} s after "
        f"the fault; {site.dropped} {noticed or '-'}; error: {err}; notes: {notes}"
    )


def _assert_names_the_lost(err: BaseException, k: int, n: int) -> None:
    """The WorkerLostError's note: iterations 0..k-1 applied, nothing from k on."""
    notes = "".join(getattr(err, "__notes__", ()))
    said = (
        f"iterations 0..{k - 1} of {n} were applied; from iteration {k} on, nothing was"
        if k
        else f"no iteration of {n} was applied"
    )
    assert said in notes, f"{err!s} / notes: {notes!r}"


def _first_lost(err: BaseException) -> int:
    """The iteration a WorkerLostError names ("... running iterations from N ...")."""
    m = re.search(r"iterations from (\d+)", str(err))
    assert m, f"{err!s}: names no iteration"
    return int(m.group(1))


def _process_tree(pid: int) -> list[int]:
    import psutil

    return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]


@pytest.mark.parametrize(
    "what",
    [
        "engine",  # the nanny, alive on the engine's host, tells the controller at once
        "engine+nanny",  # nothing left there to tell: the controller's heartbeat notices
    ],
)
def test_sigkill_of_a_remote_engine(ip, site, what):
    """An engine killed mid-run: the controller drops it, the lost chunks
    are re-run on the other engine (retries=1), the serial answer."""
    n = 160
    expected = _serial(ip, n)
    victim = min(site.engines)
    proc = site.engines[victim]
    tree = _process_tree(proc.pid) if what == "engine+nanny" else [proc.pid]
    assert len(tree) == (2 if what == "engine+nanny" else 1), tree

    def kill():
        for pid in tree:
            os.kill(pid, signal.SIGKILL)

    run = _faulty_run(ip, site, n, kill, [victim])
    _report(f"SIGKILL {what}", site, run)
    assert run.err is None, f"{type(run.err).__name__}: {run.err}\n{site.log_tail()}"
    _assert_serial_answer(ip, expected, run.out)
    assert proc.poll() is not None
    bound = 2.0 if what == "engine" else HEARTBEAT_S + 3
    assert victim in site.gone and site.gone[victim] - run.fired < bound, site.gone
    notes = " | ".join(parloop.last_run.notes)
    assert f"engine {victim} was lost during the run" in notes, notes
    assert "re-run on another engine" in notes, notes
    assert run.after_fault < bound + 10, run.after_fault
    _next_cell(ip, site)


def test_sigkill_without_retries(ip, site):
    """retries=0: a killed engine ends the cell with parloop.WorkerLostError
    naming where the lost iterations start; what was applied is a prefix
    before it."""
    n = 160
    victim = min(site.engines)
    proc = site.engines[victim]
    run = _faulty_run(
        ip, site, n, lambda: os.kill(proc.pid, signal.SIGKILL), [victim], options="retries=0"
    )
    _report("SIGKILL, retries=0", site, run)
    assert isinstance(run.err, parloop.WorkerLostError), f"{type(run.err).__name__}: {run.err}"
    assert run.after_fault < 8, run.after_fault
    k = _assert_prefix(ip, n)
    print(f"applied: iterations 0..{k - 1}")
    assert _first_lost(run.err) >= k
    _assert_names_the_lost(run.err, k, n)


def test_hung_remote_engine(ip, site):
    """An engine stopped mid-run (SIGSTOP: its process is there, it answers
    nothing): the controller's heartbeat drops it after HEARTBEAT_S, its
    chunks are re-run on the other engine, the serial answer."""
    n = 160
    expected = _serial(ip, n)
    victim = min(site.engines)
    proc = site.engines[victim]
    # it stays stopped: the site's teardown sends CONT and TERM
    run = _faulty_run(ip, site, n, lambda: os.kill(proc.pid, signal.SIGSTOP), [victim])
    _report("SIGSTOP", site, run)
    assert run.err is None, f"{type(run.err).__name__}: {run.err}\n{site.log_tail()}"
    _assert_serial_answer(ip, expected, run.out)
    assert victim in site.gone, site.gone
    assert site.gone[victim] - run.fired < HEARTBEAT_S + 3, site.gone[victim] - run.fired
    notes = " | ".join(parloop.last_run.notes)
    assert f"engine {victim} was lost during the run" in notes, notes
    assert run.after_fault < HEARTBEAT_S + 13, run.after_fault
    _next_cell(ip, site)


def _watched_cell(ip, code: str, limit: float):
    """Run ``code``; interrupt it (as a user would) if it has not ended after
    ``limit`` seconds.  Returns (stdout, error, seconds, whether it had to be interrupted)."""
    timer = threading.Timer(limit, _thread.interrupt_main)
    t0 = time.monotonic()
    timer.start()
    out = ""
    try:
        try:
            out, res = run_cell_result(ip, code)
            err = res.error_in_exec or res.error_before_exec
        except KeyboardInterrupt as e:
            err = e
    finally:
        timer.cancel()
        timer.join()
    elapsed = time.monotonic() - t0
    return out, err, elapsed, elapsed >= limit


def _warm_up(ip, site) -> None:
    """One cell on the site, so that the next is not parloop's first contact
    with these workers (what it asks them once, it does not ask again)."""
    reset(ip)
    run_cell(ip, SETUP.format(delay=0.01))
    _, err = run_cell(ip, f"{site.magic}\n" + CELL.format(n=8))
    assert err is None, f"{type(err).__name__}: {err}"


@pytest.mark.parametrize("first", [True, False], ids=["first-cell", "later-cell"])
def test_cell_started_while_an_engine_hangs(ip, site, first):
    """A cell started while an engine is hung but still registered (the
    controller has not missed enough heartbeats yet): the inputs' broadcast
    cannot reach it.  The cell must still end, once the heartbeat drops it,
    with the serial answer or a clear error."""
    n = 80
    expected = _serial(ip, n)
    if not first:
        _warm_up(ip, site)
    reset(ip)
    run_cell(ip, SETUP.format(delay=0.02))
    victim = min(site.engines)
    stopped = time.monotonic()
    os.kill(site.engines[victim].pid, signal.SIGSTOP)
    limit = HEARTBEAT_S + 20
    out, err, elapsed, interrupted = _watched_cell(ip, f"{site.magic}\n" + CELL.format(n=n), limit)
    end = time.monotonic() + 2  # the test's own client hears of it a moment later
    while victim not in site.gone and time.monotonic() < end:
        time.sleep(0.02)
    noticed = site.gone.get(victim)
    print(
        f"\ncell started with engine {victim} stopped: ended after {elapsed:.2f} s"
        + (" (interrupted by the test)" if interrupted else "")
        + "; the controller dropped it after "
        + (f"{noticed - stopped:.2f} s" if noticed else "-")
        + f"; error: {type(err).__name__ + ': ' + str(err) if err else None}"
    )
    assert not interrupted, f"the cell hung: interrupted after {limit} s"
    assert elapsed < HEARTBEAT_S + 5, elapsed
    if err is not None:
        _assert_prefix(ip, n)
        # an engine lost during the inputs' broadcast is dropped (before it
        # could be addressed, ipyparallel said IndexError: No such engine)
        assert isinstance(err, parloop.WorkerLostError), f"{type(err).__name__}: {err}"
    else:
        _assert_serial_answer(ip, expected, out)


def test_network_partition(ip, site):
    """The link to the engines' host cut mid-run: the controller's heartbeat
    drops both engines after HEARTBEAT_S; with no engine left the cell ends
    with parloop.WorkerLostError, the iterations before the lost ones applied."""
    n = 160
    run = _faulty_run(ip, site, n, lambda: site.ns.link(False), list(site.engines))
    _report("partition", site, run)
    assert isinstance(run.err, parloop.WorkerLostError), f"{type(run.err).__name__}: {run.err}"
    assert set(site.gone) == set(site.engines), site.gone
    assert max(site.gone.values()) - run.fired < HEARTBEAT_S + 3
    assert run.after_fault < HEARTBEAT_S + 8, run.after_fault
    k = _assert_prefix(ip, n)
    print(f"applied: iterations 0..{k - 1}")
    # the error names where the lost iterations start: its note says what was
    # applied and from which iteration on nothing was (as an interrupt does)
    _assert_names_the_lost(run.err, k, n)


# ---------------------------------------------------------------------------
# Dask: a scheduler on the veth address, two workers (with nannies) elsewhere
# ---------------------------------------------------------------------------
@dataclass
class DaskSite:
    """A ``distributed`` scheduler on the veth address and two workers in the namespace.

    The workers run under Dask's default nanny, as ``dask worker`` starts
    them: a killed worker is restarted (with a new address and none of
    parloop's inputs), which is the case parloop's Dask backend has to handle.
    """

    ns: netns.Netns
    address: str  # tcp://veth address:port
    hostname: str
    logs: Path
    monitor: Any  # a distributed.Client of the test's own
    nannies: list[subprocess.Popen] = field(default_factory=list)
    #: worker address -> pid of its worker process (a child of its nanny)
    workers: dict[str, int] = field(default_factory=dict)
    #: worker address -> time.monotonic() at which the scheduler removed it
    gone: dict[str, float] = field(default_factory=dict)

    dropped = "the scheduler removed worker"

    @property
    def magic(self) -> str:
        return f"%%parallel dask={self.address} progress=off"

    def log_tail(self) -> str:
        return _log_tail(self.logs)

    def busy(self, workers: list[str], abort: threading.Event) -> bool:
        """Wait until each of ``workers`` runs a chunk of parloop's (False:
        the cell ended first, or 30 s passed)."""
        end = time.monotonic() + 30
        while not abort.is_set() and time.monotonic() < end:
            processing = self.monitor.processing()
            if all(
                any(str(k).startswith("parloop-chunk-") for k in processing.get(w, ()))
                for w in workers
            ):
                return True
            abort.wait(0.05)
        return False


def _scheduler_workers(dask_scheduler=None) -> list[str]:
    """Runs on the scheduler: the addresses of its workers."""
    return list(dask_scheduler.workers)


# travels by value: the scheduler cannot import the tests
_scheduler_workers.__module__ = "__main__"


def _watch_dask(site: DaskSite, stop: threading.Event) -> None:
    """Record when the scheduler removes each worker."""
    known = set(site.workers)
    while not stop.wait(0.1):
        try:
            now = set(site.monitor.run_on_scheduler(_scheduler_workers))
        except Exception:  # noqa: BLE001 - the scheduler going away at the end
            return
        for w in known - now:
            site.gone.setdefault(w, time.monotonic())
        known = now


def _forget_dask_client(address: str) -> None:
    """Close the connection parloop keeps to this test's scheduler (kept per
    address for the kernel's life: without this, one per test piles up)."""
    from parloop.backends.dask import DaskBackend

    client = DaskBackend._connected.pop(address, None)
    if client is not None:
        DaskBackend._states.pop(id(client), None)
        client.close(timeout=10)


@pytest.fixture
def dask_site(tmp_path):
    """A scheduler in our namespace on the veth address, two ``dask worker``
    processes (nthreads 1, with a nanny) inside the namespace; all gone afterwards."""
    distributed = pytest.importorskip("distributed")
    t0 = time.perf_counter()
    ns = netns.Netns().create()
    logs = tmp_path / "logs"
    logs.mkdir()
    far = tmp_path / "far"
    far.mkdir()
    scheduler_file = tmp_path / "scheduler.json"
    env = dict(os.environ, DASK_DISTRIBUTED__LOGGING__DISTRIBUTED="info")
    monitor = None
    stop = threading.Event()
    watcher = None
    address = ""
    try:
        scheduler = ns.adopt(
            _logged(
                subprocess.Popen,
                logs / "scheduler.log",
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_scheduler",
                    f"--host={ns.host_addr}",
                    "--port=0",
                    "--no-dashboard",
                    f"--scheduler-file={scheduler_file}",
                ],
                env=env,
                cwd=tmp_path,
                start_new_session=True,
            )
        )
        _wait_for(scheduler_file, scheduler, 60, "the Dask scheduler")
        t_scheduler = time.perf_counter()
        monitor = distributed.Client(
            scheduler_file=str(scheduler_file), set_as_default=False, timeout=30
        )
        address = monitor.scheduler.address
        hostname = f"far-{ns.name[-8:]}"
        nannies = [
            _logged(
                ns.popen,
                logs / f"worker-{k}.log",
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    f"--host={ns.ns_addr}",
                    "--nthreads=1",
                    "--nworkers=1",
                    "--no-dashboard",
                    f"--name=far-{k}",
                    f"--local-directory={far}",
                    "--death-timeout=60",
                ],
                hostname=hostname,
                cwd=far,
                env=env,
            )
            for k in range(2)
        ]
        end = time.monotonic() + 60
        while len(monitor.run_on_scheduler(_scheduler_workers)) < 2:
            dead = [p.returncode for p in nannies if p.poll() is not None]
            assert not dead and time.monotonic() < end, (
                f"Dask workers did not register (exit codes {dead})\n{_log_tail(logs)}"
            )
            time.sleep(0.05)
        site = DaskSite(ns, address, hostname, logs, monitor, nannies)
        site.workers = monitor.run(os.getpid)
        print(
            f"\nset-up: namespace {ns.setup_seconds * 1000:.0f} ms, scheduler "
            f"{t_scheduler - t0 - ns.setup_seconds:.2f} s, 2 workers registered "
            f"{time.perf_counter() - t_scheduler:.2f} s"
        )
        watcher = threading.Thread(target=_watch_dask, args=(site, stop), daemon=True)
        watcher.start()
        yield site
    finally:
        try:
            stop.set()
            if watcher is not None:
                watcher.join(5)
            if address:
                _forget_dask_client(address)
            if monitor is not None:
                monitor.close(timeout=10)
        finally:
            ns.close()


def test_dask_workers_elsewhere_give_the_serial_answer(ip, dask_site):
    """Dask workers in another namespace: chunks as Dask tasks, the cell
    ends as it would serially, the workers named by their own hostname."""
    site = dask_site
    differential(ip, SETUP.format(delay=0.04), CELL.format(n=60), site.magic, CHECKS)
    run = parloop.last_run
    print(f"\ndask: parallel wall {run.wall:.2f} s; workers {list(run.by_worker)}")
    assert run.dispatch == "dask tasks", run.dispatch
    assert not run.native
    assert len(run.by_worker) == 2, run.by_worker
    assert all(site.hostname in name for name in run.by_worker), list(run.by_worker)
    out, err = run_cell(ip, "%parallel_status")
    assert err is None, err
    print(out)
    assert f"scheduler {site.address}" in out, out
    for address in site.workers:
        assert f"worker {address}: host {site.ns.ns_addr}" in out, out


def test_dask_interrupt(ip, dask_site):
    """The kernel interrupt stops the tasks running on the remote workers:
    the committed prefix is applied, the cell ends within a few seconds, the
    workers take the next cell."""
    site = dask_site
    n = 200
    # 2 s: the first chunks (a quarter of each worker's share, 1.25 s) are
    # done.  The running ones' partial work is not applied (unlike on
    # ipyparallel): DaskBackend.interrupt cancels their futures before it
    # stops them, so their halted results are never read.
    run = _faulty_run(ip, site, n, _thread.interrupt_main, list(site.workers), after=2.0)
    print(f"\ndask interrupt: the cell ended {run.after_fault:.2f} s after it: {run.err}")
    assert isinstance(run.err, KeyboardInterrupt), repr(run.err)
    assert run.after_fault < 3.5, run.after_fault
    k = _assert_prefix(ip, n)
    assert 0 < k and ip.user_ns["i"] == k - 1, k
    assert f"after {k} of {n}" in str(run.err), str(run.err)
    _next_cell(ip, site)


def test_dask_sigkill_of_a_remote_worker(ip, dask_site):
    """A worker process killed mid-run: the scheduler sees its connection
    drop and runs its tasks elsewhere; the nanny starts a new worker without
    parloop's inputs.  The serial answer."""
    site = dask_site
    n = 160
    expected = _serial(ip, n)
    victim = min(site.workers)
    pid = site.workers[victim]
    run = _faulty_run(ip, site, n, lambda: os.kill(pid, signal.SIGKILL), [victim])
    _report("dask SIGKILL", site, run)
    assert run.err is None, f"{type(run.err).__name__}: {run.err}\n{site.log_tail()}"
    _assert_serial_answer(ip, expected, run.out)
    assert victim in site.gone and site.gone[victim] - run.fired < 3, site.gone
    assert run.after_fault < 20, run.after_fault
    _next_cell(ip, site)


def test_dask_hung_remote_worker(ip, dask_site):
    """A worker process stopped mid-run: its connection stays open, so the
    scheduler keeps it (``worker-ttl`` is 5 minutes; here it was still listed
    after 9); parloop gives it up after DaskBackend.SILENT_SECONDS of silence
    and runs its chunks on the other."""
    from parloop.backends.dask import DaskBackend

    site = dask_site
    n = 160
    expected = _serial(ip, n)
    victim = min(site.workers)
    pid = site.workers[victim]
    run = _faulty_run(ip, site, n, lambda: os.kill(pid, signal.SIGSTOP), [victim])
    _report("dask SIGSTOP", site, run)
    assert run.err is None, f"{type(run.err).__name__}: {run.err}\n{site.log_tail()}"
    _assert_serial_answer(ip, expected, run.out)
    assert run.after_fault < DaskBackend.SILENT_SECONDS + 15, run.after_fault
    notes = " | ".join(parloop.last_run.notes)
    assert "silent" in notes, notes


def test_dask_network_partition(ip, dask_site):
    """The link to the workers' host cut mid-run: no worker is left; the cell
    ends with parloop.WorkerLostError naming where the lost iterations start,
    within a bounded time."""
    from parloop.backends.dask import DaskBackend

    site = dask_site
    n = 160
    run = _faulty_run(ip, site, n, lambda: site.ns.link(False), list(site.workers))
    _report("dask partition", site, run)
    assert isinstance(run.err, parloop.WorkerLostError), f"{type(run.err).__name__}: {run.err}"
    assert run.after_fault < DaskBackend.SILENT_SECONDS + 15, run.after_fault
    k = _assert_prefix(ip, n)
    print(f"applied: iterations 0..{k - 1}")
    assert _first_lost(run.err) >= k
    _assert_names_the_lost(run.err, k, n)


@pytest.mark.parametrize("first", [True, False], ids=["first-cell", "later-cell"])
def test_dask_cell_started_while_a_worker_hangs(ip, dask_site, first):
    """A cell started while a worker is hung: the scheduler still lists it
    (its connection is open), so parloop asks it too.  The cell must still
    end, with the serial answer or a clear error.  (The test interrupts it,
    as a user would, after SILENT_SECONDS + 20 s.)"""
    from parloop.backends.dask import DaskBackend

    site = dask_site
    n = 80
    expected = _serial(ip, n)
    if not first:
        _warm_up(ip, site)
    reset(ip)
    run_cell(ip, SETUP.format(delay=0.02))
    victim = min(site.workers)
    os.kill(site.workers[victim], signal.SIGSTOP)
    limit = DaskBackend.SILENT_SECONDS + 20
    out, err, elapsed, interrupted = _watched_cell(ip, f"{site.magic}\n" + CELL.format(n=n), limit)
    print(
        f"\ndask cell started with a worker stopped: ended after {elapsed:.2f} s"
        + (" (interrupted by the test)" if interrupted else "")
        + f"; error: {type(err).__name__ + ': ' + str(err) if err else None}"
    )
    assert not interrupted, f"the cell hung: interrupted after {limit} s"
    if err is not None:
        assert isinstance(err, parloop.WorkerLostError), f"{type(err).__name__}: {err}"
        _assert_prefix(ip, n)
    else:
        _assert_serial_answer(ip, expected, out)
