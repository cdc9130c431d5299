"""``%%parallel`` on real ipyparallel engines (docs/design.md §3, §4, §7; issue 4):
faults (killed engines, interrupt, timeout), never-stale inputs, no orphan
processes, external clusters, the decorator, the status.  Serial equivalence
cell by cell is test_differential.py's table, run under both magics."""

from __future__ import annotations

import _thread
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytest.importorskip("ipyparallel")

import parloop  # noqa: E402
from helpers import (  # noqa: E402
    alive,
    differential,
    reset,
    run_cell,
    run_cell_result,
    run_live_mid_chunk,
    stop_processes,
    wait_gone,
)
from parloop.backends.engines.cluster import MANAGER  # noqa: E402

#: every test here runs on engines (the ``cluster`` fixture is conftest.py's)
pytestmark = pytest.mark.cluster

P2 = "%%parallel processes=2 progress=off"


def ok(ip, code):
    out, err = run_cell(ip, code)
    assert err is None, f"{type(err).__name__}: {err}"
    return out


def _next_parallel_cell_works(ip):
    ok(ip, P2 + "\nafter = {}\nfor j in range(20):\n    after[j] = -j\n")
    assert ip.user_ns["after"] == {j: -j for j in range(20)}
    assert ip.user_ns["j"] == 19
    assert len(MANAGER.client(processes=2).ids) == 2


