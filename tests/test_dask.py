"""``%%parallel dask`` on real Dask clusters (issue 15): a session's
``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` on
127.0.0.1 whose client the notebook made (parloop uses it and never closes
it), and one that parloop starts, owns and stops itself.

Each case runs the cell plainly and under the magic and compares namespaces
and output (helpers.differential)."""

from __future__ import annotations

import _thread
import os
import signal
import threading
import time

import pytest

from helpers import differential, reset, run_cell, run_cell_result, run_live_mid_chunk

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(180)]

MAGIC = "%%parallel dask progress=off"


@pytest.fixture(scope="module")
def client():
    """The notebook's own Dask client (default_client() finds it)."""
    import logging
    import sys

    # a nanny restarts a killed worker with multiprocessing's spawn, which
    # reads __main__.__spec__; the test shell's __main__ has none (a kernel's has)
    main = sys.modules["__main__"]
    if not hasattr(main, "__spec__"):
        main.__spec__ = None
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    c = distributed.Client(cluster)
    c.wait_for_workers(2, timeout=60)
    yield c
    c.close()
    cluster.close()


CASES = [
    ("out = {}", "for i in range(30):\n    out[i] = i * i\n", ["out", "i"]),
    ("trail = []", "for x in 'abcdefgh':\n    trail.append(x * 2)\n", ["trail", "x"]),
    ("total = 0", "for i in range(50):\n    total += i % 7\n", ["total"]),
    (
        "out = {}",
        "for i in range(12):\n    if i % 5 == 0:\n        print('at', i)\n    out[i] = str(i)\n",
        ["out"],
    ),
    (
        "import numpy as np\narr = np.arange(100.0)\nrows = np.zeros((10, 3))",
        "for k in range(10):\n    rows[k] = arr[k * 10 : k * 10 + 3] * 2\n",
        ["rows.tolist()"],
    ),
    (
        "class Point:\n    def __init__(self, x):\n        self.x = x\n"
        "def norm(p):\n    return abs(p.x)\npts = {}",
        "for i in range(-5, 5):\n    pts[i] = norm(Point(i))\n",
        ["pts"],
    ),
    # iterations that depend on each other: the dependence test keeps them serial
    ("x = [1.0] + [0.0] * 20", "for i in range(20):\n    x[i + 1] = x[i] * 1.5 + i\n", ["x"]),
    (
        "seen = set()\nfirst = []",
        "for k in [3, 1, 3, 2, 1, 4]:\n    if k not in seen:\n"
        "        seen.add(k)\n        first.append(k)\n",
        ["first", "seen"],
    ),
]


@pytest.mark.parametrize("setup,cell,checks", CASES)
def test_serial_answer_on_the_notebooks_client(ip, client, setup, cell, checks):
    differential(ip, setup, cell, MAGIC, checks)
    import parloop

    assert parloop.last_run.backend == "dask"


def test_seeded_runs_match_across_dask_and_engines_streams(ip, client):
    reset(ip)
    run_cell(ip, "import random\nout = {}")
    _, err = run_cell(ip, f"{MAGIC} seed=7\nfor i in range(20):\n    out[i] = random.random()\n")
    assert err is None
    dask_values = dict(ip.user_ns["out"])
    run_cell(ip, "out = {}")
    _, err = run_cell(
        ip, "%%threaded seed=7 progress=off\nfor i in range(20):\n    out[i] = random.random()\n"
    )
    assert err is None
    assert ip.user_ns["out"] == dask_values


def test_an_error_keeps_its_type_and_names_the_iteration(ip, client):
    reset(ip)
    run_cell(ip, "class CellError(Exception):\n    pass\nout = {}")
    out, res = run_cell_result(
        ip,
        f"{MAGIC}\nfor i in range(20):\n    if i == 13:\n        raise CellError(f'bad {{i}}')\n"
        "    out[i] = i\n",
    )
    err = res.error_in_exec
    assert isinstance(err, ip.user_ns["CellError"]), repr(err)
    assert any("iteration 13 of 20" in n for n in err.__notes__)
    assert ip.user_ns["out"] == {i: i for i in range(13)}
    # the worker's frames come along as the cause
    assert "raise CellError" in str(err.__cause__)


def test_live_rows_show_progress_inside_a_running_chunk(ip, client):
    """Workers report per iteration (Dask worker events): the live view sees
    each worker part-way through its chunk, not only chunk by chunk."""
    reset(ip)
    run_live_mid_chunk(ip, "parallel", "dask chunksize=20", "worker")


def test_inputs_travel_once_per_worker_and_not_again_while_unchanged(ip, client):
    from parloop.backends.dask import DaskBackend

    reset(ip)
    run_cell(ip, "import numpy as np\nbig = np.ones(2_000_000)\nout = {}")
    cell = f"{MAGIC}\nfor i in range(8):\n    out[i] = float(big[i::8].sum())\n"
    _, err = run_cell(ip, cell)
    assert err is None
    transport = DaskBackend._states[id(client)].transport
    first = transport.last
    assert first.values_sent >= 2  # big and the program, to each worker
    _, err = run_cell(ip, cell)
    assert err is None
    again = transport.last
    # the unchanged array is not sent again (neither as a frame nor through
    # shared memory, which workers on the kernel's host map); only the new
    # program is
    assert first.buffers_sent >= 1
    assert again.values_cached >= 2 and again.buffers_sent == 0 and again.shm_bytes == 0
    assert ip.user_ns["out"] == {i: 250_000.0 for i in range(8)}


