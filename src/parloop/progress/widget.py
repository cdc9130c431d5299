"""The widget live view (docs/design.md §6): a header and a row per worker.

Built like tqdm's notebook bar (plain ``HBox(HTML, IntProgress, HTML)`` rows,
state shown by ``bar_style``), quiet for quick cells like ipyparallel's
``progress_after_seconds``:

* nothing appears before DELAY seconds;
* the header says backend, workers, iterations done/total, rate, ETA, elapsed
  and errors; a row per worker says its name, iterations done, the iteration it
  is on (index and loop values) and its busy share; an ``async for``/``await``
  loop (asyncio tasks) has no worker rows, its header counts tasks in flight;
* widgets are touched at most every PERIOD seconds and the comm messages that
  sends are held under MSG_RATE per second in all, however many workers and
  iterations there are (traitlets sends only what changed; ``hold_sync``
  makes one message per widget);
* beyond MAX_ROWS workers, rows stand for groups of workers (64 engines: 16
  rows of 4);
* a failure turns its row and the header red and they stay red; an interrupt
  says "interrupted at k/n";
* when the run ends, the widget's output is replaced by the report
  (:mod:`.report`): plain MIME output that survives saving, reopening and
  nbconvert.
"""

from __future__ import annotations

import html
import math
import sys
import time
from typing import Any

import ipywidgets as W
from IPython.display import display
from ipywidgets.widgets.widget_int import ProgressStyle
from ipywidgets.widgets.widget_string import HTMLStyle

from ..record import LastRun
from .base import LiveState, Progress, WorkerState
from .report import natural_key, report_bundle, workers_phrase

#: seconds before the widget appears: quick cells stay quiet
DELAY = 1.0
#: seconds between two renderings at least
PERIOD = 0.25
#: comm messages per second at most, in all
MSG_RATE = 40.0
#: rows shown at most; more workers share rows
MAX_ROWS = 16
#: characters of an iteration's loop values shown
VALUES_CHARS = 40

_RED = "var(--jp-error-color1, #d32f2f)"


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _short(name: str) -> str:
    """``engine 3 (host:pid)`` -> ``engine 3``: group labels stay short."""
    return name.split(" (", 1)[0]


def _set(widget: W.Widget, **traits: Any) -> int:
    """Set the traits that changed in one comm message; return the number of
    messages sent (0 or 1)."""
    changed = {k: v for k, v in traits.items() if getattr(widget, k) != v}
    if not changed:
        return 0
    with widget.hold_sync():
        # max before value: IntProgress clamps value to [min, max]
        if "max" in changed:
            widget.max = changed.pop("max")
        for k, v in changed.items():
            setattr(widget, k, v)
    return 1


class _Shared:
    """Layouts and styles shared by all the view's widgets: each widget model
    is a comm of its own, so sharing them halves the messages that open it."""

    def __init__(self) -> None:
        self.html = HTMLStyle()
        self.progress = ProgressStyle()
        self.plain = W.Layout()
        self.name = W.Layout(width="16em", overflow="hidden")
        self.bar = W.Layout(width="30%")

    def html_widget(self, layout: W.Layout | None = None) -> W.HTML:
        return W.HTML(style=self.html, layout=layout or self.plain)

    def bar_widget(self, max_: int = 1) -> W.IntProgress:
        return W.IntProgress(min=0, max=max_, value=0, style=self.progress, layout=self.bar)


class _Row:
    """One row: a name, a bar, a line of details."""

    def __init__(self, shared: _Shared) -> None:
        self.name = shared.html_widget(shared.name)
        self.bar = shared.bar_widget()
        self.info = shared.html_widget()
        self.box = W.HBox([self.name, self.bar, self.info], layout=shared.plain)
        self.box.add_class("parloop-worker")


