"""The JupyterLab extension in labextension/ (issue 6): its TypeScript unit
tests, the wheel that carries it, and a real JupyterLab in Debian's Chromium
driven by Playwright: the report timeline (live run, saved notebook, 64
workers), the commands and their settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from labserver import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DEADLINE_S,
    KERNEL_DEADLINE_S,
    require_browser,
    wait_js,
    wait_until,
    wait_visible,
)

ROOT = Path(__file__).resolve().parents[1]
LABEXT = ROOT / "labextension"
MIME = "application/vnd.parloop.report+json"


# ------------------------------------------------------------ unit tests (npm)


def _npm_with_node_modules() -> str:
    """npm, once labextension/node_modules holds the dev tools; else the test skips."""
    npm = shutil.which("npm")
    if npm is None or not (LABEXT / "node_modules").is_dir():
        pytest.skip("needs npm and labextension/node_modules (pip install -e . runs npm install)")
    return npm


def test_typescript_unit_tests() -> None:
    """`npm test` (vitest) over the pure modules of src/: the report reader,
    its text, the timeline layout and hit testing, the magic line."""
    npm = _npm_with_node_modules()
    proc = subprocess.run([npm, "test"], cwd=LABEXT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["lint", "format:check"])
def test_typescript_lint_and_format(script: str) -> None:
    """`npm run lint` (eslint.config.mjs) and `npm run format:check` (.prettierrc)
    pass over src/, so the TypeScript is held to its rules as the Python is to ruff."""
    npm = _npm_with_node_modules()
    proc = subprocess.run(
        [npm, "run", script], cwd=LABEXT, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------ the wheel


def _working_tree_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a commit would hold."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [p for p in out.split("\0") if p and (ROOT / p).is_file()]


@pytest.mark.slow
def test_wheel_from_a_clean_clone_carries_the_extension_once(tmp_path: Path) -> None:
    """`pip wheel .` in a fresh clone of the working tree runs npm install +
    build and puts the prebuilt extension in the wheel's data, and nowhere else."""
    if shutil.which("npm") is None or shutil.which("git") is None:
        pytest.skip("needs npm and git")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    src, clone, wheels = tmp_path / "src", tmp_path / "clone", tmp_path / "wheels"
    for rel in _working_tree_files():
        if "node_modules/" in rel:
            continue
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=src, check=True)
    subprocess.run([*git, "add", "-A"], cwd=src, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot"], cwd=src, check=True)
    subprocess.run(["git", "clone", "-q", str(src), str(clone)], check=True)
    assert not (clone / "labextension" / "dist").exists()
    assert not (clone / "labextension" / "node_modules").exists()

    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(wheels)],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(f"pip wheel from a clean clone: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (wheel,) = wheels.glob("parloop-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = next(n.split("/data/")[0] for n in names if ".data/data/" in n) + "/data/"
    ext = data + "share/jupyter/labextensions/parloop/"

    assert names.count(ext + "package.json") == 1
    entries = [n for n in names if n.rsplit("/", 1)[-1].startswith("remoteEntry.")]
    assert len(entries) == 1 and entries[0].startswith(ext + "static/"), entries
    assert (ext + "schemas/parloop/plugin.json") in names
    # Nothing of the build anywhere else: not in the package, no sources, no node_modules.
    stray = [
        n
        for n in names
        if not n.startswith(ext)
        and ("labextension" in n or "node_modules" in n or n.endswith((".ts", ".js")))
    ]
    assert stray == []
    built = json.loads(zipfile.ZipFile(wheel).read(ext + "package.json"))
    assert ext + built["jupyterlab"]["_build"]["load"] == entries[0]
    assert any(n.startswith("parloop/") and n.endswith("__init__.py") for n in names)


# ------------------------------------------------------------ the browser


def _synthetic_report(workers: int = 8, per_worker: int = 12) -> dict[str, Any]:
    """A report as report.py writes it: uneven chunks, two failed iterations,
    an engine that died, its chunk re-run elsewhere."""
    names = [f"engine {w}" for w in range(workers)]
    chunks: list[dict[str, Any]] = []
    start = 0
    clock = dict.fromkeys(names, 0.0)
    dead = names[min(5, workers - 1)]
    for k in range(per_worker):
        for w, name in enumerate(names):
            if name == dead and k >= per_worker // 2:
                continue
            count = 5 + (w * 7 + k * 3) % 11
            dur = count * (0.01 + 0.002 * ((w + k) % 5))
            t0 = clock[name] + 0.002
            chunks.append(
                {
                    "worker": name,
                    "start": start,
                    "count": count,
                    "t_start": round(t0, 6),
                    "t_end": round(t0 + dur, 6),
                    "failed": [],
                    "retried": False,
                }
            )
            clock[name] = t0 + dur
            start += count
    # the chunk the dead engine had in hand, re-run on engine 2
    lost = {
        "worker": names[2 % workers],
        "start": start,
        "count": 10,
        "t_start": round(clock[names[2 % workers]] + 0.002, 6),
        "failed": [],
        "retried": True,
    }
    lost["t_end"] = round(lost["t_start"] + 0.12, 6)
    chunks.append(lost)
    start += 10
    chunks[3]["failed"] = [chunks[3]["start"] + 2]
    mid = chunks[len(chunks) // 2]
    mid["failed"] = [mid["start"] + 1, mid["start"] + 4]
    wall = max(c["t_end"] for c in chunks) + 0.01
    rows = []
    for name in names:
        mine = [c for c in chunks if c["worker"] == name]
        rows.append(
            {
                "name": name,
                "iterations": sum(c["count"] for c in mine),
                "busy": round(sum(c["t_end"] - c["t_start"] for c in mine), 6),
                "chunks": len(mine),
                "failed": sum(len(c["failed"]) for c in mine),
            }
        )
    busy = sum(r["busy"] for r in rows)
    errors = [
        {"index": i, "values": f"x={i}", "type": "ValueError", "message": f"bad input {i}"}
        for c in chunks
        for i in c["failed"]
    ]
    return {
        "version": 1,
        "magic": "parallel",
        "backend": "engines",
        "total": start,
        "done": start,
        "wall": round(wall, 6),
        "busy": round(busy, 6),
        "speedup": round(busy / wall, 6),
        "imbalance": 0.18,
        "interrupted": False,
        "notes": [
            f"{dead} died; its chunk {lost['start']}-{lost['start'] + 9} was re-run "
            f"on {lost['worker']}"
        ],
        "workers": rows,
        "chunks": chunks,
        "errors": errors,
    }


def _bundle(report: dict[str, Any]) -> dict[str, Any]:
    return {
        MIME: report,
        "text/plain": f"parloop report: {len(report['chunks'])} chunks",
        "text/html": f"<b>parloop report</b>: {len(report['chunks'])} chunks",
    }


def _display_cell(report: dict[str, Any]) -> str:
    return (
        "import json\nfrom IPython.display import display\n"
        f"display(json.loads({json.dumps(json.dumps(_bundle(report)))}), raw=True)"
    )


BIG_CELL = """\
from IPython.display import display
chunks = [{"worker": f"engine {w}", "start": (k * 64 + w) * 4, "count": 4,
           "t_start": k * 0.05 + w * 0.0003, "t_end": k * 0.05 + 0.045 + w * 0.0003,
           "failed": [(k * 64 + w) * 4 + 1] if (k * 64 + w) % 997 == 0 else [], "retried": False}
          for k in range(320) for w in range(64)]
display({"application/vnd.parloop.report+json": {
    "version": 1, "magic": "parallel", "backend": "engines", "total": 4 * len(chunks),
    "done": 4 * len(chunks), "wall": 16.05, "busy": 920.0, "speedup": 57.3, "imbalance": 0.02,
    "interrupted": False, "notes": [], "errors": [],
    "workers": [{"name": f"engine {w}", "iterations": 1280, "busy": 14.4, "chunks": 320,
                 "failed": 0} for w in range(64)],
    "chunks": chunks}, "text/plain": "64 x 320 chunks"}, raw=True)
"""

REAL_RUN = """\
%%threaded threads=4 progress=off on_error=collect
import time
out = {}
for i in range(60):
    time.sleep(0.004 * (1 + i % 3))
    if i in (17, 42):
        raise ValueError(f"bad {i}")
    out[i] = i * i
"""

SHOW_REAL = """\
import parloop
from parloop.progress.report import report_bundle
bundle = report_bundle(parloop.last_run)
d = bundle["application/vnd.parloop.report+json"]
lanes = len({w["name"] for w in d["workers"]} | {c["worker"] for c in d["chunks"]})
print(f"real run: lanes={lanes} blocks={len(d['chunks'])}")
display(bundle, raw=True)
"""


def _notebook(cells: list[str], outputs: dict[int, list[dict[str, Any]]] | None = None) -> str:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for i, src in enumerate(cells):
        cell = nbformat.v4.new_code_cell(src)
        for out in (outputs or {}).get(i, []):
            cell.outputs.append(nbformat.v4.new_output("display_data", data=out))
        nb.cells.append(cell)
    return nbformat.writes(nb)


@pytest.fixture(scope="module")
def browser():
    """Chromium for the module's pages, once parloop's lab extension is known
    to be installed where JupyterLab finds it (the ``lab`` fixture's server
    is the session's, see labserver.py)."""
    require_browser()
    listed = subprocess.run(
        [sys.executable, "-m", "jupyter", "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next(
        (
            ln
            for ln in (listed.stdout + listed.stderr).splitlines()
            if ln.strip().startswith("parloop ")
        ),
        "",
    )
    assert "enabled" in line and "OK" in line, (
        "parloop's lab extension is not installed: `pip install -e .` builds it with npm\n"
        + listed.stdout
        + listed.stderr
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Lab:
    """One page of JupyterLab with a notebook open; collects parloop's console errors."""

    def __init__(self, browser, lab, name: str):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        # reset: only this notebook, not the ones earlier tests left in the workspace
        self.page.goto(lab.page_url(name))
        wait_js(self.page, "JupyterLab's app", "() => window.jupyterapp && window.jupyterapp.shell")
        wait_js(
            self.page,
            f"{name} to be open with its cells",
            """path => { const w = window.jupyterapp.shell.currentWidget;
                return w && w.context && w.context.path === path
                    && w.context.isReady && w.content.widgets.length > 0; }""",
            arg=lab.path(name),
        )
        self.panel = self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")

    def wait_kernel(self) -> None:
        wait_js(
            self.page,
            "the notebook's kernel to be connected and idle",
            """async () => { const w = window.jupyterapp.shell.currentWidget;
                await w.sessionContext.ready;
                const k = w.sessionContext.session && w.sessionContext.session.kernel;
                return !!k && k.connectionStatus === 'connected' && k.status === 'idle'; }""",
            timeout=KERNEL_DEADLINE_S,
            polling=250,
        )

    def command(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return self.page.evaluate(
            "([c, a]) => window.jupyterapp.commands.execute(c, a)", [cmd, args or {}]
        )

    def run_all(self) -> None:
        self.command("notebook:run-all-cells")
        wait_js(
            self.page,
            "every code cell to have run",
            """() => { const nb = window.jupyterapp.shell.currentWidget.content;
                return nb.widgets.every(c => c.model.type !== 'code' ||
                    (c.model.executionCount !== null && !c.node.querySelector('.jp-InputPrompt')
                        .textContent.includes('*'))); }""",
            timeout=KERNEL_DEADLINE_S,
            polling=250,
        )

    def activate(self, index: int) -> None:
        self.page.evaluate(
            "i => { window.jupyterapp.shell.currentWidget.content.activeCellIndex = i; }", index
        )

    def source(self, index: int) -> str:
        return self.page.evaluate(
            "i => window.jupyterapp.shell.currentWidget.content.widgets[i]"
            ".model.sharedModel.getSource()",
            index,
        )

    def wait_source(self, index: int, want: str) -> None:
        """Wait until cell ``index`` holds ``want``: a click runs its command
        after the click returns, so the edit is a state to wait for."""
        wait_js(
            self.page,
            f"cell {index} to read {want!r}",
            """([i, want]) => window.jupyterapp.shell.currentWidget.content.widgets[i]
                .model.sharedModel.getSource() === want""",
            arg=[index, want],
            found=lambda: self.source(index),
        )

    def timelines(self) -> list[dict[str, int]]:
        return self.page.evaluate(
            """() => [...document.querySelectorAll(
                    '.jp-NotebookPanel:not(.lm-mod-hidden) .parloop-timeline')]
                .map(t => { const c = t.querySelector('canvas');
                  return {lanes: +t.dataset.lanes, blocks: +t.dataset.blocks,
                          failed: +t.dataset.failed, retried: +t.dataset.retried,
                          width: c.width, height: c.height}; })"""
        )

    def parloop_errors(self) -> list[str]:
        return [e for e in self.errors if "parloop" in e]

    def close(self) -> None:
        self.context.close()


def _wait_drawn(page, count: int) -> None:
    wait_js(
        page,
        f"{count} drawn report timelines",
        """n => { const c = [...document.querySelectorAll(
                '.jp-NotebookPanel:not(.lm-mod-hidden) .parloop-timeline canvas')];
            return c.length >= n && c.every(x => x.width > 0 && x.height > 0); }""",
        arg=count,
        polling=200,
    )


@pytest.mark.browser
def test_timeline_of_a_live_run_and_of_the_saved_notebook(lab, browser, tmp_path: Path) -> None:
    synthetic = _synthetic_report()
    have_report = _has_report_bundle()
    cells = [_display_cell(synthetic), BIG_CELL]
    if have_report:
        cells += ["%load_ext parloop", REAL_RUN, SHOW_REAL]
    (lab.dir / "live.ipynb").write_text(_notebook(cells))

    ui = Lab(browser, lab, "live.ipynb")
    try:
        ui.wait_kernel()
        t0 = time.monotonic()
        ui.run_all()
        _wait_drawn(ui.page, 3 if have_report else 2)
        print(f"ran and drew {len(cells)} cells in {time.monotonic() - t0:.1f} s")
        shown = ui.timelines()
        lanes = len(synthetic["workers"])
        assert shown[0] == {
            **shown[0],
            "lanes": lanes,
            "blocks": len(synthetic["chunks"]),
            "failed": 3,
            "retried": 1,
        }
        assert shown[1]["lanes"] == 64 and shown[1]["blocks"] == 64 * 320
        if have_report:
            text = ui.panel.locator(".jp-OutputArea-output", has_text="real run:").inner_text()
            want = dict(kv.split("=") for kv in text.split("real run:")[1].split()[:2])
            assert shown[2]["lanes"] == int(want["lanes"]) >= 2
            assert shown[2]["blocks"] == int(want["blocks"]) >= shown[2]["lanes"]
            assert shown[2]["failed"] == 2

        # The fallbacks stay in the bundle, but the timeline is what JupyterLab shows.
        report = ui.panel.locator(".parloop-report").first
        assert "speedup" in report.locator(".parloop-report-header").inner_text()
        assert ui.panel.locator(".jp-OutputArea-output", has_text="parloop report: ").count() == 0

        # Hovering a block names its iterations and duration.
        box = report.locator("canvas").bounding_box()
        assert box is not None
        lane_h = 20  # laneHeightFor(8)
        t_max = max(synthetic["wall"], max(c["t_end"] for c in synthetic["chunks"]))
        first = synthetic["chunks"][0]
        x = 110 + (first["t_start"] + first["t_end"]) / 2 * (box["width"] - 200) / t_max
        ui.page.mouse.move(box["x"] + x, box["y"] + lane_h / 2)
        tip = report.locator(".parloop-timeline-tooltip")
        wait_visible(tip, "the tooltip of the hovered block")
        assert tip.inner_text().startswith(
            f"engine 0: iterations {first['start']}–{first['start'] + first['count'] - 1}"
        )
        shot = tmp_path / "timeline.png"
        report.screenshot(path=str(shot))
        print(f"timeline screenshot: {shot}")
        big = tmp_path / "timeline-64-workers.png"
        ui.panel.locator(".parloop-report").nth(1).screenshot(path=str(big))
        print(f"64-worker screenshot: {big}")
        if have_report:
            real = tmp_path / "timeline-real-run.png"
            ui.panel.locator(".parloop-report").nth(2).screenshot(path=str(real))
            print(f"real-run screenshot: {real}")
        ui.command("docmanager:save")
        wait_js(
            ui.page,
            "the notebook to be saved (not dirty)",
            "() => !window.jupyterapp.shell.currentWidget.context.model.dirty",
        )
        assert ui.parloop_errors() == []
    finally:
        ui.close()

    # The saved notebook, opened fresh: drawn from its outputs, nothing run.
    again = Lab(browser, lab, "live.ipynb")
    try:
        _wait_drawn(again.page, len(shown))
        assert [(s["lanes"], s["blocks"]) for s in again.timelines()] == [
            (s["lanes"], s["blocks"]) for s in shown
        ]
        assert again.parloop_errors() == []
    finally:
        again.close()


def _has_report_bundle() -> bool:
    try:
        from parloop.progress.report import report_bundle  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.browser
def test_untrusted_saved_notebook_renders_the_timeline(lab, browser) -> None:
    """A notebook written elsewhere (unsigned, so untrusted): the renderer is
    safe, so JupyterLab picks it over the sanitized HTML; no kernel work needed."""
    synthetic = _synthetic_report(workers=3, per_worker=4)
    (lab.dir / "saved.ipynb").write_text(
        _notebook(["# the report of an earlier run"], {0: [_bundle(synthetic)]})
    )
    ui = Lab(browser, lab, "saved.ipynb")
    try:
        _wait_drawn(ui.page, 1)
        (shown,) = ui.timelines()
        assert (shown["lanes"], shown["blocks"]) == (3, len(synthetic["chunks"]))
        assert ui.parloop_errors() == []
    finally:
        ui.close()


def _put_settings(lab, settings: dict[str, Any]) -> None:
    lab.api("PUT", "/lab/api/settings/parloop:plugin", {"raw": json.dumps(settings)})


@pytest.mark.browser
def test_commands_insert_and_replace_the_magic_line(lab, browser) -> None:
    _put_settings(
        lab,
        {
            "defaultMagic": "threaded",
            "threadedOptions": "threads=4",
            "parallelOptions": "processes=2",
        },
    )
    loop = "out = {}\nfor i in range(3):\n    out[i] = i * 2"
    (lab.dir / "commands.ipynb").write_text(
        _notebook([loop, "%%threaded threads=8 seed=3\n" + loop, "# markdown-ish"])
    )
    ui = Lab(browser, lab, "commands.ipynb")
    try:
        page = ui.page
        ui.activate(0)
        ui.command("parloop:parallelize-threads")
        assert ui.source(0) == "%%threaded threads=4\n" + loop
        ui.command("parloop:parallelize-processes")
        assert ui.source(0) == "%%parallel processes=2\n" + loop
        ui.command("parloop:parallelize-processes")
        assert ui.source(0) == "%%parallel processes=2\n" + loop
        # threads=8 is %%threaded's own; seed=3 is kept; the default fills processes.
        ui.activate(1)
        ui.command("parloop:parallelize-processes")
        assert ui.source(1) == "%%parallel seed=3 processes=2\n" + loop

        # The command palette lists the three commands; picking one edits the active cell.
        # As a person would: click the first cell (focus, command mode), then Ctrl+Shift+C,
        # pressed once the notebook holds the keyboard focus in command mode (a key
        # pressed before that goes nowhere), the palette then awaited as a state.
        # Something else may take the focus meanwhile on a busy machine (the
        # kernel coming up): the palette then closes again.  So each attempt
        # starts from the state a person would see, and the whole sequence is
        # retried (pressing Escape first) until one goes through or the deadline.
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        wanted = [
            "Parallelize loop (processes)",
            "Parallelize loop (threads)",
            "Explain parallel loop",
        ]
        labels = """() => [...document.querySelectorAll(
                '.lm-CommandPalette-item .lm-CommandPalette-itemLabel')].map(e => e.textContent)"""
        search = page.locator(".lm-CommandPalette-input")
        deadline = time.monotonic() + 2 * DEADLINE_S
        attempts = 0
        while True:
            attempts += 1
            try:
                ui.panel.locator(".jp-Cell").nth(0).locator(".jp-InputPrompt").click()
                wait_js(
                    page,
                    "cell 0 active in command mode, with the keyboard focus in the notebook",
                    """() => { const app = window.jupyterapp, nb = app.shell.currentWidget.content;
                        return nb.activeCellIndex === 0 && nb.mode === 'command'
                            && nb.node.contains(document.activeElement)
                            && app.commands.keyBindings.some(
                                b => b.command === 'apputils:activate-command-palette'); }""",
                    timeout=20,
                )
                page.keyboard.press("Control+Shift+C")
                wait_visible(search, "the command palette to open after Ctrl+Shift+C", timeout=10)
                search.fill("parallel loop", timeout=5000)
                wait_js(
                    page,
                    f"the palette to list {wanted}",
                    f"want => {{ const got = ({labels})(); return want.every(w => got.includes(w)); }}",
                    arg=wanted,
                    timeout=10,
                )
                assert (
                    page.evaluate(
                        "() => window.jupyterapp.shell.currentWidget.content.activeCellIndex"
                    )
                    == 0
                )
                page.locator(
                    ".lm-CommandPalette-item", has_text="Parallelize loop (threads)"
                ).click(timeout=5000)
                ui.wait_source(0, "%%threaded threads=4\n" + loop)
                break
            except (PlaywrightTimeout, AssertionError, pytest.fail.Exception):
                if time.monotonic() > deadline:
                    raise
                page.keyboard.press("Escape")
        print(f"palette: {attempts} attempt(s)")

        # The active cell's toolbar has both buttons.
        ui.activate(1)
        toolbar = ui.panel.locator(".jp-Cell.jp-mod-active .jp-cell-toolbar")
        button = toolbar.locator('[data-command="parloop:parallelize-threads"]')
        wait_visible(button, "the active cell's toolbar button parloop:parallelize-threads")
        assert toolbar.locator('[data-command="parloop:parallelize-processes"]').count() == 1
        button.click()
        ui.wait_source(1, "%%threaded seed=3 threads=4\n" + loop)

        # Explain: the analysis in the output, the cell's text untouched.
        ui.wait_kernel()
        ui.activate(2)
        page.evaluate(
            "() => window.jupyterapp.shell.currentWidget.content.widgets[2]"
            ".model.sharedModel.setSource('out = {}\\nfor i in range(3):\\n"
            "    out[i] = i * 2')"
        )
        ui.command("parloop:explain")
        out = ui.panel.locator(".jp-Cell").nth(2).locator(".jp-OutputArea-output")

        def explained() -> bool:
            texts = out.all_inner_texts()
            return bool(texts) and "parloop threaded" in texts[0] and "threads:  4" in texts[0]

        wait_until(
            page,
            "the explanation (parloop threaded, threads:  4) in cell 2's output",
            explained,
            timeout=KERNEL_DEADLINE_S,
            found=out.all_inner_texts,
        )
        assert ui.source(2) == loop
        assert ui.parloop_errors() == []
    finally:
        ui.close()
        _put_settings(lab, {})


@pytest.mark.browser
def test_a_bad_report_is_reported_and_lab_keeps_working(lab, browser) -> None:
    bad = {MIME: {"version": 99}, "text/plain": "bad report"}
    (lab.dir / "bad.ipynb").write_text(
        _notebook(["# a report from the future", "1 + 1"], {0: [bad]})
    )
    ui = Lab(browser, lab, "bad.ipynb")
    try:
        wait_visible(ui.panel.locator(".parloop-report-error"), "the report's error message")
        shown = ui.panel.locator(".parloop-report-error").inner_text()
        assert "unsupported report version 99" in shown
        wait_until(
            ui.page,
            "parloop's console error about the report",
            lambda: any(e.startswith("parloop: cannot render the run report") for e in ui.errors),
            found=lambda: ui.errors,
        )
        ui.wait_kernel()
        ui.activate(1)
        ui.command("notebook:run-cell")
        wait_visible(
            ui.panel.locator(".jp-Cell").nth(1).locator(".jp-OutputArea-output", has_text="2"),
            "the output 2 of `1 + 1`",
            timeout=KERNEL_DEADLINE_S,
        )
    finally:
        ui.close()
