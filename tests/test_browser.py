"""The live view in a real browser (issue 5): JupyterLab 4 started by the test
on 127.0.0.1, Debian's Chromium driven by Playwright.

A ``%%threaded`` and a ``%%parallel`` cell whose iterations take 0.1 s: while
each runs, the page shows one progress row per worker and their values grow
(read twice, seconds apart); when it ends, the report takes the widget's place;
after the notebook is saved and reopened, the reports are still rendered.
Screenshots of the running and the reopened notebook go to the test's tmp_path
(their paths are printed: ``pytest -s``).

Needs ``/usr/bin/chromium`` (``make test-browser`` installs it) and the
``jupyterlab`` and ``playwright`` packages; skipped without them.  Playwright
drives the system Chromium, so no ``playwright install`` is needed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (make test-browser installs it)", allow_module_level=True)
pytest.importorskip("jupyterlab")
sync_api = pytest.importorskip("playwright.sync_api")
nbformat = pytest.importorskip("nbformat")

CELLS = [
    "%load_ext parloop\nimport time\nout = {}",
    "%%threaded threads=2\nfor i in range(100):\n    time.sleep(0.1)\n    out[i] = i",
    "%%parallel processes=2\nfor i in range(80):\n    time.sleep(0.1)\n    out[i] = i",
    "%parallel_stop",
]
THREADED, PARALLEL = 1, 2
REPORT_MIME = "application/vnd.parloop.report+json"

#: the kernel's websocket is ready only after the idle indicator shows: wait on
#: the session's kernel itself (the app is exposed by --expose-app-in-browser)
KERNEL_READY = """() => {
  const app = window.jupyterapp;
  const w = app && app.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session
            && w.sessionContext.session.kernel;
  return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""
EXECUTED = """(i) => {
  const w = window.jupyterapp.shell.currentWidget;
  const cell = w.content.widgets[i];
  return cell.model.executionCount !== null
         && !cell.node.querySelector('.jp-InputPrompt').textContent.includes('*');
}"""
SAVED = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  return !!w && !!w.context && !w.context.model.dirty;
}"""
ROWS = """els => els.map(e => ({
  width: parseFloat(e.querySelector('.widget-hprogress .progress-bar').style.width) || 0,
  text: e.innerText}))"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server of our own: loopback only, a random token, its own
    root, config, data, settings and workspace folders; stopped (by pid) at the end."""
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    settings = base / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # no "receive news?" toast over the notebook
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "PARLOOP_PROGRESS"}
    env.update(
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        IPYTHONDIR=str(base / "ipython"),
    )
    log = open(base / "lab.log", "wb")
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
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(
                        "JupyterLab did not start:\n" + (base / "lab.log").read_text()[-3000:]
                    )
                time.sleep(0.5)
        yield url, token, root
    finally:
        proc.terminate()  # the server shuts its kernels down (and they their engines)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture
def page(lab):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1000})
        finally:
            browser.close()


def _open(page, url: str, token: str, name: str) -> None:
    page.goto(f"{url}/lab/tree/{name}?reset&token={token}")
    page.wait_for_function(KERNEL_READY, timeout=60_000, polling=250)


def _run(page, index: int) -> None:
    """Select a cell (its prompt: command mode) and press Shift+Enter."""
    page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")


def _rows(page, index: int) -> list[dict]:
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    return cell.locator(".parloop-worker").evaluate_all(ROWS)


def _done(rows: list[dict]) -> list[int]:
    return [int(re.search(r"([\d,]+) it", r["text"]).group(1).replace(",", "")) for r in rows]


def _watch_live(page, index: int, workers: int) -> tuple[list[dict], list[dict]]:
    """Two readings of the running cell's worker rows, two seconds apart."""
    page.wait_for_function(
        f"""() => document.querySelectorAll('.jp-Notebook .jp-Cell')[{index}]
                 .querySelectorAll('.parloop-worker .widget-hprogress .progress-bar')
                 .length >= {workers}""",
        timeout=90_000,
        polling=100,
    )
    first = _rows(page, index)
    time.sleep(2.0)
    second = _rows(page, index)
    return first, second


def _report_shown(page, index: int) -> None:
    page.wait_for_function(
        f"""() => {{
          const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[{index}];
          return !!cell.querySelector('.jp-OutputArea .parloop-report')
                 && !cell.querySelector('.parloop-worker');
        }}""",
        timeout=60_000,
        polling=200,
    )


@pytest.mark.timeout(240)
def test_live_rows_then_report_survives_reopen(lab, page, tmp_path):
    url, token, root = lab
    nb = nbformat.v4.new_notebook(
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        }
    )
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nbformat.write(nb, root / "live.ipynb")

    _open(page, url, token, "live.ipynb")
    _run(page, 0)
    page.wait_for_function(EXECUTED, arg=0, timeout=30_000)

    shots = {}
    for index, workers in ((THREADED, 2), (PARALLEL, 2)):
        _run(page, index)
        first, second = _watch_live(page, index, workers)
        assert len(first) == len(second) == workers, (first, second)
        assert sum(_done(second)) > sum(_done(first)), (first, second)
        assert sum(r["width"] for r in second) > sum(r["width"] for r in first)
        if index == PARALLEL:
            assert all(r["text"].startswith("engine ") for r in second), second
            shots["running"] = tmp_path / "running.png"
            page.screenshot(path=str(shots["running"]), full_page=True)
        _report_shown(page, index)
    _run(page, 3)
    page.wait_for_function(EXECUTED, arg=3, timeout=60_000)

    page.keyboard.press("Control+s")
    page.wait_for_function(SAVED, timeout=30_000)
    saved = nbformat.read(root / "live.ipynb", as_version=4)
    for index in (THREADED, PARALLEL):
        data = [o.data for o in saved.cells[index].outputs if o.output_type == "display_data"]
        assert len(data) == 1 and {"text/plain", "text/html", REPORT_MIME} <= set(data[0])

    # reopen from disk (a fresh page, no workspace): the reports render again
    _open(page, url, token, "live.ipynb")
    for index in (THREADED, PARALLEL):
        _report_shown(page, index)
    report = page.locator(".jp-Notebook .jp-Cell").nth(PARALLEL).locator(".parloop-report")
    assert "80" in report.inner_text() and report.locator(".parloop-report-error").count() == 0
    shots["reopened"] = tmp_path / "reopened.png"
    page.screenshot(path=str(shots["reopened"]), full_page=True)
    for name, path in shots.items():
        assert Path(path).stat().st_size > 10_000
        print(f"screenshot ({name}): {path}")
