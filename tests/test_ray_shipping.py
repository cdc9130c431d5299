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

from bareenv import bare_env, make_bare_python, where_parloop_comes_from
from helpers import differential, stop_processes

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


CELLS = [
    (
        "import numpy as np\n"
        "class Scaler:\n    def __init__(self, k):\n        self.k = k\n"
        "    def __call__(self, v):\n        return v * self.k\n"
        "def shape(v):\n    return float(np.sin(v))\n"
        "s = Scaler(3)\nout = {}\ntotal = 0",
        "for i in range(40):\n    out[i] = s(shape(i))\n    total += i\n"
        "    if i % 10 == 0:\n        print('at', i)\n",
        ["out", "total", "i"],
    ),
    ("x = [1.0] + [0.0] * 12", "for i in range(12):\n    x[i + 1] = x[i] * 1.5 + i\n", ["x"]),
]


def test_ray_workers_without_parloop_get_it_with_the_tasks(ip, bare_ray):
    import parloop

    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        magic = f"%%parallel ray={bare_ray} progress=off"
        for n, (setup, cell, checks) in enumerate(CELLS):
            differential(ip, setup, cell, magic, checks)
            assert parloop.last_run.backend == "ray"
            if n == 0:  # the run that found the workers without parloop says so
                assert any("not installed on the Ray" in m for m in parloop.last_run.notes), (
                    parloop.last_run.notes
                )
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
