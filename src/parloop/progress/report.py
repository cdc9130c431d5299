"""The report a finished run leaves in the notebook (docs/design.md §6).

``report_bundle(record)`` is a MIME bundle for ``display(bundle, raw=True)``:
``text/plain`` and ``text/html`` summaries that any frontend (and nbconvert)
shows without a kernel or widgets, and ``application/vnd.parloop.report+json``
with the per-chunk timings that the JupyterLab extension draws as a timeline.
Being plain outputs, all three survive saving and reopening the notebook (a
widget would turn into "Error displaying widget").
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

from ..record import LastRun

MIME = "application/vnd.parloop.report+json"
#: the schema of MIME; a renderer checks it before drawing
VERSION = 1
#: errors listed in the text and HTML summaries (the JSON holds them all)
SHOWN_ERRORS = 10
#: beyond this many workers the HTML table scrolls
SCROLL_ROWS = 16


def natural_key(name: str) -> list[Any]:
    """``thread 2`` before ``thread 10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _num(x: float) -> float:
    """JSON has no inf/nan; six decimals are microseconds."""
    return round(x, 6) if math.isfinite(x) else 0.0


def report_data(record: LastRun) -> dict[str, Any]:
    """The ``application/vnd.parloop.report+json`` document (schema version 1;
    times in seconds from the run's start)."""
    workers: dict[str, dict[str, Any]] = {}
    for c in record.chunks:
        w = workers.setdefault(
            c.worker, {"name": c.worker, "iterations": 0, "busy": 0.0, "chunks": 0, "failed": 0}
        )
        w["iterations"] += c.count
        w["busy"] += c.seconds
        w["chunks"] += 1
        w["failed"] += len(c.failed)
    # a worker that ran but whose chunks were never committed (after an
    # interrupt or an earlier failure) still gets its row
    for name, state in record.by_worker.items():
        if name not in workers and (state.done or state.chunks):
            workers[name] = {
                "name": name,
                "iterations": 0,
                "busy": 0.0,
                "chunks": 0,
                "failed": state.failed,
            }
    rows = [
        dict(w, busy=_num(w["busy"]))
        for w in sorted(workers.values(), key=lambda w: natural_key(w["name"]))
    ]
    busy = sum(w["busy"] for w in workers.values())
    return {
        "version": VERSION,
        "magic": record.magic,
        "backend": record.backend,
        "total": record.total,
        "done": record.done,
        "wall": _num(record.wall),
        "busy": _num(busy),
        "speedup": _num(busy / record.wall) if record.wall > 0 else 0.0,
        "imbalance": _num(imbalance([w["busy"] for w in workers.values()])),
        "interrupted": bool(record.interrupted),
        "notes": [str(n) for n in record.notes],
        "workers": rows,
        "chunks": [
            {
                "worker": c.worker,
                "start": c.start,
                "count": c.count,
                "t_start": _num(c.t_start),
                "t_end": _num(c.t_end),
                "failed": list(c.failed),
                "retried": bool(c.retried),
            }
            for c in sorted(record.chunks, key=lambda c: c.start)
        ],
        "errors": [
            {
                "index": e.index,
                "values": e.values,
                "type": type(e.exception).__name__,
                "message": str(e.exception),
            }
            for e in record.errors
        ],
    }


def imbalance(busy: list[float]) -> float:
    """Load imbalance: the busiest worker's busy time over the mean, minus one
    (0 = perfectly balanced; 0.5 = the slowest worker worked 50 % more than the
    average, so the others idled while it finished)."""
    busy = [b for b in busy if b > 0]
    if len(busy) < 2:
        return 0.0
    mean = sum(busy) / len(busy)
    return max(busy) / mean - 1.0


def _progress_words(d: dict[str, Any]) -> str:
    total = "?" if d["total"] is None else f"{d['total']:,}"
    if d["interrupted"]:
        return f"interrupted at {d['done']:,}/{total}"
    return f"{d['done']:,}/{total} iterations"


