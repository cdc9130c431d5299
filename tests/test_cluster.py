"""The managed and external ipyparallel clusters (parloop.backends.engines.cluster), with real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

ipp = pytest.importorskip("ipyparallel")

from parloop.backends.engines.cluster import MANAGER  # noqa: E402

pytestmark = [pytest.mark.timeout(180), pytest.mark.cluster]


# Functions sent to engines must not live in this test module (engines cannot
# import it): ipyparallel.interactive makes them travel by value.
@ipp.interactive
def executable():
    import sys

    return sys.executable


@ipp.interactive
def cwd():
    import os

    return os.getcwd()


@ipp.interactive
def main_file():
    import sys

    return getattr(sys.modules["__main__"], "__file__", "")


@ipp.interactive
def const(x):
    return x


from helpers import alive, stop_processes, wait_gone  # noqa: E402


@pytest.fixture(scope="module")
def client():
    t0 = time.perf_counter()
    c = MANAGER.client(processes=2)
    print(f"\ncold start of 2 engines: {time.perf_counter() - t0:.2f} s")
    yield c
    MANAGER.stop()


def test_start_and_reuse(client):
    assert sorted(client.ids) == client.ids and len(client.ids) == 2
    t0 = time.perf_counter()
    again = MANAGER.client(processes=2)
    warm = time.perf_counter() - t0
    print(f"warm reuse: {warm * 1000:.2f} ms")
    assert again is client
    assert warm < 0.05

    info = MANAGER.engine_info(client)
    assert [e["id"] for e in info] == client.ids
    owned = MANAGER.owned_pids()
    for e in info:
        assert e["pid"] in owned and e["host"]
        # a subprocess of ours running `python -m ipyparallel.engine` -- not a fork of the kernel
        p = psutil.Process(e["pid"])
        assert p.ppid() == os.getpid()
        assert "ipyparallel.engine" in p.cmdline()

    # same interpreter and working directory as the kernel; the kernel's __main__ is not there
    view = client[:]
    assert view.apply_sync(executable) == [sys.executable] * 2
    assert view.apply_sync(cwd) == [os.getcwd()] * 2
    main_files = view.apply_sync(main_file)
    assert all("pytest" not in f for f in main_files)

    st = MANAGER.status()
    assert st["managed"] is True and st["processes"] == 2
    assert [e["id"] for e in st["engines"]] == client.ids
    assert all(e["busy"] is False for e in st["engines"])


def test_listens_on_localhost_only(client):
    controller = MANAGER._managed.cluster.controller.pid
    procs = [psutil.Process(controller), *psutil.Process(controller).children(recursive=True)]
    listening = [
        c.laddr.ip
        for p in procs
        for c in p.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and set(listening) == {"127.0.0.1"}


def test_busy_engine_shows_in_status(client):
    ar = client[client.ids[0]].apply_async(time.sleep, 1.5)
    time.sleep(0.3)
    busy = {e["id"]: e["busy"] for e in MANAGER.status()["engines"]}
    assert busy == {client.ids[0]: True, client.ids[1]: False}
    ar.get(5)


def test_resize_grow_and_shrink(client):
    before = {e["pid"] for e in MANAGER.engine_info(client)}
    t0 = time.perf_counter()
    grown = MANAGER.client(processes=3)
    print(f"grow 2 -> 3: {time.perf_counter() - t0:.2f} s")
    assert grown is client and len(grown.ids) == 3
    pids3 = {e["pid"] for e in MANAGER.engine_info(grown)}
    assert before < pids3  # the warm engines were kept
    assert len(grown[:].apply_sync(os.getpid)) == 3

    t0 = time.perf_counter()
    shrunk = MANAGER.client(processes=1)
    print(f"shrink 3 -> 1: {time.perf_counter() - t0:.2f} s")
    assert shrunk is client and len(shrunk.ids) == 1
    kept = {e["pid"] for e in MANAGER.engine_info(shrunk)}
    assert wait_gone(pids3 - kept) == []
    assert shrunk[:].apply_sync(os.getpid) == list(kept)

    back = MANAGER.client(processes=2)
    assert len(back.ids) == 2 and back[:].apply_sync(const, 1) == [1, 1]


def test_signal_engines_interrupts_the_running_task(client):
    client = MANAGER.client(processes=2)
    ar = client[client.ids[0]].apply_async(time.sleep, 30)
    time.sleep(0.5)
    t0 = time.perf_counter()
    MANAGER.signal_engines(client, signal.SIGINT, targets=[client.ids[0]])
    with pytest.raises(Exception, match="KeyboardInterrupt"):
        ar.get(timeout=10)
    assert time.perf_counter() - t0 < 2
    assert client[:].apply_sync(const, 6) == [6, 6]  # the engine lives on


def test_killed_engine_is_detected_and_replaced(client):
    client = MANAGER.client(processes=2)
    victim = client.ids[0]
    pid = {e["id"]: e["pid"] for e in MANAGER.engine_info(client)}[victim]
    ar = client[victim].apply_async(time.sleep, 30)
    time.sleep(0.3)
    t0 = time.perf_counter()
    MANAGER.kill_engine(victim)
    while not MANAGER.dead_engines(client):
        assert time.perf_counter() - t0 < 5
        time.sleep(0.01)
    assert MANAGER.dead_engines(client) in ([victim], [])
    # dead_engines() unregistered it: its task fails at once, not after the heartbeat timeout
    with pytest.raises(Exception) as info:
        ar.get(timeout=5)
    assert "EngineError" in repr(info.value) or isinstance(info.value, ipp.error.EngineError)
    print(f"dead engine detected and its task failed in {time.perf_counter() - t0:.3f} s")
    assert not alive(pid)

    healed = MANAGER.client(processes=2)
    assert len(healed.ids) == 2 and victim not in healed.ids
    assert healed[:].apply_sync(const, 2) == [2, 2]


def test_dead_controller_gives_a_new_cluster(client):
    old = MANAGER.client(processes=2)
    old_pids = MANAGER.owned_pids()
    os.kill(MANAGER._managed.cluster.controller.pid, signal.SIGKILL)
    time.sleep(0.2)
    new = MANAGER.client(processes=2)
    assert new is not old and len(new.ids) == 2
    assert new[:].apply_sync(const, 3) == [3, 3]
    # the old cluster's engines (and the controller's children) are gone too
    assert wait_gone(old_pids) == []


def test_prestart_then_client():
    MANAGER.stop()
    MANAGER.prestart(2)
    time.sleep(0.5)
    t0 = time.perf_counter()
    c = MANAGER.client(processes=2)
    print(f"client() after prestart (+0.5 s): {time.perf_counter() - t0:.2f} s")
    assert len(c.ids) == 2 and c[:].apply_sync(const, 4) == [4, 4]


def test_stop_leaves_no_process():
    MANAGER.client(processes=2)
    pids = MANAGER.owned_pids()
    profile_dir = MANAGER._managed.profile_dir
    assert len(pids) >= 3  # controller (+ its schedulers) and 2 engines
    t0 = time.perf_counter()
    assert MANAGER.stop() is True
    print(f"stop: {time.perf_counter() - t0:.2f} s")
    assert [p for p in pids if alive(p)] == []  # gone when stop() returns, not later
    assert MANAGER.owned_pids() == []
    assert not os.path.exists(profile_dir)
    assert MANAGER.stop() is False  # idempotent
    assert MANAGER.status()["engines"] == []


def test_atexit_stops_the_cluster(tmp_path):
    script = textwrap.dedent(
        """
        from parloop.backends.engines.cluster import MANAGER
        c = MANAGER.client(processes=1)
        print(" ".join(map(str, MANAGER.owned_pids())), flush=True)
        # no stop(): the atexit handler must do it
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert pids
    assert wait_gone(pids, timeout=5) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_killed_kernel_leaves_no_orphans():
    script = textwrap.dedent(
        """
        import time
        from parloop.backends.engines.cluster import MANAGER
        c = MANAGER.client(processes=2)
        print(MANAGER._managed.profile_dir, " ".join(map(str, MANAGER.owned_pids())), flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        profile_dir, *pids = proc.stdout.readline().split()
        pids = [int(p) for p in pids]
        assert len(pids) >= 3
    finally:
        proc.kill()  # no atexit, no stop(): like a crashed or SIGKILLed kernel
        proc.wait(10)
    left = wait_gone(pids, timeout=15)
    shutil.rmtree(profile_dir, ignore_errors=True)
    for pid in left:  # do not leak them if the test fails
        os.kill(pid, signal.SIGKILL)
    assert left == []


@pytest.fixture
def external_cluster(tmp_path):
    """A controller and 2 engines started by hand, as `ipcluster` or a batch system would."""
    profile_dir = tmp_path / "profile_ext"
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ipyparallel.controller",
                f"--profile-dir={profile_dir}",
                "--ip=127.0.0.1",
                "--HeartMonitor.period=250",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    ]
    url = profile_dir / "security" / "ipcontroller-engine.json"
    end = time.monotonic() + 60
    while not url.exists():
        assert time.monotonic() < end, "external controller did not start"
        time.sleep(0.05)
    for _ in range(2):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ipyparallel.engine",
                    f"--profile-dir={profile_dir}",
                    "--IPEngine.enable_nanny=False",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        )
    yield str(profile_dir), procs
    stop_processes(procs)


def test_external_cluster_is_used_and_never_stopped(external_cluster):
    profile_dir, procs = external_cluster
    c = MANAGER.client(processes=2, profile=profile_dir, timeout=60)
    assert len(c.ids) == 2
    assert sorted(c[:].apply_sync(os.getpid)) == sorted(p.pid for p in procs[1:])
    assert MANAGER.client(processes=2, profile=profile_dir) is c  # cached
    st = MANAGER.status()
    assert st["managed"] is False and st["processes"] == 2
    assert MANAGER.dead_engines(c) == []

    MANAGER.stop()  # stops the managed cluster only (if any)
    assert all(p.poll() is None for p in procs)
    assert c[:].apply_sync(const, 5) == [5, 5]
    with pytest.raises(ValueError):
        MANAGER.kill_engine(c.ids[0])


def test_unreachable_external_cluster(tmp_path):
    with pytest.raises(RuntimeError, match="nothere"):
        MANAGER.client(profile=str(tmp_path / "nothere"), timeout=0.5)
    with pytest.raises(RuntimeError, match="nosuchid"):
        MANAGER.client(profile=str(tmp_path), cluster_id="nosuchid", timeout=0.5)
