"""The live view (docs/design.md §6, issue 5): the widget in a real kernel (nbclient,
``store_widget_state=True``), the report it leaves, the text fallback, and the
widget's rendering rules on synthetic runs (grouping, interrupt, throttle)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from parloop.progress.base import LiveState, WorkerState
from parloop.progress.report import MIME, report_bundle
from parloop.record import ChunkRecord, IterationError, LastRun, WorkerTotals

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipywidgets")

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

# cell sources: each a bit over a second, so that the widget appears (DELAY)
SETUP = "%load_ext parloop\nimport os, time\nout = {}"
THREADED = "%%threaded threads=2\nfor i in range(60):\n    time.sleep(0.05)\n    out[i] = i"
FAILING = (
    "%%threaded threads=2 on_error=collect\nfor i in range(60):\n"
    "    time.sleep(0.05)\n    if i == 7:\n        raise ValueError('seven')\n"
    "    out[i] = i"
)
RAISING = (
    "%%threaded threads=2\nfor i in range(60):\n    time.sleep(0.05)\n"
    "    if i == 50:\n        raise KeyError(i)\n    out[i] = i"
)
MANY = "%%threaded threads=2\nfor i in range(20_000):\n    time.sleep(0.0001)\n    out[i] = i"
QUICK = "%%threaded threads=2\nfor i in range(10):\n    out[i] = i"
PARALLEL = "%%parallel processes=2\nfor i in range(40):\n    time.sleep(0.05)\n    out[i] = i"
TEXT = (
    "os.environ['PARLOOP_PROGRESS'] = 'text'\n"
    "get_ipython().run_cell_magic('threaded', 'threads=2', "
    "'for i in range(60):\\n    time.sleep(0.05)\\n    out[i] = i')"
)
OFF = "%%threaded threads=2 progress=off\nfor i in range(60):\n    time.sleep(0.05)\n    out[i] = i"
CELLS = [SETUP, THREADED, FAILING, RAISING, MANY, QUICK, PARALLEL, TEXT, OFF, "%parallel_stop"]


class CountingClient(nbclient.NotebookClient):
    """Counts the comm messages (opens and updates) each cell sends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.comm_msgs: dict[int, int] = {}
        self.opened: dict[int, list[str]] = {}

    def handle_comm_msg(self, outs, msg, cell_index):
        self.comm_msgs[cell_index] = self.comm_msgs.get(cell_index, 0) + 1
        if msg["msg_type"] == "comm_open":
            self.opened.setdefault(cell_index, []).append(msg["content"]["comm_id"])
        super().handle_comm_msg(outs, msg, cell_index)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    client = CountingClient(
        nb,
        timeout=120,
        kernel_name="python3",
        allow_errors=True,
        store_widget_state=True,
        resources={"metadata": {"path": str(tmp_path_factory.mktemp("nb"))}},
    )
    client.execute()
    path = tmp_path_factory.mktemp("saved") / "live.ipynb"
    nbformat.write(nb, path)
    saved = nbformat.read(path, as_version=4)
    nbformat.validate(saved)
    return saved, client


def _state(nb) -> dict[str, dict]:
    return {k: v["state"] for k, v in nb.metadata["widgets"][WIDGET_STATE]["state"].items()}


def _ref(model_id: str) -> str:
    return model_id.removeprefix("IPY_MODEL_")


def _views(nb, client, cell: int) -> tuple[dict, list[dict]]:
    """(header bar, [worker row bars]) of the widget a cell opened."""
    state = _state(nb)
    boxes = [state[c] for c in client.opened.get(cell, []) if c in state]
    header = [b for b in boxes if "parloop-header" in b.get("_dom_classes", ())]
    rows = [b for b in boxes if "parloop-worker" in b.get("_dom_classes", ())]
    assert len(header) == 1, f"cell {cell}: {len(header)} widget headers"
    bar = lambda box: next(
        state[_ref(c)]
        for c in box["children"]  # noqa: E731
        if state[_ref(c)]["_model_name"] == "IntProgressModel"
    )
    return bar(header[0]), [bar(r) for r in rows]


