"""parloop's one asyncio event loop, running in a daemon thread of its own.

Two users share it:

* ``%%threaded`` on a loop body that awaits (:mod:`parloop.backends.tasks`):
  every iteration is a task on this loop, and a cell's top-level ``await``
  (``run._run_code``) runs here too;
* the managed ipyparallel cluster (:mod:`parloop.backends.engines.managed`):
  ipyparallel's launcher API (``Cluster.start_controller``, ``start_engines``,
  ``stop_engines``...) is made of coroutines.

Why a thread: callers are synchronous code on any thread -- the kernel's main
thread among them, which already runs ipykernel's own loop and so can neither
``asyncio.run`` nor block inside a coroutine.  They hand coroutines over with
:func:`run_on_loop` (or ``asyncio.run_coroutine_threadsafe(coro, event_loop())``
to keep the future) and wait for the result on their own thread.

Sharing one loop is safe because the two users do not hold it at the same time
in practice, and neither holds it long:

* ipyparallel's coroutines start processes (``Popen``, a few ms each) and poll
  for connection files with ``asyncio.sleep``.  The one call that blocks the
  loop is stopping a process: ``LocalProcessLauncher.join`` waits on the
  launcher's wait thread with ``Thread.join``, until the process exits (0.1-0.5
  s; at most ``stop_seconds_until_kill``, 5 s, before SIGKILL).  Processes are
  stopped between cells or at the start of a ``%%parallel`` cell (resizing),
  never while ``%%threaded`` tasks run -- tasks a cell left behind in the
  background pause meanwhile.
* An iteration that blocks (a synchronous call in an ``async`` body) holds up
  everything on the loop until it returns: the other tasks, and a cluster
  start in the background (``MANAGER.prestart``).
* :func:`run_on_loop` on the loop's own thread would wait for itself for ever:
  it raises instead.

The thread is also the *parent* of the managed cluster's processes: they are
started from it with Linux's ``PR_SET_PDEATHSIG``, which fires when the thread
that started them ends.  Ending the thread would SIGTERM a managed cluster that
is still running, behind its manager's back; so the cluster registers its stop
with :func:`call_before_stop`, and :func:`stop_loop` stops it first, in order,
whichever backend asks for the loop to stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Callable

__all__ = ["call_before_stop", "event_loop", "run_on_loop", "stop_loop"]

log = logging.getLogger("parloop.aioloop")

_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_lock = threading.Lock()
#: what stop_loop() calls first (users whose state does not survive the thread)
_before_stop: list[Callable[[], object]] = []


def event_loop() -> asyncio.AbstractEventLoop:
    """parloop's event loop, running in its daemon thread (started on first use,
    and again after :func:`stop_loop` or if its thread ended)."""
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed() or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=run, name="parloop-asyncio", daemon=True)
            thread.start()
            ready.wait()
            _loop, _thread = loop, thread
        return _loop


def run_on_loop(coro: Any, timeout: float | None = None) -> Any:
    """Run a coroutine on parloop's loop and wait (from any other thread) for its result.

    After ``timeout`` seconds the coroutine is cancelled and ``TimeoutError``
    raised; an exception of the coroutine's own (its own ``TimeoutError``
    included) is raised as it is.
    """
    loop = event_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError("run_on_loop() on parloop's loop thread would wait for itself")
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    done, _ = concurrent.futures.wait([fut], timeout)
    if not done:
        fut.cancel()
        raise TimeoutError(f"timed out after {timeout} s")
    return fut.result()


def call_before_stop(fn: Callable[[], object]) -> None:
    """Have :func:`stop_loop` call ``fn()`` first, on its caller's thread while
    the loop still runs (once per ``fn``, however often it is registered)."""
    with _lock:
        if fn not in _before_stop:
            _before_stop.append(fn)


def stop_loop() -> None:
    """Stop the loop, after what :func:`call_before_stop` registered; its thread
    ends.  The next :func:`event_loop` starts a new one."""
    global _loop, _thread
    with _lock:
        first = list(_before_stop)
    for fn in first:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the loop is stopped all the same
            log.debug("before stopping the event loop, %r failed: %r", fn, e)
    with _lock:
        loop, _loop, _thread = _loop, None, None
    if loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
