"""Where each engine runs: host, pid, and whether it shares the kernel's machine.

Asked once per engine (``worker._whoami`` on the engine) and cached per client:
a running engine does not answer until its task ends, and the kernel needs the
pids during a run (to signal or kill an engine, to see that one died, for the
progress view).  The managed cluster therefore asks while its engines are idle,
right after they register.
"""

from __future__ import annotations

import time
from typing import Any

from .worker import _whoami

__all__ = ["EngineInfoCache"]

#: where the kernel is (machine and network namespace), to compare engines' answers with
_HERE = _whoami()[2]


class EngineInfoCache:
    """``(id(client), engine id) -> {"id", "host", "pid", "local"}`` for the engines that answered."""

    def __init__(self) -> None:
        self._info: dict[tuple[int, int], dict[str, Any]] = {}

    def engine_info(self, client) -> list[dict[str, Any]]:
        """One dict per registered engine of ``client``: ``{"id", "host", "pid", "local"}``
        (``local``: on the kernel's machine and network namespace).

        Asked once per engine and cached.  An engine that does not answer within
        5 s (busy, or dead but not yet unregistered) gets ``host``/``pid`` None.
        """
        ids = list(client.ids)
        missing = [i for i in ids if (id(client), i) not in self._info]
        if missing:
            pending = {i: client[i].apply_async(_whoami) for i in missing}
            deadline = time.monotonic() + 5.0
            for i, ar in pending.items():
                try:
                    host, pid, place = ar.get(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - an engine that does not answer
                    continue  # not cached: asked again next time
                self._info[(id(client), i)] = {
                    "id": i,
                    "host": host,
                    "pid": pid,
                    "local": place == _HERE,
                }
        return [
            dict(
                self._info.get(
                    (id(client), i), {"id": i, "host": None, "pid": None, "local": False}
                )
            )
            for i in ids
        ]

    def cached(self, client, engine_id: int) -> dict[str, Any] | None:
        """What engine ``engine_id`` of ``client`` answered, without asking it (None: not yet)."""
        return self._info.get((id(client), engine_id))

    def drop(self, client, ids=None) -> None:
        """Forget ``client``'s engines ``ids`` (all of them by default)."""
        if client is not None:
            for k in [k for k in self._info if k[0] == id(client) and (ids is None or k[1] in ids)]:
                del self._info[k]