def _report(cell) -> dict:
    """The report output of a cell (the widget's place, once the run ended)."""
    found = [
        o for o in cell.outputs if o.output_type == "display_data" and MIME in o.get("data", {})
    ]
    assert len(found) == 1, [o.get("data", {}).keys() for o in cell.outputs]
    assert not any(WIDGET_VIEW in o.get("data", {}) for o in cell.outputs)
    data = found[0].data
    assert {"text/plain", "text/html", MIME} <= set(data)
    return data


def _errors(cell) -> list:
    return [o for o in cell.outputs if o.output_type == "error"]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_widget_final_values(executed):
    nb, client = executed
    assert not _errors(nb.cells[1])
    header, rows = _views(nb, client, 1)
    assert header["value"] == header["max"] == 60 and header["bar_style"] == "success"
    assert len(rows) == 2
    for bar in rows:  # done == total on every worker row that worked
        assert 0 < bar["value"] == bar["max"] and bar["bar_style"] == "success"
    assert sum(bar["value"] for bar in rows) == 60


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_widget_error_state(executed):
    nb, client = executed
    header, rows = _views(nb, client, 2)
    assert header["bar_style"] == "danger"
    assert sorted(bar["bar_style"] for bar in rows) == ["danger", "success"]
    data = _report(nb.cells[2])
    assert data[MIME]["errors"] == [
        {"index": 7, "values": "i=7", "type": "ValueError", "message": "seven"}
    ]
    assert "iteration 7 (i=7): ValueError: seven" in data["text/plain"]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_report_after_a_raise(executed):
    """on_error=raise: the report (written after the cell) has the failure too."""
    nb, client = executed
    assert _errors(nb.cells[3])[0].ename == "KeyError"
    header, _ = _views(nb, client, 3)
    assert header["bar_style"] == "danger"
    report = _report(nb.cells[3])[MIME]
    # iterations 0..49 applied; the record counts the one that raised as run
    assert report["done"] in (50, 51) and report["wall"] > 1.0
    assert [e["index"] for e in report["errors"]] == [50]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_comm_messages_bounded(executed):
    """20 000 iterations: a few renders a second, not an update per iteration."""
    nb, client = executed
    assert not _errors(nb.cells[4])
    report = _report(nb.cells[4])[MIME]
    assert report["done"] == 20_000 and report["wall"] > 1.0
    sent = client.comm_msgs[4]
    # opens (~20 models) plus a handful of updates per render, four renders a second
    assert sent < 40 + 30 * report["wall"], (sent, report["wall"])
    header, rows = _views(nb, client, 4)
    assert header["value"] == 20_000
    assert all(bar["value"] == bar["max"] for bar in rows)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_cell_is_quiet(executed):
    nb, client = executed
    assert nb.cells[5].outputs == [] and 5 not in client.comm_msgs


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_engines_widget(executed):
    nb, client = executed
    assert not _errors(nb.cells[6]), _errors(nb.cells[6])
    header, rows = _views(nb, client, 6)
    assert header["value"] == 40 and len(rows) == 2
    assert all(0 < bar["value"] == bar["max"] for bar in rows)
    report = _report(nb.cells[6])[MIME]
    assert sorted(w["name"].split(" (")[0] for w in report["workers"]) == ["engine 0", "engine 1"]
    assert sum(c["count"] for c in report["chunks"]) == 40


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_text_fallback_and_off(executed):
    nb, client = executed
    text = nb.cells[7]
    assert 7 not in client.comm_msgs  # PARLOOP_PROGRESS=text: no widget
    streams = "".join(o.text for o in text.outputs if o.output_type == "stream")
    assert "60/60" in streams
    off = nb.cells[8]
    assert off.outputs == [] and 8 not in client.comm_msgs


