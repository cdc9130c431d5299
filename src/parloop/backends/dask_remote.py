"""What the Dask backend runs inside the cluster's own processes.

Kept apart from :mod:`parloop.backends.dask` (the kernel's side, which
imports ipyparallel's transport and IPython's options) so that a worker can
load these by reference with nothing but the standard library.  parloop is
never sent to the scheduler (see :mod:`parloop.backends.shipping`), and the
scheduler unpickles every task it is sent: so what it runs, and the function
of every task, travel by value, and a task's real call travels as bytes
(:func:`call`).
"""

from __future__ import annotations

import ctypes
from typing import Any


def silent_workers(stale: float, dask_scheduler: Any = None) -> dict[str, list[str]]:
    """Runs ON THE SCHEDULER: the workers not heard from for ``stale``
    seconds, with the keys of the tasks they are running."""
    from time import time

    now = time()
    return {
        ws.address: [ts.key for ts in ws.processing]
        for ws in dask_scheduler.workers.values()
        if now - ws.last_seen > stale and ws.processing
    }


# cloudpickle (and distributed through it) sends __main__ functions by value:
# the scheduler need not be able to import parloop to run this
silent_workers.__module__ = "__main__"


def call(blob: bytes) -> Any:
    """A task's function: ``blob`` is the cloudpickled ``(function, args)``
    of the real call (parloop's worker entry points, by reference), opened
    only here, on the worker -- the scheduler sees a by-value function and
    bytes, and need not import parloop."""
    import cloudpickle

    fn, args = cloudpickle.loads(blob)
    return fn(*args)


call.__module__ = "__main__"


def raise_in_tasks(keys: list[str], dask_worker: Any = None) -> list[str]:
    """Runs IN A WORKER: raise KeyboardInterrupt in the threads executing
    these task keys (``client.cancel`` does not stop a running task); returns
    the keys it reached."""
    wanted = set(keys)
    hit = []
    for ident, key in list(getattr(dask_worker, "active_threads", {}).items()):
        if key in wanted and ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt)
        ):
            hit.append(key)
    return hit
