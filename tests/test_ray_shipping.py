"""Ray workers without parloop (issue 15): a Ray head started by another
Python environment, one without parloop, IPython, pyzmq or ipyparallel
(tests/bareenv.py), used from the notebook through ``%%parallel ray=ADDRESS``.

parloop finds on first contact that the workers lack it and connects again
with its own package as the job's ``runtime_env`` ``py_modules``; the loops
then give the serial answer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from bareenv import bare_env, make_bare_python, run_cells, where_parloop_comes_from
from helpers import stop_processes

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bare_ray(tmp_path_factory):
    """A 2-CPU Ray head run by the bare environment (``ray start --block``,
    stopped by pid with the processes it started); yields its address."""
    python = make_bare_python(tmp_path_factory.mktemp("bare-env"))
    temp_dir = tempfile.mkdtemp(prefix="pl-rayb-")  # short: socket paths
    port = _free_port()
    env = bare_env()
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "disabled"  # the kernel's token setup is Ray's business, not this test's
    head = subprocess.Popen(
        [
            python,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, "the bare Ray head exited"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the bare Ray head did not start"
            time.sleep(0.2)
        time.sleep(2)  # the raylet registers after the GCS listens
        yield address
    finally:
        from parloop.backends.ray import RayBackend

        RayBackend.shutdown()  # the kernel's connection
        stop_processes([head])
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_workers_without_parloop_get_it_with_the_tasks(ip, bare_ray):
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        run_cells(ip, f"%%parallel ray={bare_ray} progress=off", "ray", "not installed on the Ray")
        # where the tasks' parloop came from: the job's package, not this
        # environment (make_bare_python checked that it has none)
        from parloop.backends.ray import _CONN

        conn = _CONN[0]
        assert conn is not None and conn.runtime_env is not None
        where = ray.get(ray.remote(where_parloop_comes_from).remote(), timeout=120)
        assert where["parloop"] and "runtime_resources" in where["parloop"], where
        assert where["imported"] == [], where
    finally:
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved
