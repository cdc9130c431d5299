"""``%parallel_status``: what parloop is running on, and the last run."""

from __future__ import annotations

import sys


def status_text() -> str:
    import parloop

    lines = []
    engines = sys.modules.get("parloop.backends.engines")
    info = engines.status() if engines is not None else None
    if info:
        kind = "managed local cluster" if info.get("managed") else "external cluster"
        lines.append(f"backend: ipyparallel ({kind}), {len(info.get('engines', []))} engine(s)")
        for e in info.get("engines", []):
            state = "busy" if e.get("busy") else "idle"
            lines.append(
                f"  engine {e.get('id')}: host {e.get('host')}, pid {e.get('pid')}, {state}"
            )
    else:
        lines.append("backend: no ipyparallel cluster in use (%%threaded needs none)")
    run = parloop.last_run
    lines.append(f"last run: {run.summary()}" if run is not None else "last run: none yet")
    return "\n".join(lines)
