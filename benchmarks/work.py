"""Work functions for the peers that need importable functions
(multiprocessing, joblib, deco); parloop gets the same code as notebook cells."""
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


def tiny(i: int) -> int:
    return i * i + 1
