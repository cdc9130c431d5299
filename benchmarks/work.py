"""Work functions for the peers that need importable functions
(multiprocessing, joblib, deco, ipyparallel); parloop gets the same code as
notebook cells."""

from __future__ import annotations

CPU_SOURCE = '''
def spin(n):
    """~60 ms of pure Python for n = SPIN."""
    s = 0
    for k in range(n):
        s = (s + k * k) % 1000003
    return s
'''
exec(CPU_SOURCE)

SPIN = 400_000  # calibrated at import by calibrate()


def calibrate(target: float = 0.060) -> int:
    """The n for which spin(n) takes about ``target`` seconds here."""
    import time

    global SPIN
    n = 100_000
    t0 = time.perf_counter()
    spin(n)  # noqa: F821 - defined by exec above
    dt = time.perf_counter() - t0
    SPIN = max(1000, int(n * target / dt))
    return SPIN


def timed_spin(n: int) -> float:
    """spin(n), returning the seconds it took where it ran (a worker's own
    compute speed, apart from any dispatch)."""
    import time

    t0 = time.perf_counter()
    spin(n)  # noqa: F821 - defined by exec above
    return time.perf_counter() - t0


def tiny(i: int) -> int:
    return i * i + 1


def echo(i: int) -> int:
    """The no-op iteration of W7: hands its index back."""
    return i


# deco (https://github.com/alex-sherman/deco): a @concurrent function is called
# in a @synchronized one, whose source deco rewrites so that ``out[i] = f(x)``
# becomes one ``Pool.apply_async`` per call, and waits for all of them at the
# ``return``.  Both must be module-level functions: deco reads the synchronized
# function's source file, and the pool's workers (forked, the Pool default
# here) find the concurrent one by name in deco's registry.  The pool is made
# at the first call and kept; deco_stop ends it.
from deco import concurrent, synchronized  # noqa: E402


@concurrent(processes=2)
def spin_deco(n):
    return spin(n)  # noqa: F821 - defined by exec above


@synchronized
def spin_all_deco(n, count):
    out = {}
    for i in range(count):
        out[i] = spin_deco(n)
    return out


@concurrent(processes=2)
def tiny_deco(i):
    return i * i + 1


@synchronized
def tiny_all_deco(count):
    out = {}
    for i in range(count):
        out[i] = tiny_deco(i)
    return out


def deco_stop(*functions) -> None:
    """Terminate the pools of these @concurrent functions."""
    for f in functions:
        if f.concurrency is not None:
            f.concurrency.terminate()
            f.concurrency = None
