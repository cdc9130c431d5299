"""One JupyterLab server for the browser tests (test_browser.py and
test_labextension.py), and waits that say what they waited for.

The server is started once per test session by the ``lab_server`` fixture in
conftest.py (a JupyterLab takes seconds of a busy machine's CPU to start, and
the two modules used to start one each).  Each test gets the ``lab`` fixture:
the same server, seen through a folder of the test's own, so that two tests
never open the same notebook path (JupyterLab keys kernel sessions by path: a
second test would find the first one's kernel and its variables); the kernels
a test started are shut down after it.

Needs Debian's Chromium at ``/usr/bin/chromium`` (``make chromium`` installs
it) and the ``jupyterlab``, ``playwright`` and ``nbformat`` packages; the
fixtures skip without them.  Playwright drives the system Chromium, so no
``playwright install`` is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

#: how long a browser test waits for the page to reach a state before it
#: fails: generous, because a wait on a state returns as soon as the state is
#: reached (a busy machine makes the test slower, not red)
DEADLINE_S = 60.0
#: a kernel's start, or a cell that starts engines, gets longer
KERNEL_DEADLINE_S = 120.0


def require_browser() -> None:
    """Skip the calling test (or fixture) without Chromium or the packages."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (make chromium installs it)")
    for module in ("jupyterlab", "playwright.sync_api", "nbformat"):
        pytest.importorskip(module)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LabServer:
    """A running JupyterLab, and the folder of its root one test works in."""

    url: str
    token: str
    root: Path  # the server's root_dir
    log: Path  # the server's output
    folder: str = ""  # the test's folder, relative to ``root``

    @property
    def dir(self) -> Path:
        """Where the test writes its notebooks."""
        return self.root / self.folder

    def path(self, name: str) -> str:
        """A notebook's path as JupyterLab names it (relative to the root)."""
        return f"{self.folder}/{name}" if self.folder else name

    def page_url(self, name: str) -> str:
        """The notebook alone in a fresh workspace (``?reset``: not the
        notebooks earlier tests left open)."""
        return f"{self.url}/lab/tree/{self.path(name)}?reset&token={self.token}"

    def for_test(self, name: str) -> "LabServer":
        """This server, seen from a new folder of its own."""
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]
        (self.root / folder).mkdir(parents=True, exist_ok=False)
        return replace(self, folder=folder)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """A call of the server's REST API; the decoded JSON reply (or None)."""
        req = urllib.request.Request(
            f"{self.url}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def shutdown_kernels(self) -> None:
        """Shut down every kernel session (and so the engines its kernel
        started): after a test, nothing of it runs on into the next one."""
        for session in self.api("GET", "/api/sessions"):
            with contextlib.suppress(OSError):  # it ended meanwhile
                self.api("DELETE", f"/api/sessions/{session['id']}")


@contextlib.contextmanager
def running_lab(base: Path) -> Iterator[LabServer]:
    """Start JupyterLab on 127.0.0.1 with a random token and its own root,
    config, data, runtime, settings and workspace folders under ``base``;
    stop it (by pid: the process this started) at the end.

    Nothing of the machine's own Jupyter set-up reaches it but what is
    installed in this Python's prefix (parloop's lab extension, the widgets'
    manager); no "receive news?" toast covers the notebook (the announcements
    plugin is disabled)."""
    root, cfg = base / "root", base / "config"
    root.mkdir()
    (cfg / "labconfig").mkdir(parents=True)
    (cfg / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    env = {k: v for k, v in os.environ.items() if k != "PARLOOP_PROGRESS"}
    env.update(
        JUPYTER_CONFIG_DIR=str(cfg),
        JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        IPYTHONDIR=str(base / "ipython"),
    )
    port, token = _free_port(), secrets.token_hex(16)
    log_path = base / "lab.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--expose-app-in-browser",
            f"--LabApp.user_settings_dir={base / 'settings'}",
            f"--LabApp.workspaces_dir={base / 'workspaces'}",
            "--LabApp.news_url=None",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(
                        "JupyterLab did not start within 90 s:\n" + log_path.read_text()[-4000:]
                    )
                time.sleep(0.5)
        yield LabServer(url=url, token=token, root=root, log=log_path)
    finally:
        proc.terminate()  # the server shuts its kernels down (and they their engines)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


# ------------------------------------------------------------ waits on state


def _fail(what: str, timeout: float, found: Callable[[], Any] | None) -> None:
    message = f"waited {timeout:.0f} s for {what}"
    if found is not None:
        message += f"; found: {found()!r}"
    pytest.fail(message)


def wait_js(
    page: Any,
    what: str,
    expression: str,
    arg: Any = None,
    timeout: float = DEADLINE_S,
    polling: int = 100,
    found: Callable[[], Any] | None = None,
) -> Any:
    """Wait until the page's JavaScript ``expression`` (a function, given
    ``arg``) returns something truthy; fail saying ``what`` was awaited (and
    what ``found()`` reads then, where given)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        return page.wait_for_function(
            expression, arg=arg, timeout=timeout * 1000, polling=polling
        ).json_value()
    except PlaywrightTimeout:
        _fail(what, timeout, found)


def wait_visible(locator: Any, what: str, timeout: float = DEADLINE_S) -> None:
    """Wait until ``locator`` matches a visible element; fail saying ``what``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.first.wait_for(state="visible", timeout=timeout * 1000)
    except PlaywrightTimeout:
        _fail(what, timeout, None)


def wait_until(
    page: Any,
    what: str,
    condition: Callable[[], Any],
    timeout: float = DEADLINE_S,
    found: Callable[[], Any] | None = None,
) -> Any:
    """Wait until the Python ``condition()`` is truthy (a state only the test's
    side sees, such as the console messages Playwright has delivered: they
    arrive while the page is polled); fail saying ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            _fail(what, timeout, found)
        page.wait_for_timeout(100)  # the poll interval; Playwright delivers events meanwhile
