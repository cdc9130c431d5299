"""Run a loop cell: analyse, run the prologue, hand the iterations to a
backend, commit them in order, run the epilogue.

This is the function API the magics and decorators wrap (``run_cell``); it can
be called and tested without IPython's magic machinery.
"""
from __future__ import annotations

import ast
import bisect
import inspect
import itertools
import operator
import reprlib
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Iterator

from . import seeding
from .analysis import LoopPlan, analyse
from .backends.base import Backend, Job
from .errors import LoopAnalysisError
from .options import Options
from .record import ChunkRecord, ErrorRecord, LastRun
from .replay import replay
from .rewrite import (CHUNK_FN, ITERATION_FN, build_chunk_function, build_iteration_function,
                      classify_call_roots)
from .runtime import ChunkResult, OutputCapture, write_parts
from .schedule import ChunkSizer, ThreadCount, cpu_count

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40
_short.maxlist = 4
_short.maxdict = 4

#: at most this many iterations may be handed out beyond the last committed one
#: (bounds the kernel's memory when one chunk is slow and the others race ahead)
WINDOW_CHUNKS = 8


class _Return(Exception):
    """A ``return`` in a decorated function's prologue or epilogue."""

    def __init__(self, value: Any):
        self.value = value


@dataclass
class Cell:
    """A cell's text and how to compile it so tracebacks show the user's lines."""

    source: str            # the code below the magic line (IPython-transformed)
    filename: str          # its name in linecache
    first_line: int = 2    # line of the source's first line in what the user sees
    flags: int = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree: ast.Module | None = None  # already parsed (a decorated function's body)

    def parse(self) -> ast.Module:
        """Compile the unmodified cell first, so a SyntaxError points at the
        user's own text (DESIGN; as %%timeit does)."""
        if self.tree is not None:
            return self.tree
        padded = "\n" * (self.first_line - 1) + self.source
        tree = compile(padded, self.filename, "exec", ast.PyCF_ONLY_AST | self.flags)
        compile(tree, self.filename, "exec", self.flags)
        return tree  # type: ignore[return-value]


