"""``%parallel_status``: what parloop is running on, and the last run."""

from __future__ import annotations

from .backends import status_lines


def status_text() -> str:
    import parloop

    lines = status_lines()
    run = parloop.last_run
    lines.append(f"last run: {run.summary()}" if run is not None else "last run: none yet")
    return "\n".join(lines)
