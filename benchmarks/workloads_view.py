"""The live view's overhead (issue 5): the same run with ``progress=off`` and
with the widget, on a CPU-bound %%parallel run (W1) and on 200 000 tiny
iterations under %%threaded (W2).

A plain InteractiveShell has no kernel, so the magic would pick the text view:
the runs call ``parloop.run.run_cell`` directly with a ``WidgetProgress``
(shown from the first moment, ``delay=0``: the worst case, a view that is on
for the whole run).  Its widgets are real ipywidgets objects whose comm
messages go nowhere (no kernel, no frontend); what is measured is everything
the kernel side pays: live state from the workers (engines publishing their
progress), rendering, trait changes and message serialisation."""

from __future__ import annotations

import contextlib
import io
import statistics

from .harness import Result, Variant, measure
from .workloads_engines import cpu_setup


def _runner(ip, magic: str, line: str, source: str, widget: bool, seen: dict):
    import time

    import parloop
    from parloop.backends import make_backend
    from parloop.options import parse_options
    from parloop.progress.base import Progress
    from parloop.progress.widget import WidgetProgress
    from parloop.run import Cell
    from parloop.run import run_cell as parloop_run

    def run() -> float:
        view = WidgetProgress(delay=0.0) if widget else Progress()
        cell = Cell(source=source, filename="<bench-view>")
        # the widget's and the report's text reprs print in a plain shell
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            parloop_run(cell, ip.user_ns, parse_options(line, magic), make_backend, view)
            dt = time.perf_counter() - t0
        if widget:
            seen.setdefault("renders", []).append(view.renders)
            seen.setdefault("messages", []).append(view.messages)
        seen["native"] = getattr(parloop.last_run, "native", False)
        return dt

    return run


def widget_overhead(ip, rounds: int) -> Result:
    """progress=off against the widget, alternating, ``rounds`` each."""
    _, cpu = cpu_setup(ip)
    tiny = "for i in range(200_000):\n    out[i] = i * i + 1\n"
    cases = [
        ("W1 %%parallel processes=2", "parallel", "processes=2", cpu),
        # the default: the kernel may find these iterations too cheap to ship
        # and run them natively (parloop.native), with no view at all
        ("W2 %%threaded threads=2", "threaded", "threads=2", tiny),
        # a fixed chunk size keeps them on the threads, so the view is on
        ("W2 %%threaded threads=2 chunksize=2000", "threaded", "threads=2 chunksize=2000", tiny),
    ]
    variants, seen = [], {}
    for label, magic, line, source in cases:
        for widget in (False, True):
            info = seen.setdefault((label, widget), {})
            variants.append(
                Variant(
                    f"{label}, {'widget' if widget else 'progress=off'}",
                    _runner(ip, magic, line, source, widget, info),
                    True,
                )
            )
    res = measure("Live view overhead: widget against progress=off", variants, rounds)
    res.parloop = set()  # no peers here: the ratio that matters is below
    for label, *_ in cases:
        off = statistics.median(res.rows[f"{label}, progress=off"])
        on = statistics.median(res.rows[f"{label}, widget"])
        info = seen[(label, True)]
        how = (
            "ran natively in the kernel: no view was started"
            if info.get("native")
            else f"{statistics.median(info['renders']):.0f} renders, "
            f"{statistics.median(info['messages']):.0f} widget updates per run"
        )
        res.notes[f"{label}, widget"] = f"{(on / off - 1) * 100:+.1f} % ({how})"
    res.extra.append("")
    res.extra.append(
        "Widget shown from the start (delay=0), driven through "
        "`parloop.run.run_cell` in a plain shell: its comm messages went "
        "nowhere (no kernel, no frontend).  The note is the median's change "
        "against progress=off."
    )
    return res
