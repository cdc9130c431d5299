"""``%%parallel ray`` on a real local Ray: the notebook's own ``ray.init()``
(parloop runs there and never shuts it down) for most tests, and, last, one
that parloop starts, owns and stops.

Each case runs the cell plainly and under the magic and compares namespaces
and output (helpers.differential).  One Ray at a time: the module's fixture
starts one of 2 CPUs; the last test stops it before parloop starts its own."""

from __future__ import annotations

import _thread
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

import pytest

from helpers import (
    deep_diff,
    differential,
    materialize,
    reset,
    run_cell,
    run_cell_result,
    run_live_mid_chunk,
    snapshot,
)

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]

MAGIC = "%%parallel ray progress=off"


@pytest.fixture(scope="module")
def ray_cluster():
    """The notebook's own Ray: 2 CPUs, no dashboard, no usage statistics, its
    files in a private temp dir (short: Ray's socket paths must stay under
    the 107 characters a Unix socket allows)."""
    temp_dir = tempfile.mkdtemp(prefix="pl-ray-")
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp_dir,
        )
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)


def _last_backend() -> str:
    import parloop

    return parloop.last_run.backend


CASES = {
    "dict_writes": (
        "def f(x):\n    return x * 3 + 1\nout = {}",
        "for i in range(30):\n    out[i] = f(i)\n",
        ["out", "i"],
    ),
    "append": ("trail = []", "for x in 'abcdefgh':\n    trail.append(x * 2)\n", ["trail", "x"]),
    "reduction": (
        "total = 0\nys = [i * 0.5 for i in range(50)]",
        "for y in ys:\n    total += y\n",
        ["total", "y"],
    ),
    "prints_in_order": (
        "out = {}",
        "for i in range(24):\n    print('at', i)\n    out[i] = str(i)\n",
        ["out"],
    ),
    "notebook_function_and_class": (
        "class Point:\n    def __init__(self, x):\n        self.x = x\n"
        "    def norm(self):\n        return abs(self.x)\n"
        "def make(i):\n    return Point(i - 5)\npts = {}",
        "for i in range(10):\n    p = make(i)\n    pts[i] = (p, p.norm())\n",
        ["pts", "p", "isinstance(pts[3][0], Point)"],
    ),
    "numpy_inputs": (
        # 800 kB: the array travels out of band, through Ray's object store
        "import numpy as np\narr = np.arange(100_000.0)\nrows = np.zeros((10, 3))",
        "for k in range(10):\n    rows[k] = arr[k * 10 : k * 10 + 3] * 2\n",
        ["rows"],
    ),
    # every iteration reads what the one before wrote: the dependence test
    # finds it and the answer is still the serial one
    "self_dependent": (
        "def f(v):\n    return v * 1.5 + 1\nx = [1.0] + [0.0] * 20",
        "for i in range(20):\n    x[i + 1] = f(x[i])\n",
        ["x", "i"],
    ),
    "for_else_break": (
        "seen = []",
        "for k in range(40):\n    if k == 17:\n        break\n    seen.append(k)\nelse:\n"
        "    seen.append('else')\n",
        ["seen", "k"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_serial_answer_on_the_notebooks_ray(ip, ray_cluster, name):
    setup, cell, checks = CASES[name]
    differential(ip, setup, cell, MAGIC, checks)
    assert _last_backend() == "ray"


ERR_SETUP = """
class CellError(Exception):
    pass
def work(i):
    if i == 13:
        raise CellError("bad item %d" % i)
    return i * i
results = {}
total = 0
log = []
"""
ERR_CELL = """for i in range(40):
    log.append(i)
    total += i
    results[i] = work(i)
    after = i
"""
ERR_CHECKS = ["results", "total", "log", "i", "after"]


def test_an_error_keeps_its_type_names_the_iteration_and_the_serial_state(ip, ray_cluster):
    reset(ip)
    run_cell(ip, ERR_SETUP)
    _, s_err = run_cell(ip, ERR_CELL)
    assert type(s_err).__name__ == "CellError"
    serial = materialize(snapshot(ip, ERR_CHECKS))
    reset(ip)
    run_cell(ip, ERR_SETUP)
    _, err = run_cell(ip, MAGIC + "\n" + ERR_CELL)
    assert isinstance(err, ip.user_ns["CellError"]), repr(err)
    assert str(err) == "bad item 13"
    notes = "\n".join(getattr(err, "__notes__", []))
    assert "iteration 13" in notes and "i=13" in notes, notes
    for expr, s, m in zip(ERR_CHECKS, serial, materialize(snapshot(ip, ERR_CHECKS))):
        assert s[0] == m[0], (expr, s, m)
        if s[0] == "value":
            assert deep_diff(s[1], m[1], expr) is None
    # the worker's frames come along as the cause
    assert "raise CellError" in str(err.__cause__)


def test_on_error_collect(ip, ray_cluster):
    import parloop

    reset(ip)
    run_cell(ip, "class CellError(Exception):\n    pass\nresults = {}\nlog = []")
    _, err = run_cell(
        ip,
        f"{MAGIC} on_error=collect\nfor i in range(12):\n    log.append(i)\n"
        "    if i % 5 == 3:\n        raise CellError('boom %d' % i)\n    results[i] = i * 2\n",
    )
    assert err is None, err
    ns = ip.user_ns
    assert ns["results"] == {i: i * 2 for i in range(12) if i % 5 != 3}
    assert ns["log"] == list(range(12))
    errs = parloop.last_run.errors
    assert [e.index for e in errs] == [3, 8]
    for e in errs:
        assert isinstance(e.exception, ns["CellError"])
        assert ("i=%d" % e.index) in e.values


def test_seeded_runs_match_threads(ip, ray_cluster):
    reset(ip)
    run_cell(ip, "import random\nout = {}")
    _, err = run_cell(ip, f"{MAGIC} seed=7\nfor i in range(20):\n    out[i] = random.random()\n")
    assert err is None, err
    on_ray = dict(ip.user_ns["out"])
    run_cell(ip, "out = {}")
    _, err = run_cell(
        ip, "%%threaded seed=7 progress=off\nfor i in range(20):\n    out[i] = random.random()\n"
    )
    assert err is None, err
    assert ip.user_ns["out"] == on_ray
    assert len(set(on_ray.values())) == 20


def test_live_rows_show_progress_inside_a_running_chunk(ip, ray_cluster):
    """Workers report per iteration (through the progress actor): the live
    view sees each worker part-way through its chunk, not only chunk by chunk.
    A report passes a worker's timer (0.25 s), the actor and the kernel's
    throttled asking."""
    reset(ip)
    _two_chunks_seen_mid_chunk(ip)


def _two_chunks_seen_mid_chunk(ip) -> None:
    """Two chunks on the 2 CPUs, each seen part-way through by a live view."""
    run_live_mid_chunk(ip, "parallel", "ray chunksize=20", "worker")


def _unreachable_for(name: str, seconds: float) -> int:
    """On a Ray worker: its process could not reach the progress actor just
    now (as when the actor is not registered yet at a connection's first
    chunk); returns its pid."""
    import os
    import time

    from parloop.backends import ray as ray_backend

    ray_backend._MISSING[name] = time.monotonic() + seconds
    ray_backend._ACTORS.pop(name, None)
    time.sleep(0.3)  # the other task lands on the other process
    return os.getpid()


_unreachable_for.__module__ = "__main__"  # by value: the workers cannot import the tests


def test_live_rows_recover_after_a_failed_actor_lookup(ip, ray_cluster):
    """A worker process whose lookup of the progress actor failed reports
    again a moment later, within the chunk -- it used to stay silent for a
    minute (no live rows, and a chunk longer than the deadline ran again)."""
    from parloop.backends.ray import _CONN

    reset(ip)
    run_cell(ip, "out = {}")
    run_cell(ip, f"{MAGIC}\nfor i in range(4):\n    out[i] = i\n")  # the actor exists
    name = _CONN[0].progress[1]
    ray.get([ray.remote(_unreachable_for).remote(name, 3.0) for _ in range(4)])
    _two_chunks_seen_mid_chunk(ip)


def _threads_of_report_calls(name: str) -> list[str]:
    """On a Ray worker: begin and end a chunk through the process's reporter;
    the names of the threads that looked the progress actor up and sent the
    reports (the task's own thread is "MainThread")."""
    import threading
    import time

    from parloop.backends import ray as ray_backend

    seen: list[str] = []
    looked_up, sent = ray_backend._actor, ray_backend._Reporter._send

    def lookup(actor_name):
        seen.append(threading.current_thread().name)
        return looked_up(actor_name)

    def send(self, actor, key, done):
        seen.append(threading.current_thread().name)
        return sent(self, actor, key, done)

    ray_backend._actor, ray_backend._Reporter._send = lookup, send
    try:
        ray_backend._ACTORS.pop(name, None)  # looked up again, from somewhere
        reading = ray_backend._Reading()
        ray_backend._REPORTER.begin((name, ("probe", 0, 0), 0.05), reading)
        time.sleep(0.3)
        ray_backend._REPORTER.end()
        time.sleep(0.1)
    finally:
        ray_backend._actor, ray_backend._Reporter._send = looked_up, sent
    return seen


_threads_of_report_calls.__module__ = "__main__"  # by value: the workers cannot import the tests


def test_reports_are_never_sent_from_the_tasks_own_thread(ip, ray_cluster):
    """A cancel's KeyboardInterrupt lands in the task's own thread; one that
    landed inside a report's actor call left the process's later reports
    queued behind it for good (CI: a chunk's live row never came, twice).
    So the reporter looks the actor up and sends from its own thread only:
    at once when a chunk begins, then every period."""
    from parloop.backends.ray import _CONN

    reset(ip)
    run_cell(ip, "out = {}")
    run_cell(ip, f"{MAGIC}\nfor i in range(4):\n    out[i] = i\n")  # the actor exists
    name = _CONN[0].progress[1]
    threads = ray.get(ray.remote(_threads_of_report_calls).remote(name))
    assert len(threads) >= 4, threads  # a lookup and a report at once, then each period
    assert set(threads) == {"parloop-ray-progress"}, threads


def test_inputs_are_loaded_once_per_worker_process_per_cell(ip, ray_cluster):
    """An input whose unpickling counts, per process, how often it ran: within
    one cell every chunk a process runs sees the same count (chunks of one
    iteration: 24 tasks), and the next cell loads it once more."""
    reset(ip)
    run_cell(
        ip,
        "import os\n"
        "def counted(v):\n"
        "    os.environ['PL_TEST_LOADS'] = str(int(os.environ.get('PL_TEST_LOADS', '0')) + 1)\n"
        "    return Counted(v)\n"
        "class Counted:\n"
        "    def __init__(self, v):\n        self.v = v\n"
        "    def __reduce__(self):\n        return counted, (self.v,)\n"
        "c = Counted(5)\nseen = {}",
    )
    cell = (
        f"{MAGIC} chunksize=1\nfor i in range(24):\n"
        "    seen[i] = (os.getpid(), os.environ['PL_TEST_LOADS'], c.v)\n"
    )
    counts = []
    for _ in range(2):
        _, err = run_cell(ip, cell)
        assert err is None, err
        seen = ip.user_ns["seen"]
        assert {v for _, _, v in seen.values()} == {5}
        by_pid: dict[int, set[str]] = {}
        for pid, n, _ in seen.values():
            by_pid.setdefault(pid, set()).add(n)
        assert os.getpid() not in by_pid
        assert all(len(ns) == 1 for ns in by_pid.values()), by_pid
        counts.append({pid: int(next(iter(ns))) for pid, ns in by_pid.items()})
    for pid in set(counts[0]) & set(counts[1]):
        assert counts[1][pid] == counts[0][pid] + 1


def test_an_input_a_worker_cannot_load_is_named_before_anything_runs(ip, ray_cluster):
    from parloop.backends.engines.transport import TransportError

    reset(ip)
    run_cell(
        ip,
        "import os\nKERNEL = os.getpid()\n"
        "def rebuild(pid):\n"
        "    import os\n"
        "    if os.getpid() != pid:\n"
        "        raise ImportError('No module named fussy')\n"
        "    return Fussy()\n"
        "class Fussy:\n"
        "    def __reduce__(self):\n        return rebuild, (KERNEL,)\n"
        "fz = Fussy()\nout = {}",
    )
    _, err = run_cell(ip, f"{MAGIC}\nfor i in range(6):\n    out[i] = (i, fz)\n")
    assert isinstance(err, TransportError), repr(err)
    assert err.name == "fz" and "fussy" in str(err)
    assert ip.user_ns["out"] == {}


def test_timeout_is_a_usage_error(ip, ray_cluster):
    from IPython.core.error import UsageError

    reset(ip)
    run_cell(ip, "out = {}")
    _, err = run_cell(ip, "%%parallel ray timeout=1\nfor i in range(3):\n    out[i] = i\n")
    assert isinstance(err, UsageError), repr(err)
    assert "timeout" in str(err)
    assert ip.user_ns["out"] == {}


def test_versions_that_differ_are_named_before_anything_runs(ip, ray_cluster, monkeypatch):
    from parloop.backends import ray as ray_backend
    from parloop.backends import versions

    reset(ip)
    run_cell(ip, "out = {}")
    _, err = run_cell(ip, f"{MAGIC}\nfor i in range(2):\n    out[i] = i\n")  # connected
    assert err is None, err
    conn = ray_backend._CONN[0]
    assert conn is not None and conn.how == "notebook"
    here = versions.local_versions()
    monkeypatch.setattr(conn, "checked", False)  # first contact again
    monkeypatch.setattr(versions, "local_versions", lambda: dict(here, cloudpickle="0.0.1"))
    run_cell(ip, "out = {}")
    _, err = run_cell(ip, f"{MAGIC}\nfor i in range(4):\n    out[i] = i\n")
    assert isinstance(err, versions.VersionMismatchError), repr(err)
    assert "cloudpickle" in str(err) and "0.0.1 here" in str(err), str(err)
    assert ip.user_ns["out"] == {}


def test_status_names_the_notebooks_ray(ip, ray_cluster):
    reset(ip)
    run_cell(ip, "out = {}")
    run_cell(ip, f"{MAGIC}\nfor i in range(2):\n    out[i] = i\n")
    out, err = run_cell(ip, "%parallel_status")
    assert err is None, err
    assert "Ray (the notebook's ray.init())" in out and "2 CPU(s)" in out, out


def _interrupted(ip, cell: str, after: float) -> tuple[BaseException | None, float]:
    timer = threading.Timer(after, _thread.interrupt_main)
    t0 = time.monotonic()
    timer.start()
    try:
        try:
            _, res = run_cell_result(ip, cell)
            err = res.error_in_exec
        except KeyboardInterrupt as e:  # should IPython let it through
            err = e
    finally:
        timer.cancel()
        timer.join()
    return err, time.monotonic() - t0


def test_interrupt_stops_the_tasks_and_applies_the_prefix(ip, ray_cluster):
    reset(ip)
    run_cell(ip, "import time\nout = {}")
    err, elapsed = _interrupted(
        ip, f"{MAGIC}\nfor i in range(200):\n    time.sleep(0.1)\n    out[i] = i\n", 1.5
    )
    assert isinstance(err, KeyboardInterrupt), repr(err)
    assert elapsed < 1.5 + 3.0, elapsed  # 10 s uninterrupted
    out = ip.user_ns["out"]
    assert out == {i: i for i in range(len(out))} and 0 < len(out) < 200
    assert ip.user_ns["i"] == len(out) - 1
    differential(ip, "out = {}", "for i in range(10):\n    out[i] = -i\n", MAGIC, ["out"])


def test_interrupt_kills_tasks_that_ignore_sigint(ip, ray_cluster, capsys):
    """Workers whose SIGINT is ignored (started from a non-interactive shell)
    do not stop on a plain ray.cancel: after the grace period their tasks
    are killed, and the next cell runs on fresh workers.  (Half-second
    iterations: a chunk takes ~6 s, longer than the grace period.)"""
    reset(ip)
    run_cell(ip, "import os, signal, time\nKERNEL = os.getpid()\nout = {}")
    capsys.readouterr()
    err, elapsed = _interrupted(
        ip,
        f"{MAGIC}\nfor i in range(100):\n"
        "    if os.getpid() != KERNEL:\n"
        "        signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "    time.sleep(0.5)\n    out[i] = i\n",
        1.5,
    )
    assert isinstance(err, KeyboardInterrupt), repr(err)
    assert elapsed < 1.5 + 2.0 + 2.0 + 1.5, elapsed  # the grace period, the drain
    assert "killing their workers" in capsys.readouterr().err
    out = ip.user_ns["out"]
    assert out == {i: i for i in range(len(out))} and len(out) < 200
    differential(ip, "out = {}", "for i in range(10):\n    out[i] = -i\n", MAGIC, ["out"])


def _kill_mid_run(
    ip, tmp_path, options: str = "", sig: int = signal.SIGKILL, killed: list[int] | None = None
) -> tuple[Any, list[int]]:
    """Run 40 iterations; the one at 10 writes its process's pid to a file
    and sleeps, and a thread here sends that process ``sig`` (SIGKILL).
    Returns the cell's result and the pids signalled (also put in ``killed``)."""
    pidfile = tmp_path / "worker.pid"
    reset(ip)
    run_cell(ip, f"import os, time\nout = {{}}\nPIDFILE = {str(pidfile)!r}")
    killed = [] if killed is None else killed

    def kill_when_written() -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end and not killed:
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            if pid != os.getpid():  # never this process (the test then fails below)
                os.kill(pid, sig)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_written, daemon=True)
    killer.start()
    _, res = run_cell_result(
        ip,
        f"{MAGIC} {options}\nfor i in range(40):\n"
        "    if i == 10 and not os.path.exists(PIDFILE):\n"
        "        with open(PIDFILE + '.tmp', 'w') as fh:\n"
        "            fh.write(str(os.getpid()))\n"
        "        os.rename(PIDFILE + '.tmp', PIDFILE)\n"
        "        time.sleep(2)\n"
        "    time.sleep(0.05)\n    out[i] = i * 3\n",
    )
    killer.join(5)
    assert killed and killed[0] != os.getpid()
    return res, killed


def test_a_killed_worker_loses_nothing(ip, ray_cluster, tmp_path):
    """SIGKILL the Ray worker process running a chunk: Ray runs the task
    again (max_retries = retries, 1 by default), and the answer is the
    serial one."""
    from helpers import alive

    res, killed = _kill_mid_run(ip, tmp_path)
    assert not alive(killed[0])
    assert res.error_in_exec is None, repr(res.error_in_exec)
    assert ip.user_ns["out"] == {i: i * 3 for i in range(40)}


def test_a_killed_worker_without_retries_names_the_lost_iterations(ip, ray_cluster, tmp_path):
    """``retries=0``: the chunk is lost; WorkerLostError names its iterations,
    and what completed before it is applied."""
    from parloop.errors import WorkerLostError

    res, _ = _kill_mid_run(ip, tmp_path, "retries=0")
    err = res.error_in_exec
    assert isinstance(err, WorkerLostError), repr(err)
    m = re.search(r"iterations (\d+)\.\.(\d+)", str(err))
    assert m and int(m[1]) <= 10 <= int(m[2]), str(err)
    assert "retries (0)" in str(err)
    out = ip.user_ns["out"]
    assert out == {i: i * 3 for i in range(len(out))} and len(out) <= int(m[1])


def _hung_mid_run(ip, tmp_path, options: str = "") -> tuple[Any, int, float]:
    """SIGSTOP the Ray worker process running iteration 10 (hung, or cut
    off: Ray itself notices nothing -- the process is there, its node
    answers); SIGCONT it once the cell is over, and wait until Ray has both
    CPUs free again.  Returns the cell's result, the pid, the cell's time."""
    t0 = time.monotonic()
    stopped: list[int] = []
    try:
        res, _ = _kill_mid_run(ip, tmp_path, options, signal.SIGSTOP, stopped)
        elapsed = time.monotonic() - t0
    finally:
        for pid in stopped:
            if pid != os.getpid():
                os.kill(pid, signal.SIGCONT)
    end = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < end:
        time.sleep(0.2)
    return res, stopped[0], elapsed


def test_a_hung_worker_is_given_up_on_by_parloops_deadline(ip, ray_cluster, tmp_path):
    """A stopped worker stops reporting: after RayBackend.SILENT_SECONDS its
    chunk runs again on the other worker (Ray would wait for ever: the
    process is alive), the first copy to finish is committed, the answer is
    the serial one, and the notes name the silent worker."""
    import parloop
    from parloop.backends.ray import RayBackend

    res, pid, elapsed = _hung_mid_run(ip, tmp_path)
    assert res.error_in_exec is None, repr(res.error_in_exec)
    assert ip.user_ns["out"] == {i: i * 3 for i in range(40)}
    assert RayBackend.SILENT_SECONDS <= elapsed < RayBackend.SILENT_SECONDS + 15, elapsed
    silent = [n for n in parloop.last_run.notes if "silent" in n]
    assert silent and f":{pid} " in silent[0] and "ran again" in silent[0], parloop.last_run.notes
    assert parloop.last_run.chunks and any(c.retried for c in parloop.last_run.chunks)


def test_a_hung_worker_without_retries_names_the_lost_iterations(ip, ray_cluster, tmp_path):
    """``retries=0``: the silent worker's chunk is not run again; the cell
    fails with WorkerLostError naming the worker and the iterations, and
    what completed before them is applied."""
    from parloop.backends.ray import RayBackend
    from parloop.errors import WorkerLostError

    res, pid, elapsed = _hung_mid_run(ip, tmp_path, "retries=0")
    err = res.error_in_exec
    assert isinstance(err, WorkerLostError), repr(err)
    m = re.search(r"iterations (\d+)\.\.(\d+)", str(err))
    assert m and int(m[1]) <= 10 <= int(m[2]), str(err)
    assert f":{pid} " in str(err) and "silent" in str(err) and "retries (0)" in str(err), str(err)
    assert elapsed < RayBackend.SILENT_SECONDS + 15, elapsed
    out = ip.user_ns["out"]
    assert out == {i: i * 3 for i in range(len(out))} and len(out) <= int(m[1])


def test_another_address_while_the_notebook_is_connected_is_refused(ip, ray_cluster):
    from IPython.core.error import UsageError

    from parloop.backends import ray as ray_backend

    reset(ip)
    run_cell(ip, "out = {}")
    _, err = run_cell(ip, f"{MAGIC}\nfor i in range(2):\n    out[i] = i\n")
    assert err is None, err
    here = ray_backend._CONN[0].address
    # its own address: the same Ray
    _, err = run_cell(
        ip, f"%%parallel ray={here} progress=off\nfor i in range(3):\n    out[i] = -i\n"
    )
    assert err is None, err
    assert ip.user_ns["out"] == {0: 0, 1: -1, 2: -2}
    _, err = run_cell(ip, "%%parallel ray=10.9.9.9:6379\nfor i in range(3):\n    out[i] = i\n")
    assert isinstance(err, UsageError) and "ray.shutdown()" in str(err), repr(err)
    assert ray.is_initialized()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_address_connects_and_leaves_the_cluster_running(ip, ray_cluster):
    """``ray=ADDRESS``: a cluster started by ``ray start --head`` (not
    parloop's): parloop connects, runs there, and parloop.shutdown() drops
    its connection only -- the cluster keeps running."""
    import socket
    import subprocess
    import sys

    import parloop
    from helpers import stop_processes
    from parloop.backends import ray as ray_backend

    ray.shutdown()  # the module's Ray: one at a time
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="pl-rayh-")
    head = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        # the kernel's token setup is Ray's and the user's business, not this test's
        env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 120
        while True:
            assert head.poll() is None, "ray start --head exited"
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < end, "the head node did not come up"
                time.sleep(0.2)
        magic = f"%%parallel ray=127.0.0.1:{port} progress=off"
        differential(ip, "out = {}", "for i in range(20):\n    out[i] = i * 7\n", magic, ["out"])
        conn = ray_backend._CONN[0]
        assert conn is not None and conn.how == "connected"
        status, _ = run_cell(ip, "%parallel_status")
        assert "cluster parloop connected to" in status, status
        assert not ray_backend.RayBackend.stop_cluster()  # %parallel_stop: not parloop's
        assert ray.is_initialized()
        parloop.shutdown()
        assert not ray.is_initialized() and ray_backend._CONN[0] is None
        assert head.poll() is None
        socket.create_connection(("127.0.0.1", port), 1).close()  # still answers
    finally:
        stop_processes([head])
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_parloop_starts_owns_and_stops_a_local_ray(ip, ray_cluster):
    """Last: without the notebook's Ray, ``ray`` starts a local one that
    parloop owns (processes=2 CPUs); parloop.shutdown() stops it and its
    processes."""
    import psutil

    import parloop
    from parloop.backends import ray as ray_backend

    ray.shutdown()  # the module's Ray: one at a time
    reset(ip)
    run_cell(ip, "out = {}")
    differential(
        ip, "out = {}", "for i in range(16):\n    out[i] = i * i\n", MAGIC + " processes=2", ["out"]
    )
    conn = ray_backend._CONN[0]
    assert conn is not None and conn.how == "owned" and conn.cpus == 2
    status, _ = run_cell(ip, "%parallel_status")
    assert "local cluster parloop started" in status, status
    started = psutil.Process().children(recursive=True)
    assert started
    parloop.shutdown()
    assert not ray.is_initialized()
    assert ray_backend._CONN[0] is None
    assert conn.temp_dir and not os.path.exists(conn.temp_dir)
    _, left = psutil.wait_procs(started, timeout=20)
    assert not left, left