def _exec_block(stmts: list[ast.stmt], cell: Cell, ns: dict[str, Any],
                want_value: bool = False) -> Any:
    """Run prologue/epilogue statements in the namespace as ordinary code; with
    want_value, a trailing expression's value is returned (shown as Out[n])."""
    if not stmts:
        return None
    last = stmts[-1]
    value_expr = last.value if want_value and isinstance(last, ast.Expr) else None
    body = stmts[:-1] if value_expr is not None else stmts
    if body:
        code = compile(ast.Module(body=body, type_ignores=[]), cell.filename, "exec",
                       ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        _run_code(code, ns)
    if value_expr is not None:
        return _run_code(compile(ast.Expression(body=value_expr), cell.filename, "eval",
                                 ast.PyCF_ALLOW_TOP_LEVEL_AWAIT), ns)
    return None


def _run_code(code: Any, ns: dict[str, Any]) -> Any:
    """eval/exec; code with a top-level ``await`` (allowed in notebook cells)
    runs on parloop's event loop."""
    if code.co_flags & inspect.CO_COROUTINE:
        from .backends.tasks import run_on_loop
        return run_on_loop(eval(code, ns))
    return eval(code, ns)


class _Targets:
    """Binds the loop target in the kernel, from the kernel's own items, so the
    loop variable after the loop *is* the kernel's last item."""

    def __init__(self, plan: LoopPlan, cell: Cell, ns: dict[str, Any]):
        assign = ast.Assign(targets=[plan.loop.target], value=ast.Name("___item", ast.Load()))
        ast.copy_location(assign, plan.loop)
        ast.fix_missing_locations(assign)
        self.code = compile(ast.Module(body=[assign], type_ignores=[]), cell.filename, "exec")
        self.ns = ns
        self.loop = plan.loop
        self.names = plan.targets

    def bind(self, item: Any) -> dict[str, Any]:
        env: dict[str, Any] = {"___item": item}
        exec(self.code, self.ns, env)
        del env["___item"]
        return env

    def describe(self, item: Any) -> str:
        try:
            env = self.bind(item)
        except Exception:  # noqa: BLE001 - a description must not fail
            return f"item={_short.repr(item)}"
        return ", ".join(f"{k}={_short.repr(env[k])}" for k in self.names if k in env)


@dataclass
class _Chunk:
    start: int
    items: list


class _Committer:
    """Commits chunk results in iteration order: replays logs, writes output,
    keeps last values, and records errors."""

    def __init__(self, ns: dict[str, Any], targets: _Targets, record: LastRun,
                 on_error: str, t0: float, synced: bool):
        self.synced = synced  # the log holds TARGET entries
        self.ns = ns
        self.targets = targets
        self.record = record
        self.on_error = on_error
        self.next = 0
        self.last_item: tuple[Any] | None = None
        self.snapshot: dict[str, Any] = {}
        self.t0 = t0

    def commit(self, chunk: _Chunk, res: ChunkResult) -> None:
        """Apply one chunk (or its completed prefix); raises the iteration's
        exception when replaying an entry fails as it would have in serial."""
        env_cache: dict[int, dict[str, Any]] = {}

        def target_env(n: int) -> dict[str, Any]:
            env = env_cache.get(n)
            if env is None:
                env = env_cache[n] = self.targets.bind(chunk.items[n])
            return env

        pos = 0
        while True:
            try:
                replay(self.ns, res.log, target_env if self.synced else None, pos)
                break
            except Exception as exc:
                # an entry raised in the kernel (``out[k] = v`` on a list too
                # short): serial would have raised in that iteration
                at = getattr(exc, "parloop_log_pos", pos)
                n = max(bisect.bisect_right(res.marks, at) - 1, 0)
                if self.on_error == "raise":
                    write_parts(res.parts)
                    self._finish_chunk(chunk, res, n + 1)
                    raise _IterationFailed(chunk.start + n, exc, chunk.items[n]) from None
                self.record.errors.append(ErrorRecord(
                    chunk.start + n, self.targets.describe(chunk.items[n]), exc))
                pos = res.marks[n + 1] if n + 1 < len(res.marks) else len(res.log)
        write_parts(res.parts)
        self._finish_chunk(chunk, res, res.done)
        for err in res.errors:
            item = chunk.items[err.index - chunk.start]
            self.record.errors.append(ErrorRecord(err.index, self.targets.describe(item),
                                                  err.exc))

    def _finish_chunk(self, chunk: _Chunk, res: ChunkResult, done: int) -> None:
        self.snapshot.update(res.snapshot)
        if done > 0:
            self.last_item = (chunk.items[done - 1],)
        self.next = chunk.start + done
        self.record.done = self.next
        self.record.chunks.append(ChunkRecord(
            chunk.start, done, res.worker, res.t_start - self.t0, res.t_end - self.t0, res.cpu,
            [e.index for e in res.errors] + ([res.raised.index] if res.raised else [])))

    def finish(self) -> None:
        """Bind the loop variables and the private names' last values."""
        if self.last_item is not None:
            self.ns.update(self.targets.bind(self.last_item[0]))
        self.ns.update(self.snapshot)


class Interrupted(KeyboardInterrupt):
    """A run stopped by the kernel interrupt; says how far it got.  A
    KeyboardInterrupt, so nothing that catches those is surprised."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class _IterationFailed(Exception):
    def __init__(self, index: int, exc: BaseException, item: Any):
        self.index, self.exc, self.item = index, exc, item


def _worker_traceback(tb: TracebackType | None) -> TracebackType | None:
    """Drop parloop's own frames above the chunk function: the traceback starts
    at the user's cell line."""
    t = tb
    while t is not None:
        if t.tb_frame.f_code.co_name in (CHUNK_FN, ITERATION_FN):
            return t
        t = t.tb_next
    return tb


def _annotate(exc: BaseException, index: int, values: str, total: int | None) -> BaseException:
    of = f" of {total}" if total is not None else ""
    note = f"parloop: raised in iteration {index}{of} ({values})"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    return exc.with_traceback(_worker_traceback(exc.__traceback__))


def _total(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        n = operator.length_hint(iterable, -1)
        return n if n >= 0 and not isinstance(iterable, Iterator) else None


class Progress:
    """What the dispatcher tells a live view (the text bar and, later, the widget)."""

    def start(self, record: LastRun) -> None: ...

    def update(self, record: LastRun) -> None: ...

    def close(self, record: LastRun) -> None: ...


def dispatch(backend: Backend, iterable: Any, total: int | None, opts: Options,
             committer: _Committer, record: LastRun, progress: Progress,
             threads: ThreadCount | None) -> None:
    """Hand chunks out, keep the workers fed, commit contiguous prefixes as
    they complete; stop early on an error (on_error=raise) or an interrupt."""
    if isinstance(committer.targets.loop, ast.AsyncFor):
        from .backends.tasks import AsyncTaker
        take: Any = AsyncTaker(iterable)
    else:
        take = _Taker(iterable)
    # a backend may size its own chunks (asyncio tasks: a chunk is a batch of
    # concurrent iterations, not a stretch of work)
    sizer = ChunkSizer(opts.chunksize or getattr(backend, "chunksize", None),
                       max(backend.worker_count(), 1), total)
    in_flight: dict[Future, _Chunk] = {}
    results: dict[int, tuple[_Chunk, ChunkResult]] = {}
    next_start = 0
    exhausted = False
    stop_at: int | None = None       # an iteration raised (on_error=raise)
    failure: tuple[int, BaseException, Any] | None = None
    largest = 1

    def concurrency() -> int:
        if threads is not None:
            n = threads.threads()
            if total is not None:
                n = min(n, max(total, 1))  # no more threads than iterations
            record.threads.update(threads=n)
            record.workers = max(record.workers, n)
        else:
            n = backend.max_in_flight()
        sizer.workers = n
        return n

    def collect(fut: Future) -> None:
        chunk = in_flight.pop(fut)
        try:
            res = fut.result()
        except BaseException:
            if stop_at is not None and chunk.start > stop_at:
                return  # cancelled after an earlier iteration failed
            raise
        sizer.observe(res.done, res.t_end - res.t_start)
        if threads is not None:
            threads.observe(res.done, res.cpu, res.t_end - res.t_start)
            record.threads.update(t1=threads.t1, t2=threads.t2, cores=threads.cores)
        results[chunk.start] = (chunk, res)

    poll = getattr(backend, "poll", None)
    progress.start(record)
    try:
        while True:
            while (not exhausted and stop_at is None and len(in_flight) < concurrency()
                   and next_start - committer.next < max(WINDOW_CHUNKS * largest *
                                                         concurrency(), 1000)):
                remaining = None if total is None else total - next_start
                size = sizer.next_size(remaining)
                items = take(next_start, size)
                if not items:
                    exhausted = True
                    break
                if take.error is not None:
                    exhausted = True
                largest = max(largest, len(items))
                chunk = _Chunk(next_start, items)
                in_flight[backend.submit(items, next_start)] = chunk
                next_start += len(items)
                if len(items) < size:
                    exhausted = True
            if not in_flight and committer.next >= next_start:
                break
            if in_flight:
                if poll is not None:
                    poll()
                done, _ = wait(list(in_flight), timeout=0.25, return_when=FIRST_COMPLETED)
                for fut in done:
                    collect(fut)
            while committer.next in results:
                chunk, res = results.pop(committer.next)
                if res.halted and (stop_at is None or res.start <= stop_at):
                    committer.commit(chunk, res)
                    raise KeyboardInterrupt
                try:
                    committer.commit(chunk, res)
                except _IterationFailed as f:
                    failure = (f.index, f.exc, f.item)
                    break
                if res.raised is not None:
                    failure = (res.raised.index, res.raised.exc,
                               chunk.items[res.raised.index - chunk.start])
                    break
            if failure is not None:
                break
            # an error further on: stop what comes after it, finish what comes before
            for chunk, res in list(results.values()):
                if res.raised is not None and (stop_at is None or res.raised.index < stop_at):
                    stop_at = res.raised.index
                    backend.cancel_after(stop_at)
                    for c in [c for c, _ in results.values() if c.start > stop_at]:
                        del results[c.start]
            if hasattr(backend, "in_flight"):
                record.threads["in_flight"] = backend.in_flight()
            progress.update(record)
    except KeyboardInterrupt:
        record.interrupted = True
        backend.interrupt()
        _drain(in_flight, results, committer, timeout=2.0)
        progress.close(record)
        raise Interrupted(
            f"parloop: interrupted after {committer.next} of "
            f"{'?' if total is None else total} iterations; iterations 0..{committer.next - 1}"
            " were applied") from None
    finally:
        if stop_at is not None or failure is not None:
            backend.cancel_after(failure[0] if failure else stop_at)  # type: ignore[arg-type]
        # wait for the chunks still running (they stop at their next iteration)
        if in_flight and not record.interrupted:
            wait(list(in_flight), timeout=5.0)
    progress.close(record)
    if failure is None and take.error is not None:
        raise take.error
    record.notes.extend(getattr(backend, "events", ()))
    if hasattr(backend, "peak"):
        record.threads["peak_in_flight"] = backend.peak
    retried = getattr(backend, "retried", ())
    for c in record.chunks:
        c.retried = c.start in retried
    if failure is not None:
        index, exc, item = failure
        record.errors.append(ErrorRecord(index, committer.targets.describe(item), exc))
        raise _IterationFailed(index, exc, item)


class _Taker:
    """How chunks are cut from the iterable: a ``range`` into sub-ranges (never
    materialised: a chunk of a million iterations is three integers on the
    wire), a list or tuple by slicing, anything else by pulling items.

    An iterator that raises after yielding some items keeps those items (they
    run, as in serial) and the exception is raised once they are committed."""

    def __init__(self, iterable: Any):
        self.error: BaseException | None = None
        self.sliceable = isinstance(iterable, (range, list, tuple))
        self.iterable = iterable
        self.it = None if self.sliceable else iter(iterable)

    def __call__(self, start: int, size: int) -> Any:
        if self.sliceable:
            return self.iterable[start:start + size]
        out: list = []
        if self.error is None:
            try:
                out.extend(itertools.islice(self.it, size))  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001 - raised after the items before it ran
                self.error = e
        return out


def _drain(in_flight: dict[Future, _Chunk], results: dict[int, tuple[_Chunk, ChunkResult]],
           committer: _Committer, timeout: float) -> None:
    """After an interrupt: take what finishes within ``timeout`` and commit the
    contiguous prefix of completed iterations."""
    deadline = time.monotonic() + timeout
    while in_flight and time.monotonic() < deadline:
        done, _ = wait(list(in_flight), timeout=max(deadline - time.monotonic(), 0),
                       return_when=FIRST_COMPLETED)
        for fut in done:
            chunk = in_flight.pop(fut)
            try:
                results[chunk.start] = (chunk, fut.result())
            except BaseException:  # noqa: B902 - a worker lost while stopping
                pass
    while committer.next in results:
        chunk, res = results.pop(committer.next)
        try:
            committer.commit(chunk, res)
        except _IterationFailed:
            break
        if res.done < len(chunk.items) or res.raised is not None:
            break


def run_cell(cell: Cell, ns: dict[str, Any], opts: Options,
             make_backend: Callable[[Options, LoopPlan], Backend],
             progress: Progress | None = None) -> Any:
    """Run a loop cell under ``opts``; returns the value of a trailing
    expression (as serial execution would display it)."""
    import parloop

    __tracebackhide__ = True  # IPython: tracebacks start at the user's cell
    tree = cell.parse()
    plan = analyse(tree)
    if opts.explain:
        from .explain import render
        print(render(plan, opts, ns))
        return None
    backend = make_backend(opts, plan)

    _exec_block(plan.prologue, cell, ns)
    iterable = eval(compile(ast.Expression(body=plan.loop.iter), cell.filename, "eval"), ns)
    total = _total(iterable)
    worker_roots = classify_call_roots(plan, ns)
    # workers with their own copies of the items send the loop target back
    sync_names = set() if backend.shares_memory else plan.target_roots | plan.stored_targets
    hooked = opts.seed is not None or opts.timeout is not None
    if plan.is_async:
        module = build_iteration_function(plan, worker_roots, hooked=hooked)
    else:
        module = build_chunk_function(plan, worker_roots, sync_names=sync_names, hooked=hooked)
    record = LastRun(magic=opts.magic, backend=backend.name,
                     options=dict(opts.given), workers=backend.worker_count(), total=total,
                     roles=plan.roles())
    parloop.last_run = record
    job = Job(chunk_module=module, filename=cell.filename, cell_source=cell.source, ns=ns,
              inputs={n for n in plan.inputs | worker_roots if n in ns},
              private=set(plan.private),
              on_error=opts.on_error, seed=opts.seed, timeout=opts.timeout)
    backend.prepare(job)
    threads = None
    if backend.name == "tasks":
        record.threads.update(mode="asyncio tasks", tasks=backend.worker_count())
    if backend.name == "threads" and opts.threads is None:
        from .backends.threads import MAX_THREADS
        threads = ThreadCount(cores=cpu_count(), cap=MAX_THREADS)
        record.threads.update(mode="auto", cores=threads.cores, cap=MAX_THREADS)
    targets = _Targets(plan, cell, ns)
    t0 = time.perf_counter()
    committer = _Committer(ns, targets, record, opts.on_error, t0, bool(sync_names))
    if opts.seed is not None:
        seeding.begin_run()
    try:
        with OutputCapture():
            try:
                dispatch(backend, iterable, total, opts, committer, record,
                         progress or Progress(), threads)
            finally:
                committer.finish()
                record.wall = time.perf_counter() - t0
    except _IterationFailed as f:
        raise _annotate(f.exc, f.index, targets.describe(f.item), total) from None
    finally:
        if opts.seed is not None:
            seeding.end_run()
        backend.finish()
    if record.errors:
        _report_errors(record, opts.on_error)
    return _exec_block(plan.epilogue, cell, ns, want_value=True)


def _report_errors(record: LastRun, on_error: str) -> None:
    verb = "skipped" if on_error == "skip" else "collected in parloop.last_run.errors"
    lines = [f"parloop: {len(record.errors)} iteration(s) raised and were {verb}:"]
    for e in record.errors[:10]:
        lines.append(f"  iteration {e.index} ({e.values}): "
                     f"{type(e.exception).__name__}: {e.exception}")
    if len(record.errors) > 10:
        lines.append(f"  ... and {len(record.errors) - 10} more")
    print("\n".join(lines), file=sys.stderr)


__all__ = ["Cell", "run_cell", "LoopAnalysisError", "Progress"]
