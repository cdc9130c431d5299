"""Shared fixtures: one in-process IPython shell with parloop loaded; the
managed 2-engine cluster; the session's one JupyterLab server."""

from __future__ import annotations

import signal

import pytest

# The interrupt tests send SIGINT to this process, as Jupyter does to a
# kernel.  A shell without job control that starts pytest in the background
# (`cmd &`) leaves SIGINT ignored, and Python keeps it so: every interrupt
# test then failed.  Put back what a kernel has (its children, engines and
# Ray's processes among them, then start with the default again).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def ip():
    """``InteractiveShell.instance()`` (history in memory) with ``%load_ext parloop``."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from helpers import run_cell

    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=cfg)
    _, err = run_cell(shell, "%load_ext parloop")
    assert err is None, err
    yield shell


@pytest.fixture(scope="module")
def cluster(ip):
    """The managed cluster of 2 engines, started by the magic itself (before
    the module's first test that needs it, so that no test times the start)
    and stopped at the end of the module."""
    pytest.importorskip("ipyparallel")
    from helpers import reset, run_cell

    reset(ip)
    _, err = run_cell(
        ip, "%%parallel processes=2 progress=off\nwarm = {}\nfor i in range(4):\n    warm[i] = i\n"
    )
    assert err is None, f"{type(err).__name__}: {err}"
    assert ip.user_ns["warm"] == {0: 0, 1: 1, 2: 2, 3: 3}
    yield
    run_cell(ip, "%parallel_stop")


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory):
    """The one JupyterLab of the session (see labserver.py), started by the
    first test that needs it; skipped without Chromium or the packages."""
    from labserver import require_browser, running_lab

    require_browser()
    with running_lab(tmp_path_factory.mktemp("lab")) as server:
        yield server


@pytest.fixture
def lab(lab_server, request):
    """The session's JupyterLab for one test: a folder of the test's own
    (``lab.dir``, ``lab.path(name)``), its kernels shut down after it."""
    server = lab_server.for_test(request.node.name)
    yield server
    server.shutdown_kernels()