# ---------------------------------------------------------------------------
# the report's schema, and the widget's rules, on synthetic runs
# ---------------------------------------------------------------------------
def _record(workers: int, per_worker: int = 10, **kw) -> LastRun:
    rec = LastRun(
        magic="parallel",
        backend="engines",
        options={},
        workers=workers,
        total=workers * per_worker,
        **kw,
    )
    t = 0.0
    for w in range(workers):
        name = f"engine {w} (host:{100 + w})"
        rec.chunks.append(
            ChunkRecord(
                w * per_worker,
                per_worker,
                name,
                t,
                t + 1.0 + w / 10,
                1.0,
                failed=[w * per_worker] if w == 1 else [],
            )
        )
        rec.by_worker[name] = WorkerTotals(name, per_worker, 1.0, int(w == 1), 1)
    rec.done = workers * per_worker
    rec.wall = 2.0
    rec.errors.append(
        IterationError(per_worker, ZeroDivisionError("division by zero"), values="i=10")
    )
    return rec


def test_report_schema():
    bundle = report_bundle(_record(3))
    d = json.loads(json.dumps(bundle[MIME]))  # plain JSON
    assert list(d) == [
        "version",
        "magic",
        "backend",
        "total",
        "done",
        "wall",
        "busy",
        "speedup",
        "imbalance",
        "interrupted",
        "notes",
        "workers",
        "chunks",
        "errors",
    ]
    assert d["version"] == 1 and d["total"] == 30 and d["done"] == 30
    assert d["busy"] == pytest.approx(3.3) and d["speedup"] == pytest.approx(1.65)
    assert d["imbalance"] == pytest.approx(1.2 / 1.1 - 1)
    assert d["workers"][1] == {
        "name": "engine 1 (host:101)",
        "iterations": 10,
        "busy": 1.1,
        "chunks": 1,
        "failed": 1,
    }
    assert d["chunks"][1] == {
        "worker": "engine 1 (host:101)",
        "start": 10,
        "count": 10,
        "t_start": 0.0,
        "t_end": 1.1,
        "failed": [10],
        "retried": False,
    }
    assert d["errors"] == [
        {"index": 10, "values": "i=10", "type": "ZeroDivisionError", "message": "division by zero"}
    ]
    assert "speedup 1.65×" in bundle["text/plain"]
    assert 'class="parloop-report"' in bundle["text/html"]


def _live(record: LastRun) -> LiveState:
    """The dispatcher's live rows for a synthetic record."""
    live = LiveState()
    for name, w in record.by_worker.items():
        live.workers[name] = WorkerState(
            name, done=w.done, busy=w.busy, chunks=w.chunks, failed=w.failed
        )
    return live


def _widget(record: LastRun, final: bool = True, live: LiveState | None = None):
    from parloop.progress.widget import WidgetProgress

    live = live or _live(record)
    view = WidgetProgress(delay=0.0)
    view.start(record, live)
    with contextlib.redirect_stdout(io.StringIO()):  # no kernel: display prints
        view.update(record, live)
        if final:
            view.close(record, live)
    return view


def test_many_workers_collapse_into_rows():
    view = _widget(_record(64), final=False)
    assert len(view._rows) == 16
    labels = [r.name.value for r in view._rows]
    assert "engine 0 – engine 3 (4)" in labels[0] and "engine 60 – engine 63" in labels[-1]
    # the group holding the failing engine is red
    assert view._rows[0].bar.bar_style == "danger"
    assert view._rows[1].bar.bar_style == ""


def test_interrupted_says_where():
    rec = _record(2, interrupted=True)
    rec.total = 100
    view = _widget(rec)
    assert "interrupted at 20/100" in view._stats.value
    assert view._bar.bar_style == "danger"
    assert "interrupted at 20/100" in report_bundle(rec)["text/plain"]


def test_updates_are_throttled():
    """However often the dispatcher calls update, the widgets are touched a few
    times a second."""
    import time

    rec = _record(4)
    live = _live(rec)
    view = _widget(rec, final=False, live=live)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:
        for w in live.workers.values():
            w.partial += 1
        view.update(rec, live)
    assert view.renders <= 4
