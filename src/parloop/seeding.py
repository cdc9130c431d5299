"""``seed=N``: per-iteration random streams, the same under threads and engines.

Each iteration draws from ``random`` and ``numpy.random`` generators seeded from
``(N, iteration index)``, so its numbers depend neither on which worker ran it
nor on how many workers there are.  Threads share the module-level generators,
so while a seeded run is active the module-level functions (``random.random``,
``np.random.rand``, ...) are swapped for ones that dispatch to the calling
thread's per-iteration generator (and to the original generator in any other
thread).  An engine is one process and one thread, so the same swap serves it.

Limits (said in the manual): functions imported by name before the run
(``from random import random``) and ``numpy.random.default_rng()`` without a
seed are not covered.
"""

from __future__ import annotations

import contextvars
import hashlib
import random
import sys
import threading
from typing import Any, Callable

#: the per-iteration generators of the calling thread or asyncio task
_py: contextvars.ContextVar[Any] = contextvars.ContextVar("parloop_random", default=None)
_np: contextvars.ContextVar[Any] = contextvars.ContextVar("parloop_np_random", default=None)
_VARS = {"py": _py, "np": _np}
_lock = threading.Lock()
_active = 0
_saved: list[tuple[Any, str, Any]] = []


def derive(seed: int, index: int, bits: int = 64) -> int:
    """A seed for iteration ``index`` of a run with ``seed``: stable across
    processes, Python versions and platforms (no ``hash()``)."""
    digest = hashlib.blake2b(f"parloop:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - bits)


def _dispatcher(module_inst: Any, attr: str, key: str) -> Callable:
    default = getattr(module_inst, attr)
    var = _VARS[key]

    def call(*args: Any, **kwargs: Any) -> Any:
        gen = var.get()
        if gen is None:
            return default(*args, **kwargs)
        return getattr(gen, attr)(*args, **kwargs)

    call.__name__ = attr
    call.__doc__ = default.__doc__
    return call


def _patch(module: Any, inst: Any, key: str) -> None:
    for name in dir(module):
        f = getattr(module, name, None)
        if getattr(f, "__self__", None) is inst and callable(f):
            _saved.append((module, name, f))
            setattr(module, name, _dispatcher(inst, name, key))


def begin_run() -> None:
    """Install the dispatching functions (re-entrant; undone by end_run)."""
    global _active
    with _lock:
        _active += 1
        if _active > 1:
            return
        _patch(random, random._inst, "py")  # type: ignore[attr-defined]
        np = sys.modules.get("numpy")
        if np is not None:
            _patch(np.random, np.random.mtrand._rand, "np")
            # numpy.random.seed is a module function, not a bound method of
            # the global RandomState: it needs its own dispatcher
            if not any(m is np.random and n == "seed" for m, n, _ in _saved):
                _saved.append((np.random, "seed", np.random.seed))
                np.random.seed = _dispatcher(np.random.mtrand._rand, "seed", "np")


def end_run() -> None:
    global _active
    with _lock:
        _active -= 1
        if _active > 0:
            return
        while _saved:
            module, name, f = _saved.pop()
            setattr(module, name, f)


def seed_iteration(seed: int, index: int) -> None:
    """Give the calling thread (or task) fresh generators for iteration ``index``."""
    _py.set(random.Random(derive(seed, index)))
    np = sys.modules.get("numpy")
    if np is not None:
        _np.set(np.random.RandomState(derive(seed, index, 32)))


def end_iterations() -> None:
    """The calling thread goes back to the shared generators."""
    _py.set(None)
    _np.set(None)


def fresh_iteration() -> None:
    """Give the calling thread (or task) its own generators for an iteration
    that seeds them itself (``np.random.seed(i)`` at the top of the body):
    its draws then equal the serial ones, whichever thread runs it."""
    _py.set(random.Random())
    np = sys.modules.get("numpy")
    if np is not None:
        _np.set(np.random.RandomState())


def is_generator(value: Any) -> bool:
    """A random generator object (numpy Generator or RandomState, or
    ``random.Random``): with ``seed=`` each iteration draws from its own."""
    if isinstance(value, random.Random):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, (np.random.Generator, np.random.RandomState))


def stream_like(value: Any, seed: int, index: int) -> Any:
    """A generator of ``value``'s kind for iteration ``index`` of a run with
    ``seed``: the same numbers whichever worker runs the iteration."""
    if isinstance(value, random.Random):
        return type(value)(derive(seed, index))
    np = sys.modules["numpy"]
    if isinstance(value, np.random.RandomState):
        return np.random.RandomState(derive(seed, index, 32))
    return np.random.Generator(type(value.bit_generator)(derive(seed, index)))
