"""``%%parallel`` on ipyparallel engines, as one package.

* :mod:`.backend` -- the kernel's side of a run: hands chunks out, re-runs
  those of a lost engine, turns what comes back into results;
* :mod:`.worker` -- everything that executes *on an engine* (the contract an
  external cluster's engines run: chunk entry points, the broadcast store,
  the channel's engine end, where the engine is);
* :mod:`.cluster` -- the facade callers use (``MANAGER``) over
  :mod:`.managed` (the cluster parloop starts: life cycle, resizing, stop),
  :mod:`.external` (clusters it only connects to), :mod:`.processes` (the
  ledger of the processes it started, the PDEATHSIG launcher, reaping) and
  :mod:`.engine_info` (each engine's host and pid);
* :mod:`.transport` -- inputs to the engines, by value, once, never stale;
  :mod:`.serialize` -- the pickling it uses (and the one place that relies on
  cloudpickle's internals);
* :mod:`.shm` -- shared-memory segments for big buffers on the kernel's host;
* :mod:`.channel` -- the kernel's chunk socket to engines on its host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import EngineBackend, status, stop_managed

__all__ = ["EngineBackend", "status", "stop_managed"]


def __getattr__(name: str) -> Any:
    """The kernel's side, imported on first use: a worker that imports
    :mod:`.worker` (a Dask or Ray worker runs chunks through it) needs
    neither ipyparallel nor IPython."""
    if name in __all__:
        from . import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
