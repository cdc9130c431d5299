"""``%%parallel`` on engines that really are on another host.

The engines run in a network namespace of their own (tests/netns.py) with a
hostname of their own: the kernel's 127.0.0.1 is not theirs and
``/proc/self/ns/net`` differs, so parloop must take the ``tasks`` path (one
ipyparallel task per chunk through the controller) rather than its same-host
chunk channel.  The controller runs in the kernel's namespace, listening on
the veth address only, as a head node would; the cell reaches it through
``profile=<profile dir>`` like any external cluster.

The faults are the ones a real cluster has: an engine killed, an engine hung
(SIGSTOP: alive to the OS, silent to the controller), the network between the
hosts cut.  Each cell must end with the serial answer or a clear error within
a bounded time, never hang.  The engines run with ipyparallel's default
nanny, as ``ipcluster`` starts them: it relays parloop's interrupt (the kernel
cannot signal a pid on another host) and reports an engine's death at once.
Detection otherwise rests on the controller's heartbeat: ``HEARTBEAT_MS`` x
``HEARTBEAT_MISSES`` (5 s), the settings parloop's own clusters use.
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

    @property
    def magic(self) -> str:
        return f"%%parallel profile={self.profile_dir} progress=off"

    def log_tail(self) -> str:
        return _log_tail(self.logs)


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


def _when_busy(site: Site, engines: list[int], abort: threading.Event) -> bool:
    """Wait until the controller has a task of this run on each of ``engines``
    (so that a fault hits chunks in flight, however slow the start on a busy
    machine); False if the cell ended first or 30 s passed."""
    end = time.monotonic() + 30
    while not abort.is_set() and time.monotonic() < end:
        queues = site.monitor.queue_status()
        if all(queues.get(e, {}).get("queue", 0) > 0 for e in engines):
            return True
        abort.wait(0.05)
    return False


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


def _faulty_run(ip, site: Site, n: int, fault, busy: list[int], options: str = "", after=0.5):
    """Run the loop (``delay`` 0.05 s) on the site's engines with ``fault()``
    called ``after`` seconds once each engine of ``busy`` runs a chunk of it."""
    reset(ip)
    _, err = run_cell(ip, SETUP.format(delay=0.05))
    assert err is None, err
    fired: list[float] = []
    ended = threading.Event()

    def inject():
        if _when_busy(site, busy, ended) and not ended.wait(after):
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


def _other_engine_answers(ip, site: Site, n: int = 40) -> None:
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
    run = _faulty_run(ip, site, n, _thread.interrupt_main, list(site.engines), after=1.0)
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
    _other_engine_answers(ip, site)
    assert time.monotonic() - t1 < 15
    assert len(parloop.last_run.by_worker) == 2, parloop.last_run.by_worker


def _report(what: str, site: Site, run: Run) -> None:
    """One line for the log: how long the cell took, when the controller
    noticed, what the cell ended with."""
    noticed = ", ".join(
        f"engine {e} after {t - run.fired:.2f} s" for e, t in sorted(site.gone.items())
    )
    err = f"{type(run.err).__name__}: {run.err}" if run.err else None
    notes = parloop.last_run.notes if parloop.last_run else None
    print(
        f"\n{what}: the cell took {run.elapsed:.2f} s, ended {run.after_fault:.2f} s after "
        f"the fault; the controller unregistered {noticed or 'nothing'}; error: {err}; "
        f"notes: {notes}"
    )


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
    assert f"engine {victim} died during the run" in notes, notes
    assert "re-run on another engine" in notes, notes
    assert run.after_fault < bound + 10, run.after_fault
    _other_engine_answers(ip, site)


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
    assert f"engine {victim} died during the run" in notes, notes
    assert run.after_fault < HEARTBEAT_S + 13, run.after_fault
    _other_engine_answers(ip, site)


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
    # The error should name where the lost iterations start.  It does when an
    # engine's lost chunk is retried on the other before that one's loss is
    # seen ("the engine running iterations from N died and the retries are
    # used up"); when both losses are seen first, the retry finds no engine
    # and the error is EngineBackend._pick_engine's, which names none (about
    # half the runs: both engines are dropped at the same heartbeat).
    if "no engine is left" in str(run.err):
        pytest.xfail(
            "parloop: after a partition the WorkerLostError can name no lost "
            f"iteration ({run.err}); iterations 0..{k - 1} were applied"
        )
    assert _first_lost(run.err) >= k