class WidgetProgress(Progress):
    """The live widget; see the module's docstring."""

    wants_live = True

    def __init__(self, delay: float = DELAY, period: float = PERIOD) -> None:
        self.delay = delay
        self.period = period
        self._t0 = 0.0
        self._next = math.inf
        self._handle: Any = None
        self._shown = False
        self._rows: list[_Row] = []
        self._failed_rows: set[int] = set()
        #: widget updates sent (one comm message each; for the benchmark)
        self.messages = 0
        self.renders = 0

    # -- Progress -----------------------------------------------------------
    def start(self, record: LastRun, live: LiveState) -> None:
        self._t0 = time.monotonic()
        self._next = self._t0 + self.delay

    def update(self, record: LastRun, live: LiveState) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        try:
            if not self._shown:
                self._build(record)
            sent = self._render(record, live, now, final=False)
        except Exception as e:  # noqa: BLE001 - a broken view must not break the run
            self._give_up(e)
            return
        self._next = time.monotonic() + max(self.period, sent / MSG_RATE)

    def close(self, record: LastRun, live: LiveState) -> None:
        if not self._shown or self._next == math.inf:
            return  # a quick cell stays quiet (or the view gave up)
        self._next = math.inf
        try:
            self._render(record, live, time.monotonic(), final=True)
            self._replace_by_report(record)
        except Exception as e:  # noqa: BLE001
            self._give_up(e)

    def _give_up(self, exc: Exception) -> None:
        self._next = math.inf
        print(
            f"parloop: the progress widget stopped ({type(exc).__name__}: {exc}); the run goes on",
            file=sys.stderr,
        )

    # -- building -------------------------------------------------------------
    def _build(self, record: LastRun) -> None:
        self._shared = shared = _Shared()
        self._title = shared.html_widget(shared.name)  # the bars line up
        self._bar = shared.bar_widget(max(record.total or 1, 1))
        self._stats = shared.html_widget()
        header = W.HBox([self._title, self._bar, self._stats], layout=shared.plain)
        header.add_class("parloop-header")
        self._rowbox = W.VBox([], layout=shared.plain)
        self._box = W.VBox([header, self._rowbox], layout=shared.plain)
        self._box.add_class("parloop-live")
        self._shown = True
        # None where no shell runs (display then just prints)
        self._handle = display(self._box, display_id=True)

    def _groups(self, live: LiveState) -> list[list[WorkerState]]:
        """The workers, one per row, or in MAX_ROWS groups when there are more."""
        if live.concurrent:
            return []  # no worker rows: tasks in flight are in the header
        workers = sorted(live.workers.values(), key=lambda w: natural_key(w.name))
        size = max(1, math.ceil(len(workers) / MAX_ROWS))
        return [workers[i : i + size] for i in range(0, len(workers), size)]

    # -- rendering ------------------------------------------------------------
    def _render(self, record: LastRun, state: LiveState, now: float, final: bool) -> int:
        self.renders += 1
        elapsed = now - self._t0
        live = list(state.workers.values())
        shown = sum(w.shown_done for w in live)
        done = max(record.done, shown)
        failed = max(len(record.errors), sum(w.failed for w in live))
        total = record.total
        sent = 0

        # header
        if state.concurrent:
            who = f"≤ {record.threads.get('tasks', record.workers)} asyncio tasks"
        else:
            who = workers_phrase(record.backend, record.workers)
        title = f"<b>%%{html.escape(record.magic)}</b> · {html.escape(who)}"
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{done:,}/{total:,}" if total is not None else f"{done:,}"]
        if record.interrupted:
            parts = [f"interrupted at {record.done:,}/{'?' if total is None else f'{total:,}'}"]
        parts.append(f"{rate:,.0f} it/s" if rate >= 10 else f"{rate:.2f} it/s")
        if state.concurrent and state.in_flight is not None and not final:
            parts.append(f"{state.in_flight} in flight")
        if total is not None and not final and rate > 0:
            parts.append(f"ETA {_clock((total - done) / rate)}")
        parts.append(f"{_clock(elapsed)} elapsed")
        if failed:
            parts.append(f"{failed} error{'s' if failed != 1 else ''}")
        stats = " · ".join(parts)
        if failed or record.interrupted:
            stats = f'<span style="color:{_RED}">{stats}</span>'
        if failed or record.interrupted:
            style = "danger"
        elif final and (total is None or record.done >= total):
            style = "success"
        else:
            style = "info" if total is None else ""
        bar_max = max(total, 1) if total is not None else max(done, 1)
        sent += _set(self._title, value=title)
        sent += _set(self._stats, value=stats)
        sent += _set(self._bar, max=bar_max, value=min(done, bar_max), bar_style=style)

        # rows
        groups = self._groups(state)
        while len(self._rows) < len(groups):
            self._rows.append(_Row(self._shared))
        if len(self._rowbox.children) != len(groups):
            self._rowbox.children = tuple(r.box for r in self._rows[: len(groups)])
            sent += 1
        workers = max(record.workers, len(live), 1)
        remaining = None if total is None else max(total - shown, 0)
        for k, (row, group) in enumerate(zip(self._rows, groups)):
            sent += self._render_row(k, row, group, elapsed, final, remaining, workers)
        self.messages += sent
        return sent

    def _render_row(
        self,
        k: int,
        row: _Row,
        group: list[WorkerState],
        elapsed: float,
        final: bool,
        remaining: int | None,
        workers: int,
    ) -> int:
        e = html.escape
        done = sum(w.done if final else w.shown_done for w in group)
        failed = sum(w.failed for w in group)
        busy = sum(w.busy for w in group) / len(group)
        share = min(busy / elapsed, 1.0) if elapsed > 0 else 0.0
        if len(group) == 1:
            label = group[0].name
        else:
            label = f"{_short(group[0].name)} – {_short(group[-1].name)} ({len(group)})"
        if failed:
            self._failed_rows.add(k)
        red = k in self._failed_rows  # failures stay visible
        name = f'<span title="{e(label)}">{e(label)}</span>'
        if red:
            name = f'<span style="color:{_RED}" title="{e(label)}">{e(label)}</span>'
        info = [f"{done:,} it"]
        if not final:
            running = [w for w in group if w.current is not None]
            if len(group) == 1 and running:
                w = running[0]
                values = w.current_values
                if len(values) > VALUES_CHARS:
                    values = values[: VALUES_CHARS - 1] + "…"
                info.append(f"on #{w.current:,}" + (f" ({e(values)})" if values else ""))
            elif len(group) > 1:
                info.append(f"{len(running)}/{len(group)} running")
        info.append(f"{share:.0%} busy")
        if failed:
            info.append(f'<span style="color:{_RED}">{failed} failed</span>')
        # the bar: the row's iterations against its expected share of the
        # loop (its own count once the run is over)
        if final or remaining is None:
            bar_max = max(done, 1)
        else:
            bar_max = max(done + math.ceil(remaining * len(group) / workers), 1)
        style = "danger" if red else ("success" if final else "")
        return (
            _set(row.name, value=name)
            + _set(row.info, value=" · ".join(info))
            + _set(row.bar, max=bar_max, value=min(done, bar_max), bar_style=style)
        )

    # -- the end ----------------------------------------------------------------
    def _replace_by_report(self, record: LastRun) -> None:
        """The report takes the widget's place (``close`` comes once the run
        has recorded its wall time, errors and interrupt)."""
        bundle = report_bundle(record)
        if self._handle is not None:
            self._handle.update(bundle, raw=True)
        else:
            display(bundle, raw=True)