def test_interrupt_stops_running_tasks_and_keeps_the_workers(ip, client):
    reset(ip)
    run_cell(ip, "import time\nout = {}")
    workers_before = set(client.scheduler_info()["workers"])
    timer = threading.Timer(1.0, _thread.interrupt_main)
    t0 = time.monotonic()
    timer.start()
    try:
        _, res = run_cell_result(
            ip, f"{MAGIC}\nfor i in range(200):\n    time.sleep(0.1)\n    out[i] = i\n"
        )
    finally:
        timer.cancel()
    elapsed = time.monotonic() - t0
    assert isinstance(res.error_in_exec, KeyboardInterrupt)
    assert elapsed < 6, elapsed
    out = ip.user_ns["out"]
    assert out == {i: i for i in range(len(out))} and len(out) < 200
    assert set(client.scheduler_info()["workers"]) == workers_before
    # the workers are free again at once: nothing of the stopped run is left running
    time.sleep(0.5)
    assert not any(client.processing().values())
    differential(ip, "out = {}", "for i in range(10):\n    out[i] = -i\n", MAGIC, ["out"])


def test_a_killed_worker_loses_nothing(ip, client):
    """SIGKILL one worker process mid-run: its nanny starts a new one, the
    scheduler hands the lost chunks to the others or to the new worker, which
    parloop sends the inputs it lacks; the answer is the serial one."""
    reset(ip)
    run_cell(ip, "import time\nout = {}")
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    timer = threading.Timer(1.0, os.kill, (victim, signal.SIGKILL))
    timer.start()
    try:
        _, res = run_cell_result(
            ip, f"{MAGIC}\nfor i in range(60):\n    time.sleep(0.05)\n    out[i] = i * 3\n"
        )
    finally:
        timer.cancel()
    assert res.error_in_exec is None, repr(res.error_in_exec)
    assert ip.user_ns["out"] == {i: i * 3 for i in range(60)}
    client.wait_for_workers(2, timeout=60)


def test_a_hung_worker_is_given_up_on_by_parloops_deadline(ip, client):
    """SIGSTOP one worker mid-run (hung, or cut off: no heartbeat reaches the
    scheduler): after DaskBackend.SILENT_SECONDS its chunks run on the other
    worker, well before Dask's own 5-minute worker-ttl; the answer is serial."""
    from parloop.backends.dask import DaskBackend

    reset(ip)
    run_cell(ip, "import time\nout = {}")
    victim = sorted(client.run(os.getpid).values())[0]
    timer = threading.Timer(0.8, os.kill, (victim, signal.SIGSTOP))
    t0 = time.monotonic()
    timer.start()
    try:
        _, res = run_cell_result(
            ip, f"{MAGIC}\nfor i in range(40):\n    time.sleep(0.05)\n    out[i] = i + 100\n"
        )
    finally:
        timer.cancel()
        os.kill(victim, signal.SIGCONT)
    elapsed = time.monotonic() - t0
    assert res.error_in_exec is None, repr(res.error_in_exec)
    assert ip.user_ns["out"] == {i: i + 100 for i in range(40)}
    assert elapsed < DaskBackend.SILENT_SECONDS + 20, elapsed
    import parloop

    assert any("silent" in n for n in parloop.last_run.notes), parloop.last_run.notes
    client.wait_for_workers(2, timeout=60)


def test_versions_that_differ_are_named_before_anything_runs(ip, client, monkeypatch):
    import parloop
    from parloop.backends.dask import DaskBackend
    from parloop.backends.versions import check_versions

    with pytest.raises(RuntimeError, match="cloudpickle 0.1 there"):
        check_versions({"python": "3.11", "cloudpickle": "0.1", "parloop": "x"}, "w")
    reset(ip)
    run_cell(ip, "out = {}")
    monkeypatch.setattr(DaskBackend, "_states", {})  # first contact again
    monkeypatch.setattr(parloop, "__version__", "0.0.dev-kernel")
    _, err = run_cell(ip, f"{MAGIC}\nfor i in range(4):\n    out[i] = i\n")
    assert isinstance(err, RuntimeError) and "parloop" in str(err) and "differs" in str(err)
    assert ip.user_ns["out"] == {}


def test_timeout_and_clashing_options_are_refused(ip):
    from IPython.core.error import UsageError

    from parloop.options import parse_options

    for line, word in [
        ("dask timeout=1", "timeout"),
        ("dask ray", "not both"),
        ("dask profile=x", "profile"),
        ("dask=tcp://127.0.0.1:1 processes=2", "processes"),
    ]:
        with pytest.raises(UsageError, match=word):
            parse_options(line, "parallel")
    assert parse_options("dask=tcp://h:8786", "parallel").dask == "tcp://h:8786"
    assert parse_options("dask", "parallel").dask is True


def test_without_a_client_parloop_starts_owns_and_stops_its_own(ip, monkeypatch):
    """No client in the notebook: a LocalCluster of processes=N that
    %parallel_stop stops, processes and all."""
    import psutil

    from parloop.backends.dask import DaskBackend

    monkeypatch.setattr(distributed.client, "_global_clients", {})
    with pytest.raises(ValueError):
        distributed.default_client()
    differential(
        ip,
        "out = {}",
        "for i in range(9):\n    out[i] = i + 1\n",
        "%%parallel dask processes=2 progress=off",
        ["out"],
    )
    assert DaskBackend._owned is not None
    cluster, own = DaskBackend._owned
    pids = list(own.run(os.getpid).values())
    assert len(pids) == 2
    out, err = run_cell(ip, "%parallel_stop")
    assert err is None and "stopped" in out
    assert DaskBackend._owned is None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
