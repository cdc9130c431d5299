"""The text live view: one tqdm bar, per iteration, on the kernel's stderr.

Quiet for quick cells (tqdm's ``delay``), throttled by tqdm's own
``mininterval``; in a notebook without widgets, in terminal IPython, under
nbclient or ``jupyter nbconvert --execute``."""

from __future__ import annotations

from tqdm.std import tqdm

from ..record import LastRun
from ..runtime import OutputCapture
from .base import LiveState, Progress

#: seconds before the bar appears at all
DELAY = 1.0


class TextProgress(Progress):
    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._shown = 0

    def start(self, record: LastRun, live: LiveState) -> None:
        self._bar = tqdm(
            total=record.total,
            file=OutputCapture.real_streams()[1],
            desc=f"{record.magic} ({record.backend})",
            unit="it",
            delay=DELAY,
            mininterval=0.25,
            leave=True,
            dynamic_ncols=False,
        )

    def update(self, record: LastRun, live: LiveState) -> None:
        if self._bar is None:
            return
        if record.done > self._shown:
            self._bar.update(record.done - self._shown)
            self._shown = record.done
        post = {}
        if live.concurrent and live.in_flight is not None:
            post["in flight"] = live.in_flight
        if record.errors:
            post["errors"] = len(record.errors)
        if post:
            self._bar.set_postfix(post, refresh=False)

    def close(self, record: LastRun, live: LiveState) -> None:
        if self._bar is None:
            return
        self.update(record, live)
        if record.interrupted:
            self._bar.set_description(f"interrupted at {record.done}")
        self._bar.close()
        self._bar = None
