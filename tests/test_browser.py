"""The live view in a real browser (issue 5): the session's JupyterLab 4
(conftest.py's ``lab``, see labserver.py), Debian's Chromium driven by
Playwright.

A ``%%threaded`` and a ``%%parallel`` cell whose iterations take 0.1 s: while
each runs, the page shows one progress row per worker and their values grow
(read once, then again once they have grown); when it ends, the report takes
the widget's place; after the notebook is saved and reopened, the reports are
still rendered.  Screenshots of the running and the reopened notebook go to
the test's tmp_path (their paths are printed: ``pytest -s``).

Skipped without ``/usr/bin/chromium`` (``make test-browser`` installs it) or
the ``jupyterlab``, ``playwright`` and ``nbformat`` packages.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from labserver import CHROMIUM, CHROMIUM_ARGS, KERNEL_DEADLINE_S, wait_js

pytestmark = pytest.mark.browser

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


@pytest.fixture
def page(lab):
    """A fresh Chromium page (the ``lab`` fixture skips without Chromium)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1000})
        finally:
            browser.close()


def _open(page, lab, name: str) -> None:
    page.goto(lab.page_url(name))
    wait_js(page, f"{name}'s kernel to be connected and idle", KERNEL_READY, timeout=90)


def _run(page, index: int) -> None:
    """Select a cell (its prompt: command mode) and press Shift+Enter."""
    page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")


def _executed(page, index: int, timeout: float = KERNEL_DEADLINE_S) -> None:
    wait_js(page, f"cell {index} to finish running", EXECUTED, arg=index, timeout=timeout)


def _rows(page, index: int) -> list[dict]:
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    return cell.locator(".parloop-worker").evaluate_all(ROWS)


def _done(rows: list[dict]) -> list[int]:
    return [int(re.search(r"([\d,]+) it", r["text"]).group(1).replace(",", "")) for r in rows]


#: the worker rows of cell ``i`` have all grown past the given iteration
#: counts and bar widths (the progress of a running cell, read from the page)
GROWN = """([i, done, width]) => {
  const rows = [...document.querySelectorAll('.jp-Notebook .jp-Cell')[i]
                .querySelectorAll('.parloop-worker')];
  const n = rows.map(e => +(/([\\d,]+) it/.exec(e.innerText) || ['', '0'])[1]
                               .replace(/,/g, ''));
  const w = rows.map(e => parseFloat(
      e.querySelector('.widget-hprogress .progress-bar').style.width) || 0);
  return n.reduce((a, b) => a + b, 0) > done && w.reduce((a, b) => a + b, 0) > width;
}"""


def _watch_live(page, index: int, workers: int) -> tuple[list[dict], list[dict]]:
    """Two readings of the running cell's worker rows: the first once all
    its rows show, the second once their counts and bars have grown (a
    state, not a fixed pause: a slow machine waits longer, never fails for it)."""
    wait_js(
        page,
        f"{workers} worker rows in cell {index}",
        f"""() => document.querySelectorAll('.jp-Notebook .jp-Cell')[{index}]
                 .querySelectorAll('.parloop-worker .widget-hprogress .progress-bar')
                 .length >= {workers}""",
        timeout=KERNEL_DEADLINE_S,
    )
    first = _rows(page, index)
    wait_js(
        page,
        f"the worker rows of cell {index} to grow past {first}",
        GROWN,
        arg=[index, sum(_done(first)), sum(r["width"] for r in first)],
    )
    second = _rows(page, index)
    return first, second


def _report_shown(page, index: int) -> None:
    wait_js(
        page,
        f"cell {index}'s report to replace its widget",
        f"""() => {{
          const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[{index}];
          return !!cell.querySelector('.jp-OutputArea .parloop-report')
                 && !cell.querySelector('.parloop-worker');
        }}""",
        timeout=KERNEL_DEADLINE_S,
        polling=200,
    )


@pytest.mark.timeout(240)
def test_live_rows_then_report_survives_reopen(lab, page, tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        }
    )
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nbformat.write(nb, lab.dir / "live.ipynb")

    _open(page, lab, "live.ipynb")
    _run(page, 0)
    _executed(page, 0)

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
    _executed(page, 3)

    page.keyboard.press("Control+s")
    wait_js(page, "the notebook to be saved (not dirty)", SAVED)
    saved = nbformat.read(lab.dir / "live.ipynb", as_version=4)
    for index in (THREADED, PARALLEL):
        data = [o.data for o in saved.cells[index].outputs if o.output_type == "display_data"]
        assert len(data) == 1 and {"text/plain", "text/html", REPORT_MIME} <= set(data[0])

    # reopen from disk (a fresh page, no workspace): the reports render again
    _open(page, lab, "live.ipynb")
    for index in (THREADED, PARALLEL):
        _report_shown(page, index)
    report = page.locator(".jp-Notebook .jp-Cell").nth(PARALLEL).locator(".parloop-report")
    assert "80" in report.inner_text() and report.locator(".parloop-report-error").count() == 0
    shots["reopened"] = tmp_path / "reopened.png"
    page.screenshot(path=str(shots["reopened"]), full_page=True)
    for name, path in shots.items():
        assert Path(path).stat().st_size > 10_000
        print(f"screenshot ({name}): {path}")
