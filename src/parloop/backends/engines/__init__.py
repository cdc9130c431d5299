"""``%%parallel`` on ipyparallel engines, as one package.

* :mod:`.backend` -- the kernel's side of a run: hands chunks out, re-runs
  those of a lost engine, turns what comes back into results;
* :mod:`.worker` -- everything that executes *on an engine* (the contract an
  external cluster's engines run: chunk entry points, the broadcast store,
  the channel's engine end, where the engine is);
* :mod:`.cluster` -- the cluster parloop starts, or the one the user has;
* :mod:`.transport` -- inputs to the engines, by value, once, never stale;
* :mod:`.shm` -- shared-memory segments for big buffers on the kernel's host;
* :mod:`.channel` -- the kernel's chunk socket to engines on its host.
"""

from __future__ import annotations

from .backend import EngineBackend, status, stop_managed

__all__ = ["EngineBackend", "status", "stop_managed"]