def workers_phrase(backend: str, n: int) -> str:
    """``2 engines``, ``1 thread``, ``asyncio tasks``."""
    if backend == "tasks":
        return "asyncio tasks"
    if backend == "serial":
        return "the kernel"
    noun = {"threads": "thread", "engines": "engine"}.get(backend, f"{backend} worker")
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _head(d: dict[str, Any]) -> str:
    failed = f", {len(d['errors'])} failed" if d["errors"] else ""
    return (
        f"%%{d['magic']} on {workers_phrase(d['backend'], len(d['workers']))}: "
        f"{_progress_words(d)} in {d['wall']:.2f} s{failed}; "
        f"speedup {d['speedup']:.2f}× (busy {d['busy']:.2f} s / wall), "
        f"imbalance {d['imbalance']:.0%}"
    )


def _error_lines(d: dict[str, Any]) -> list[str]:
    out = [
        f"iteration {e['index']} ({e['values']}): {e['type']}: {e['message']}"
        for e in d["errors"][:SHOWN_ERRORS]
    ]
    if len(d["errors"]) > SHOWN_ERRORS:
        out.append(f"... and {len(d['errors']) - SHOWN_ERRORS} more (parloop.last_run.errors)")
    return out


def _chunks(n: int) -> str:
    return f"{n} chunk{'s' if n != 1 else ''}"


def render_text(d: dict[str, Any]) -> str:
    lines = [_head(d)]
    width = max((len(w["name"]) for w in d["workers"]), default=0)
    for w in d["workers"]:
        share = w["busy"] / d["wall"] if d["wall"] > 0 else 0.0
        failed = f", {w['failed']} failed" if w["failed"] else ""
        lines.append(
            f"  {w['name']:<{width}}  {w['iterations']:>8,} it  "
            f"{w['busy']:8.2f} s busy ({share:4.0%})  {_chunks(w['chunks'])}{failed}"
        )
    lines += ["  " + e for e in _error_lines(d)]
    lines += [f"  note: {n}" for n in d["notes"]]
    return "\n".join(lines)


# colours of ipywidgets' bar styles, so the report looks like the widget it replaces
_OK, _FAIL, _TRACK = "#66bb6a", "#ef5350", "#eeeeee"


def render_html(d: dict[str, Any]) -> str:
    e = html.escape
    bad = bool(d["errors"]) or d["interrupted"]
    head = e(_head(d))
    if bad:
        head = f'<span style="color:{_FAIL}">{head}</span>'
    rows = []
    for w in d["workers"]:
        share = min(w["busy"] / d["wall"], 1.0) if d["wall"] > 0 else 0.0
        colour = _FAIL if w["failed"] else _OK
        failed = (
            f'<td style="color:{_FAIL}">{w["failed"]} failed</td>' if w["failed"] else "<td></td>"
        )
        rows.append(
            f'<tr><td style="text-align:left;white-space:nowrap">{e(w["name"])}</td>'
            f'<td style="width:40%;min-width:8em"><div style="background:{_TRACK};'
            f'height:0.9em;width:100%"><div style="background:{colour};height:100%;'
            f'width:{share * 100:.1f}%"></div></div></td>'
            f'<td style="text-align:right">{w["iterations"]:,} it</td>'
            f'<td style="text-align:right">{w["busy"]:.2f} s busy ({share:.0%})</td>'
            f'<td style="text-align:right">{_chunks(w["chunks"])}</td>{failed}</tr>'
        )
    scroll = ' style="max-height:24em;overflow-y:auto"' if len(rows) > SCROLL_ROWS else ""
    parts = [
        '<div class="parloop-report" style="font-family:var(--jp-ui-font-family,'
        'sans-serif);font-size:0.9em">',
        f'<div style="margin-bottom:0.3em"><b>parloop</b> · {head}</div>',
        f'<div{scroll}><table style="border-collapse:collapse;width:100%">',
        *rows,
        "</table></div>",
    ]
    errors = _error_lines(d)
    if errors:
        parts.append(
            f'<ul style="color:{_FAIL};margin:0.3em 0">'
            + "".join(f"<li>{e(x)}</li>" for x in errors)
            + "</ul>"
        )
    if d["notes"]:
        parts.append(
            '<ul style="margin:0.3em 0">'
            + "".join(f"<li>{e(n)}</li>" for n in d["notes"])
            + "</ul>"
        )
    parts.append("</div>")
    return "".join(parts)


def report_bundle(record: LastRun) -> dict[str, Any]:
    """The MIME bundle of a finished run: ``display(bundle, raw=True)``."""
    d = report_data(record)
    return {"text/plain": render_text(d), "text/html": render_html(d), MIME: d}
