"""Workers without parloop (issue 15): a Dask scheduler and workers run by
another Python environment -- a venv that sees this one's libraries
(distributed, cloudpickle, numpy) but not parloop, nor IPython, pyzmq,
ipyparallel or tqdm, which a Dask image need not have (tests/bareenv.py) --
used from the notebook through ``%%parallel dask=<scheduler file>``.

parloop finds the workers lacking it on first contact and sends them its
own package (parloop.backends.shipping); the loops then give the serial
answer, and a worker that joins later gets the package too."""

from __future__ import annotations

import subprocess
import time

import pytest

from bareenv import bare_env, make_bare_python, run_cells, where_parloop_comes_from
from helpers import reset, run_cell, stop_processes

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    return make_bare_python(tmp_path_factory.mktemp("bare-env"))


def _start_worker(python: str, scheduler_file: str, tmp: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            python,
            "-m",
            "distributed.cli.dask_worker",
            "--scheduler-file",
            scheduler_file,
            "--nthreads",
            "1",
            "--no-dashboard",
            "--local-directory",
            tmp,
            "--host",
            "127.0.0.1",
        ],
        env=bare_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def bare_cluster(bare_python, tmp_path_factory):
    """A scheduler and two workers in the bare environment, started with
    Popen and stopped by pid."""
    tmp = tmp_path_factory.mktemp("bare-cluster")
    scheduler_file = str(tmp / "scheduler.json")
    procs = [
        subprocess.Popen(
            [
                bare_python,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                scheduler_file,
            ],
            env=bare_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not (tmp / "scheduler.json").exists():
            assert time.monotonic() < deadline, "the bare scheduler did not start"
            time.sleep(0.1)
        procs += [_start_worker(bare_python, scheduler_file, str(tmp)) for _ in range(2)]
        client = distributed.Client(scheduler_file=scheduler_file, timeout=60)
        client.wait_for_workers(2, timeout=120)
        yield scheduler_file, client, procs, str(tmp)
        client.close()
    finally:
        from parloop.backends.dask import DaskBackend

        DaskBackend.shutdown()  # the kernel's connection to this scheduler
        stop_processes(procs)


def test_workers_without_parloop_are_sent_it_and_give_the_serial_answer(ip, bare_cluster):
    scheduler_file, client, _procs, _tmp = bare_cluster
    run_cells(ip, f"%%parallel dask={scheduler_file} progress=off", "dask", "parloop was sent")
    answers = client.run(where_parloop_comes_from)
    assert len(answers) == 2
    for where in answers.values():
        assert where["parloop"] is not None and ".zip" in where["parloop"], where
        assert where["imported"] == [], where


def test_a_worker_that_joins_later_gets_parloop_too(ip, bare_python, bare_cluster):
    scheduler_file, client, procs, tmp = bare_cluster
    procs.append(_start_worker(bare_python, scheduler_file, tmp))
    client.wait_for_workers(3, timeout=120)
    reset(ip)
    run_cell(ip, "import time\nout = {}")
    _, err = run_cell(
        ip,
        f"%%parallel dask={scheduler_file} progress=off chunksize=1\n"
        "for i in range(12):\n    time.sleep(0.05)\n    out[i] = i * i\n",
    )
    assert err is None
    assert ip.user_ns["out"] == {i: i * i for i in range(12)}
    answers = client.run(where_parloop_comes_from)
    assert len(answers) == 3
    assert all(".zip" in (w["parloop"] or "") for w in answers.values()), answers
