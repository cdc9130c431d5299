"""Where chunks run: the registry of backends (docs/design.md §4).

Each backend is a :class:`~parloop.backends.base.Backend` subclass in a module
of its own, named here by ``"module:Class"`` so that a run imports only the
backend it uses (the engines' module imports ipyparallel, ~0.3 s).  Adding a
backend is its module and one line in :data:`BACKENDS`; :func:`register`
adds one at run time (the tests' in-process backend does).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import LoopAnalysisError
from .base import Backend, Job

if TYPE_CHECKING:
    from ..analysis import LoopPlan
    from ..options import Options

__all__ = [
    "BACKENDS",
    "Backend",
    "Job",
    "backend_class",
    "choose",
    "make_backend",
    "register",
    "shutdown_all",
    "stop_clusters",
    "status_lines",
]

#: name -> "module:Class" (or the class itself, once registered or loaded)
BACKENDS: dict[str, str | type[Backend]] = {
    "threads": "parloop.backends.threads:ThreadBackend",
    "serial": "parloop.backends.threads:SerialBackend",
    "tasks": "parloop.backends.tasks:TaskBackend",
    "engines": "parloop.backends.engines.backend:EngineBackend",
    "dask": "parloop.backends.dask:DaskBackend",
    "ray": "parloop.backends.ray:RayBackend",
}

#: the backends this process has used: the ones to ask for status and to stop
_used: dict[str, type[Backend]] = {}


def register(name: str, backend: str | type[Backend]) -> None:
    """Make a backend known by ``name`` (a class, or ``"module:Class"``)."""
    BACKENDS[name] = backend


def backend_class(name: str) -> type[Backend]:
    """The class registered as ``name``, imported on first use."""
    entry = BACKENDS[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = BACKENDS[name] = getattr(importlib.import_module(module), attr)
    assert isinstance(entry, type) and issubclass(entry, Backend), entry
    _used[name] = entry
    return entry


def choose(opts: Options, plan: LoopPlan) -> str:
    """Which backend runs a cell: asyncio tasks for a body that awaits
    (``%%threaded`` only), the kernel's own thread with ``serial``, else the
    magic's own: threads, or ipyparallel engines unless ``dask``/``ray`` asks
    for that cluster."""
    if plan.is_async:
        if opts.magic == "parallel":
            raise LoopAnalysisError(
                "the loop awaits (`await`, `async for`, `async with`): engines run plain "
                "functions; use %%threaded, which runs each iteration as an asyncio task "
                "(tasks=N at once)",
                lineno=plan.loop.lineno,
            )
        return "tasks"
    if opts.serial:
        return "serial"
    if opts.magic == "threaded":
        return "threads"
    if opts.dask:
        return "dask"
    if opts.ray:
        return "ray"
    return "engines"


def make_backend(opts: Options, plan: LoopPlan) -> Backend:
    """The backend for a run, from the magic and its options."""
    return backend_class(choose(opts, plan)).for_run(opts, plan)


def status_lines() -> list[str]:
    """``%parallel_status``: what each backend used in this process runs on."""
    lines = [line for cls in _distinct(_used.values()) for line in cls.status_lines()]
    return lines or ["backend: no ipyparallel cluster in use (%%threaded needs none)"]


def stop_clusters() -> bool:
    """``%parallel_stop``: stop the clusters parloop started (ipyparallel,
    Dask, Ray), keep everything else; whether any was running."""
    return any([cls.stop_cluster() for cls in _distinct(_used.values())])


def shutdown_all() -> None:
    """Stop what the backends used in this process started (never what they
    did not start): the thread pool, the managed cluster, the event loop."""
    for cls in _distinct(_used.values()):
        cls.shutdown()


def _distinct(classes: object) -> list[type[Backend]]:
    """Each class once (threads and serial share a module, not a class; a
    class's shutdown may also be inherited)."""
    out: list[type[Backend]] = []
    for cls in classes:  # type: ignore[attr-defined]
        if cls not in out:
            out.append(cls)
    return out