def _timed_run(ip, cell, actions, watchdog=30.0):
    """Run ``cell`` while Timers fire ``actions`` [(delay, fn, args)]; a watchdog
    interrupts the cell after ``watchdog`` s so that a hang fails the test
    instead of blocking it.  Returns (stdout, exception, seconds, watchdog fired,
    exceptions raised by the actions)."""
    action_errors: list[BaseException] = []
    fired = threading.Event()

    def guarded(fn, args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001
            action_errors.append(e)

    def dog():
        fired.set()
        _thread.interrupt_main()

    timers = [threading.Timer(d, guarded, [fn, args]) for d, fn, args in actions]
    timers.append(threading.Timer(watchdog, dog))
    t0 = time.monotonic()
    for t in timers:
        t.start()
    try:
        try:
            out, res = run_cell_result(ip, cell)
            err = res.error_before_exec or res.error_in_exec
        except KeyboardInterrupt as e:
            out, err = "", e
        elapsed = time.monotonic() - t0
    finally:
        for t in timers:
            t.cancel()
        for t in timers:
            t.join()
    return out, err, elapsed, fired.is_set(), action_errors


def _prefix_kept_and_next_cell_works(ip):
    """After a run that lost its engines: the applied iterations are a
    contiguous prefix of `out[i] = i * i` over 40, the loop variable the last
    of them, and the next %%parallel cell works."""
    k = _contiguous_prefix(ip.user_ns["out"], lambda i: i * i, 40)
    if k:
        assert ip.user_ns["i"] == k - 1
    _next_parallel_cell_works(ip)


def _contiguous_prefix(results, expect, total):
    k = len(results)
    assert list(results) == list(range(k)), sorted(results)[:20]
    assert results == {i: expect(i) for i in range(k)}
    assert k < total
    return k


@pytest.mark.timeout(120)
def test_seed_same_numbers_as_threaded(ip, cluster):
    cell = (
        "vals = {}\nfor i in range(20):\n    vals[i] = (random.random(), float(np.random.rand()))\n"
    )
    got = {}
    for magic in ("%%threaded threads=2 seed=3 progress=off", P2 + " seed=3"):
        reset(ip)
        ok(ip, "import random\nimport numpy as np")
        ok(ip, magic + "\n" + cell)
        got[magic] = ip.user_ns["vals"]
    a, b = got.values()
    assert a == b and len(a) == 20 and len(set(a.values())) == 20


@pytest.fixture(params=["channel", "tasks"])
def dispatch(request, monkeypatch):
    """Both ways chunks reach engines: the channel (engines on the kernel's
    host) and one ipyparallel task per chunk (engines elsewhere)."""
    from parloop.backends.engines import EngineBackend

    monkeypatch.setattr(EngineBackend, "use_channel", request.param == "channel")
    return request.param


@pytest.mark.timeout(120)
def test_dispatch_paths_same_results(ip, cluster, dispatch):
    differential(
        ip,
        "results = {}\nacc = []",
        "for i in range(50):\n    results[i] = i * i\n    acc.append(-i)\n    print(i)",
        P2 + " chunksize=3",
        ["results", "acc", "i"],
    )
    assert parloop.last_run.dispatch == dispatch
    assert len(parloop.last_run.chunks) == 17


# ----------------------------------------------------------------- 2-4. engines killed
def _killing_run(ip, options: str, victims: list[int], **kw):
    """40 × 0.1 s iterations on the 2 engines, ``victims`` killed after a
    second; returns what _timed_run does."""
    reset(ip)
    ok(ip, "import time\nout = {}")
    return _timed_run(
        ip,
        P2 + options + "\nfor i in range(40):\n    time.sleep(0.1)\n    out[i] = i * i\n",
        [(1.0, MANAGER.kill_engine, [e]) for e in victims],
        **kw,
    )


@pytest.mark.timeout(120)
def test_engine_killed_mid_run(ip, cluster, dispatch):
    victim = MANAGER.client(processes=2).ids[0]
    out, err, elapsed, fired, errs = _killing_run(ip, "", [victim])
    assert errs == [] and not fired
    assert err is None, f"{type(err).__name__}: {err}"
    assert ip.user_ns["out"] == {i: i * i for i in range(40)}
    assert ip.user_ns["i"] == 39
    run = parloop.last_run
    assert run.done == 40
    assert any("died" in n for n in run.notes), run.notes
    assert any(c.retried for c in run.chunks), run.chunks
    _next_parallel_cell_works(ip)
    assert victim not in MANAGER.client(processes=2).ids
    assert run.dispatch == dispatch


@pytest.mark.timeout(120)
def test_engine_killed_no_retries(ip, cluster, dispatch):
    victim = MANAGER.client(processes=2).ids[0]
    out, err, elapsed, fired, errs = _killing_run(ip, " retries=0", [victim])
    assert errs == [] and not fired
    assert isinstance(err, parloop.WorkerLostError) or "died" in str(err), repr(err)
    _prefix_kept_and_next_cell_works(ip)


@pytest.mark.timeout(120)
def test_all_engines_killed(ip, cluster):
    ids = list(MANAGER.client(processes=2).ids)
    out, err, elapsed, fired, errs = _killing_run(ip, "", ids, watchdog=20.0)
    assert errs == []
    assert not fired, f"the run hung after all engines died (stopped by the watchdog: {err!r})"
    assert err is not None and not isinstance(err, KeyboardInterrupt), repr(err)
    assert isinstance(err, parloop.WorkerLostError) or "died" in str(err), repr(err)
    _prefix_kept_and_next_cell_works(ip)


# ----------------------------------------------------------------- 5. interrupt
@pytest.mark.timeout(120)
def test_interrupt(ip, cluster, dispatch):
    reset(ip)
    ok(ip, "import time\nresults = {}")
    MANAGER.client(processes=2)  # warm: the interrupt must hit the running loop
    out, err, elapsed, fired, errs = _timed_run(
        ip,
        P2 + "\nfor i in range(200):\n    time.sleep(0.05)\n    results[i] = i * 2\n",
        [(1.0, _thread.interrupt_main, [])],
    )
    assert not fired
    assert isinstance(err, KeyboardInterrupt), repr(err)
    assert elapsed < 1.0 + 2.5, elapsed  # 200 * 0.05 / 2 = 5 s uninterrupted
    k = _contiguous_prefix(ip.user_ns["results"], lambda i: i * 2, 200)
    assert k > 0
    assert ip.user_ns["i"] == k - 1
    assert parloop.last_run.interrupted and parloop.last_run.dispatch == dispatch
    _next_parallel_cell_works(ip)


# ----------------------------------------------------------------- 6. never stale
@pytest.mark.timeout(120)
def test_stale_global_function(ip, cluster):
    reset(ip)
    ok(ip, "THRESHOLD = 10\ndef classify(x):\n    return x > THRESHOLD\nres = {}")
    cell = P2 + "\nfor i in range(40):\n    res[i] = classify(i)\n"
    ok(ip, cell)
    assert ip.user_ns["res"] == {i: i > 10 for i in range(40)}
    ok(ip, "THRESHOLD = 25")
    ok(ip, cell)
    assert ip.user_ns["res"] == {i: i > 25 for i in range(40)}


@pytest.fixture
def broadcasts(monkeypatch):
    """Records ``Transport.last`` after every real broadcast (a spy: the
    broadcast itself is unchanged).  The backend and its Transport are not
    kept anywhere after a run, so this is the way to see them."""
    from parloop.backends.engines.transport import Transport

    seen = []
    real = Transport.broadcast

    def spy(self, values, targets, **kw):
        keys = real(self, values, targets, **kw)
        seen.append((self, self.last))
        return keys

    monkeypatch.setattr(Transport, "broadcast", spy)
    return seen


@pytest.mark.timeout(120)
def test_big_array_changed_in_place_is_seen(ip, cluster, broadcasts):
    reset(ip)
    ok(ip, "import numpy as np\nbig = np.zeros(5_000_000)\nout = {}")  # 40 MB
    cell = P2 + "\nfor i in range(8):\n    out[i] = float(big[0]) + float(big[-1]) + i\n"
    ok(ip, cell)
    assert ip.user_ns["out"] == {i: float(i) for i in range(8)}
    first = broadcasts[-1][1]
    # once: into one shared-memory segment (engines on this host), or once per engine
    assert first.shm_bytes >= 40_000_000 or first.bytes >= 2 * 40_000_000, first
    ok(ip, "big[0] = 99")
    ok(ip, cell)
    assert ip.user_ns["out"] == {i: 99.0 + i for i in range(8)}
    ok(ip, "big[-1] = 1")
    ok(ip, cell)
    assert ip.user_ns["out"] == {i: 100.0 + i for i in range(8)}


@pytest.mark.timeout(120)
def test_unchanged_big_array_not_resent(ip, cluster, broadcasts):
    reset(ip)
    ok(ip, "import numpy as np\nbig = np.ones(5_000_000)\nout = {}")  # 40 MB
    cell = P2 + "\nfor i in range(8):\n    out[i] = float(big[i]) + i\n"
    ok(ip, cell)
    first = broadcasts[-1][1]
    assert first.shm_bytes >= 40_000_000 or first.bytes >= 2 * 40_000_000, first
    ok(ip, cell)
    assert ip.user_ns["out"] == {i: 1.0 + i for i in range(8)}
    second = broadcasts[-1][1]
    assert second.bytes < 1_000_000 and second.shm_bytes == 0, second
    assert second.values_cached >= 2, second


# ----------------------------------------------------------------- 9. timeout
@pytest.mark.timeout(120)
def test_timeout_names_iteration(ip, cluster):
    reset(ip)
    ok(ip, "import time\nres = {}")
    t0 = time.monotonic()
    _, err = run_cell(
        ip,
        P2 + " timeout=0.5\nfor i in range(6):\n"
        "    if i == 3:\n        time.sleep(3)\n    res[i] = i * 10\n",
    )
    assert err is not None
    notes = " ".join(getattr(err, "__notes__", []))
    assert "iteration 3" in notes and "i=3" in notes, (repr(err), notes)
    assert ip.user_ns["res"] == {0: 0, 1: 10, 2: 20}
    assert time.monotonic() - t0 < 3.0
    _next_parallel_cell_works(ip)


# ----------------------------------------------------------------- 10. unserialisable
@pytest.mark.timeout(120)
def test_unserialisable_input_reported_before_anything_runs(ip, cluster):
    reset(ip)
    ok(ip, "import threading\nlock = threading.Lock()\nres = {}")
    cell = "started = True\nfor i in range(6):\n    with lock:\n        res[i] = i\n"
    _, err = run_cell(ip, P2 + "\n" + cell)
    assert isinstance(err, parloop.LoopAnalysisError), repr(err)
    assert "'lock'" in str(err) and "%%threaded" in str(err), str(err)
    assert ip.user_ns["res"] == {}
    assert "i" not in ip.user_ns
    assert "started" not in ip.user_ns, "the prologue ran before the input check"


@pytest.mark.timeout(120)
def test_unserialisable_input_runs_under_threaded(ip):
    reset(ip)
    ok(ip, "import threading\nlock = threading.Lock()\nres = {}")
    ok(
        ip,
        "%%threaded threads=2 progress=off\nstarted = True\nfor i in range(6):\n"
        "    with lock:\n        res[i] = i\n",
    )
    assert ip.user_ns["res"] == {i: i for i in range(6)}
    assert ip.user_ns["started"] is True


# ----------------------------------------------------------------- 11. decorator
def _import_temp_module(tmp_path, monkeypatch, name, source):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module(name)


@pytest.mark.timeout(120)
def test_parallel_decorator(cluster, tmp_path, monkeypatch):
    mod = _import_temp_module(
        tmp_path,
        monkeypatch,
        "ploop_mod_a",
        """
        import parloop

        def plain(n, k):
            out = {}
            total = 0
            for i in range(n):
                out[i] = i * i - k * i
                total += i
            return out, total

        @parloop.parallel(processes=2, progress="off")
        def par(n, k):
            out = {}
            total = 0
            for i in range(n):
                out[i] = i * i - k * i
                total += i
            return out, total
    """,
    )
    try:
        assert mod.par(30, 3) == mod.plain(30, 3)
        assert parloop.last_run.backend == "engines" and parloop.last_run.done == 30
    finally:
        sys.modules.pop("ploop_mod_a", None)


@pytest.mark.timeout(120)
def test_parallel_decorator_module_helper(cluster, tmp_path, monkeypatch):
    """The helpers of a module that engines cannot import (it is only on the
    kernel's sys.path) travel by value."""
    mod = _import_temp_module(
        tmp_path,
        monkeypatch,
        "ploop_mod_b",
        """
        import parloop

        def score(x):
            return x * x - 3 * x

        def plain(n):
            out = {}
            for i in range(n):
                out[i] = score(i)
            return out

        @parloop.parallel(processes=2, progress="off")
        def par(n):
            out = {}
            for i in range(n):
                out[i] = score(i)
            return out
    """,
    )
    try:
        assert mod.par(30) == mod.plain(30)
    finally:
        sys.modules.pop("ploop_mod_b", None)


# ----------------------------------------------------------------- 12. status
@pytest.mark.timeout(120)
def test_status_names_engines_hosts_pids_and_last_run(ip, cluster):
    reset(ip)
    ok(ip, P2 + "\nres = {}\nfor i in range(10):\n    res[i] = i\n")
    out = ok(ip, "%parallel_status")
    info = MANAGER.engine_info(MANAGER.client(processes=2))
    assert len(info) == 2
    for e in info:
        assert f"engine {e['id']}" in out, out
        assert str(e["host"]) in out and str(e["pid"]) in out, out
    assert "managed" in out
    assert "last run:" in out and "10/10" in out, out


# ----------------------------------------------------------------- 8. external cluster
class External:
    """A controller and engines started by hand (as in tests/test_cluster.py),
    as `ipcluster` or a batch system would; stopped by pid only."""

    def __init__(self, profile_dir):
        self.profile_dir = str(profile_dir)
        self.procs: list[subprocess.Popen] = []

    def start_controller(self):
        self.procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ipyparallel.controller",
                    f"--profile-dir={self.profile_dir}",
                    "--ip=127.0.0.1",
                    "--HeartMonitor.period=250",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        url = os.path.join(self.profile_dir, "security", "ipcontroller-engine.json")
        end = time.monotonic() + 60
        while not os.path.exists(url):
            assert time.monotonic() < end, "external controller did not start"
            time.sleep(0.05)

    def start_engine(self):
        self.procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ipyparallel.engine",
                    f"--profile-dir={self.profile_dir}",
                    "--IPEngine.enable_nanny=False",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def start(self, engines: int) -> None:
        """A controller and ``engines`` engines, all registered (waited for
        through the same cached client the magic will use)."""
        self.start_controller()
        for _ in range(engines):
            self.start_engine()
        assert (
            len(MANAGER.client(processes=engines, profile=self.profile_dir, timeout=60).ids)
            == engines
        )

    @property
    def engine_pids(self):
        return [p.pid for p in self.procs[1:]]

    def stop(self):
        stop_processes(self.procs)


@pytest.fixture
def external(tmp_path):
    ext = External(tmp_path / "profile_ext")
    try:
        yield ext
    finally:
        ext.stop()


@pytest.mark.timeout(120)
def test_profile_external_cluster_not_stopped(ip, external):
    # the magic waits for one engine only (processes= cannot go with profile=)
    external.start(engines=2)
    reset(ip)
    ok(ip, "import os\nres = {}\ntotal = 0\nwhere = {}")
    cell = (
        f"%%parallel profile={external.profile_dir} progress=off\n"
        "for i in range(30):\n    res[i] = i * 3\n    total += i\n"
        "    where[i] = os.getpid()\n"
    )
    ok(ip, cell)
    assert ip.user_ns["res"] == {i: i * 3 for i in range(30)}
    assert ip.user_ns["total"] == sum(range(30))
    assert set(ip.user_ns["where"].values()) <= set(external.engine_pids), ip.user_ns["where"]
    assert parloop.last_run.backend == "engines"
    ok(ip, "%parallel_stop")
    time.sleep(0.5)
    assert all(p.poll() is None for p in external.procs)
    assert all(alive(p.pid) for p in external.procs)
    ok(ip, "res = {}\ntotal = 0\nwhere = {}")
    ok(ip, cell)  # still usable
    assert ip.user_ns["res"] == {i: i * 3 for i in range(30)}


@pytest.mark.timeout(120)
def test_profile_engine_joining_mid_run(ip, external):
    """An engine that registers during a run (engines of other machines come and
    go) must not get chunks without the run's inputs."""
    external.start(engines=1)
    reset(ip)
    ok(ip, "import time\nres = {}")
    out, err, elapsed, fired, errs = _timed_run(
        ip,
        f"%%parallel profile={external.profile_dir} progress=off\n"
        "for i in range(80):\n    time.sleep(0.05)\n    res[i] = i * 3\n",
        [(0.1, external.start_engine, [])],
    )
    assert errs == [] and not fired
    assert err is None, f"{type(err).__name__}: {str(err)[:300]}"
    assert ip.user_ns["res"] == {i: i * 3 for i in range(80)}


@pytest.mark.timeout(120)
def test_profile_run_has_no_stall_and_names_engines(ip, external):
    external.start(engines=2)
    reset(ip)
    ok(ip, "res = {}")
    t0 = time.monotonic()
    ok(
        ip,
        f"%%parallel profile={external.profile_dir} progress=off\n"
        "for i in range(30):\n    res[i] = i\n",
    )
    elapsed = time.monotonic() - t0
    assert ip.user_ns["res"] == {i: i for i in range(30)}
    labels = {c.worker for c in parloop.last_run.chunks}
    assert elapsed < 3.0 and all(
        any(f":{pid})" in w for pid in external.engine_pids) for w in labels
    ), (elapsed, labels)


# ----------------------------------------------------------------- 7. orphans
@pytest.mark.timeout(120)
def test_no_orphans_after_stop_and_unload(ip, cluster):
    from parloop.backends.engines import shm

    reset(ip)
    ok(ip, "import numpy as np\nbig = np.arange(1_000_000)")  # 8 MB: through shared memory
    ok(ip, P2 + "\nres = {}\nfor i in range(4):\n    res[i] = int(big[i])\n")
    assert shm.segments_of(os.getpid())
    pids = MANAGER.owned_pids()
    assert len(pids) >= 3  # controller (+ schedulers) and 2 engines
    out = ok(ip, "%parallel_stop")
    assert "stopped" in out
    assert wait_gone(pids) == []
    assert shm.segments_of(os.getpid()) == []  # no shared memory left behind either
    assert MANAGER.owned_pids() == []
    out = ok(ip, "%parallel_status")
    assert "no ipyparallel cluster" in out, out

    ok(ip, P2 + "\nres = {}\nfor i in range(4):\n    res[i] = i\n")
    pids = MANAGER.owned_pids()
    assert len(pids) >= 3
    try:
        ok(ip, "%unload_ext parloop")
        assert wait_gone(pids) == []
        assert MANAGER.owned_pids() == []
    finally:
        ok(ip, "%load_ext parloop")
    out = ok(ip, "%parallel_status")
    assert "no ipyparallel cluster" in out, out


# ----------------------------------------------------------------- live progress from engines
@pytest.mark.timeout(120)
def test_live_rows_per_engine_mid_chunk(ip, cluster, dispatch):
    """Engines report how far into a chunk they are (the live view's rows):
    a reading in the middle of one long chunk sees iterations done in it."""
    reset(ip)
    run_live_mid_chunk(ip, "parallel", "processes=2 chunksize=20", "engine")
    assert parloop.last_run.dispatch == dispatch
