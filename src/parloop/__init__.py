"""parloop: put ``%%parallel`` or ``%%threaded`` on a notebook cell holding a slow
``for`` loop, and its iterations run in parallel with exactly the serial result.

``%load_ext parloop`` registers the magics; ``%unload_ext parloop`` removes
them and shuts down what parloop started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import LoopAnalysisError, WorkerLostError
from .record import LastRun

if TYPE_CHECKING:
    from .decorators import parallel, threaded

__version__ = "0.1.0"

#: the record of the last run (docs/design.md §1); replaced by every run
last_run: LastRun | None = None

__all__ = [
    "LoopAnalysisError",
    "WorkerLostError",
    "LastRun",
    "last_run",
    "parallel",
    "threaded",
    "load_ipython_extension",
    "unload_ipython_extension",
    "__version__",
]

_loaded: dict[int, Any] = {}


def __getattr__(name: str) -> Any:
    """``parloop.parallel`` and ``parloop.threaded``, imported on first use.

    The decorators pull in the analysis, the magics' options and IPython.  A
    Dask or Ray worker imports this package only to run chunks
    (``parloop.backends.engines.worker``), and its environment need not have
    IPython, pyzmq or ipyparallel (see parloop.backends.shipping)."""
    if name in ("parallel", "threaded"):
        from . import decorators

        value = getattr(decorators, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'parloop' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext parloop``."""
    from .magics import ParloopMagics

    if id(ipython) in _loaded:
        return
    magics = ParloopMagics(shell=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)
    _loaded[id(ipython)] = magics


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext parloop``: remove the magics, stop the thread pool and the
    cluster parloop started (never one it did not start)."""
    magics = _loaded.pop(id(ipython), None)
    registry = ipython.magics_manager.magics
    for kind, names in (
        ("cell", ("threaded", "parallel")),
        ("line", ("parallel_status", "parallel_stop")),
    ):
        for name in names:
            registry[kind].pop(name, None)
    if magics is not None:
        ipython.magics_manager.registry.pop(type(magics).__name__, None)
        if magics in ipython.configurables:
            ipython.configurables.remove(magics)
    shutdown()


def shutdown() -> None:
    """Stop everything parloop started in this process."""
    from .backends import shutdown_all

    shutdown_all()
