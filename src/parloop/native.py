"""Iterations far cheaper than a round trip run natively in the kernel.

Shipping an iteration to a worker, logging its writes and replaying them
costs about a microsecond (threads) to a few (engines); a loop body such as
``out[i] = i * i + 1`` costs a fifth of one.  For such loops every parallel
tool is slower than the plain loop (measured here: ``Pool(2).map`` 2x,
joblib 30x, ``ProcessPoolExecutor.map`` 1200x).  So parloop first runs a few
iterations natively in the kernel -- exactly serial semantics, nothing to
replay -- timing them for about two milliseconds; if the measured cost says
the workers cannot win, the rest of the loop runs natively too, otherwise the
workers take over from where the probe stopped (and the chunk sizer starts
from the measured iteration time instead of probing with tiny chunks).
The choice and its figures go to ``parloop.last_run.notes``.
"""

from __future__ import annotations

import ast
import copy
import time
from typing import TYPE_CHECKING, Any

from .analysis import LoopPlan
from .options import Options

if TYPE_CHECKING:
    from .backends.base import Backend

#: seconds of native iterations used to measure the cost of one
PROBE_SECONDS = 0.002
#: loops shorter than this are not probed (a few heavy iterations never gain)
MIN_ITERATIONS = 256


def eligible(opts: Options, plan: LoopPlan, backend: Backend, total: int | None) -> bool:
    """Native running must not change what the user asked for: only the
    default error mode, no per-iteration streams or timeouts, no fixed chunk
    size, and a loop long enough for overheads to matter."""
    return (
        backend.native_costs is not None
        and not plan.is_async
        and opts.on_error == "raise"
        and opts.seed is None
        and opts.timeout is None
        and opts.chunksize is None
        and not plan.copies
        and not opts.serial
        and (total is None or total >= MIN_ITERATIONS)
    )


class NativeLoop:
    """The cell's own loop, compiled to run over a slice of the items in the
    notebook namespace (with the iteration index alongside, for the note an
    exception gets)."""

    INDEX = "___parloop_n"
    ITEMS = "___parloop_it"
    FULL = "___parloop_full"

    def __init__(self, plan: LoopPlan, filename: str, ns: dict[str, Any]):
        target = ast.Tuple(
            elts=[ast.Name(self.INDEX, ast.Store()), copy.deepcopy(plan.loop.target)],
            ctx=ast.Store(),
        )
        # the else clause says the slice ran to its end (no `break`)
        full = ast.Assign(targets=[ast.Name(self.FULL, ast.Store())], value=ast.Constant(True))
        loop = ast.For(
            target=target,
            iter=ast.Name(self.ITEMS, ast.Load()),
            body=copy.deepcopy(plan.loop.body),
            orelse=[full],
        )
        ast.copy_location(loop, plan.loop)
        ast.copy_location(target, plan.loop.target)
        ast.fix_missing_locations(loop)
        self.code = compile(ast.Module(body=[loop], type_ignores=[]), filename, "exec")
        self.ns = ns
        self.targets = plan.targets
        #: the body's break ran (in the last iteration run)
        self.broke = False
        #: the iteration whose exception propagated out of :meth:`run`
        self.failed_at: int | None = None

    def run(self, items: Any, start: int) -> tuple[int, float, float]:
        """Run the iterations natively; returns (count, wall s, CPU s).  An
        exception propagates (as in serial), with :attr:`failed_at` set to
        the iteration that raised it."""
        ns = self.ns
        ns[self.ITEMS] = enumerate(items, start)
        ns.pop(self.INDEX, None)
        t0 = time.perf_counter()
        c0 = time.thread_time()
        try:
            exec(self.code, ns)
        except BaseException:
            self.failed_at = ns.get(self.INDEX, start)
            raise
        finally:
            last = ns.pop(self.INDEX, start - 1)
            ns.pop(self.ITEMS, None)
        self.broke = not ns.pop(self.FULL, False)
        return last - start + 1, time.perf_counter() - t0, time.thread_time() - c0

    def values(self) -> str:
        from .log.commit import _short

        return ", ".join(f"{k}={_short.repr(self.ns[k])}" for k in self.targets if k in self.ns)


def native_wins(wall: float, cpu: float, n: int, remaining: int | None, backend: Backend) -> bool:
    """Would the rest of the loop finish sooner natively than on the workers?
    (``backend.native_costs``: its per-iteration overhead -- log, transfer,
    replay -- and per-run latency.)"""
    if n == 0 or backend.native_costs is None:
        return False
    t = wall / n
    per_iteration, latency = backend.native_costs
    workers = backend.worker_count()
    if backend.auto_workers:
        # as the thread-count formula: CPU time overlaps across the cores (C
        # code that releases the GIL), waiting time across all the threads
        from .schedule import cpu_count

        effective = min(workers, cpu_count() * max(1.0, wall / max(cpu, 1e-9)))
    else:
        effective = max(workers, 1)
    left = remaining if remaining is not None else 1_000_000
    parallel = left * (t / effective + per_iteration) + latency
    return left * t <= parallel
