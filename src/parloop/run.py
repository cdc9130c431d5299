"""Run a loop cell: analyse, run the prologue, hand the iterations to a
backend, commit them in order, run the epilogue.

This is the function API the magics and decorators wrap (``run_cell``); it can
be called and tested without IPython's magic machinery.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import operator
import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Iterator

from . import native, seeding
from .analysis import LoopPlan, analyse, prologue_names
from .analysis.desugar import desugar
from .analysis.functions import notebook_functions
from .analysis.namespace import (
    alias_groups,
    cell_sources,
    check_helpers_read_no_body_names,
    check_iterable_reads_nothing_the_body_changes,
    check_iterated_not_changed,
    check_no_shared_file_writes,
    plain_roots,
    stored,
    submodules,
    watched,
)
from .backends.base import Backend, Job
from .errors import LoopAnalysisError
from .fingerprint import Baseline, watch_all
from .log.commit import Committer, Interrupted, IterationFailed, Speculation, TargetBinder
from .options import Options
from .progress.base import LiveState, Progress
from .record import LastRun, RemoteTraceback
from .rewrite import (
    CHUNK_FN,
    ITERATION_FN,
    build_chunk_function,
    build_function_factory,
    build_iteration_function,
    changed_targets,
    classify_call_roots,
)
from .runtime import LoopShape, OutputCapture
from .schedule import Dispatcher, ThreadCount, cpu_count, make_taker
from .tracking import run_lock


class _Return(Exception):
    """A ``return`` in a decorated function's prologue or epilogue."""

    def __init__(self, value: Any):
        self.value = value


@dataclass
class Cell:
    """A cell's text and how to compile it so tracebacks show the user's lines."""

    source: str  # the code below the magic line (IPython-transformed)
    filename: str  # its name in linecache
    first_line: int = 2  # line of the source's first line in what the user sees
    flags: int = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree: ast.Module | None = None  # already parsed (a decorated function's body)

    def parse(self) -> ast.Module:
        """Compile the unmodified cell first, so a SyntaxError points at the
        user's own text (as %%timeit does)."""
        if self.tree is not None:
            return self.tree
        padded = "\n" * (self.first_line - 1) + self.source
        tree = compile(padded, self.filename, "exec", ast.PyCF_ONLY_AST | self.flags)
        compile(tree, self.filename, "exec", self.flags)
        return tree  # type: ignore[return-value]


def _exec_block(
    stmts: list[ast.stmt], cell: Cell, ns: dict[str, Any], want_value: bool = False
) -> Any:
    """Run prologue/epilogue statements in the namespace as ordinary code; with
    want_value, a trailing expression's value is returned (shown as Out[n])."""
    if not stmts:
        return None
    last = stmts[-1]
    value_expr = last.value if want_value and isinstance(last, ast.Expr) else None
    body = stmts[:-1] if value_expr is not None else stmts
    if body:
        code = compile(
            ast.Module(body=body, type_ignores=[]),
            cell.filename,
            "exec",
            ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        )
        _run_code(code, ns)
    if value_expr is not None:
        return _run_code(
            compile(
                ast.Expression(body=value_expr),
                cell.filename,
                "eval",
                ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            ),
            ns,
        )
    return None


def _run_code(code: Any, ns: dict[str, Any]) -> Any:
    """eval/exec; code with a top-level ``await`` (allowed in notebook cells)
    runs on parloop's event loop."""
    if code.co_flags & inspect.CO_COROUTINE:
        from .backends.tasks import run_on_loop

        return run_on_loop(eval(code, ns))
    return eval(code, ns)


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


def _native_first(
    plan: LoopPlan,
    cell: Cell,
    ns: dict[str, Any],
    opts: Options,
    backend: Backend,
    take: Any,
    total: int | None,
    record: LastRun,
    threads: ThreadCount | None,
    start: int = 0,
) -> tuple[int, tuple[int, float, float] | None]:
    """Time the first iterations natively in the kernel; if the workers cannot
    win against iterations this cheap, run the whole loop natively (see
    parloop.native).  Returns (iterations run, their measurement)."""
    if not native.eligible(opts, plan, backend, total):
        return start, None
    loop = native.NativeLoop(plan, cell.filename, ns)
    ran, wall, cpu, batch = start, 0.0, 0.0, 1
    try:
        while wall < native.PROBE_SECONDS:
            items = take(ran, batch)
            if not items:
                break
            n, w, c = loop.run(items, ran)
            ran, wall, cpu, batch = ran + n, wall + w, cpu + c, batch * 2
            if loop.broke:
                record.native = True
                record.broke_at = ran - 1
                return ran, None
            if take.error is not None and n == len(items):
                raise take.error
        remaining = None if total is None else total - ran
        if remaining == 0 or native.native_wins(wall, cpu, ran - start, remaining, backend):
            record.native = True
            record.notes.append(
                f"ran natively in the kernel: an iteration costs {wall / max(ran, 1) * 1e6:.2f}"
                f" us, less than handing it to a worker"
            )
            rest = take.iterable[ran:] if take.sliceable else take.it
            n, w, c = loop.run(rest, ran)
            ran += n
            if loop.broke:
                record.broke_at = ran - 1
            if take.error is not None:
                raise take.error
        return ran, (ran - start, wall, cpu)
    except BaseException as e:
        index = loop.failed_at
        if index is not None and not isinstance(e, KeyboardInterrupt):
            of = f" of {total}" if total is not None else ""
            e.add_note(f"parloop: raised in iteration {index}{of} ({loop.values()})")
        raise
    finally:
        record.done = max(record.done, ran)


def run_cell(
    cell: Cell,
    ns: dict[str, Any],
    opts: Options,
    make_backend: Callable[[Options, LoopPlan], Backend],
    progress: Progress | None = None,
) -> Any:
    """Run a loop cell under ``opts``; returns the value of a trailing
    expression (as serial execution would display it)."""
    import parloop

    __tracebackhide__ = True  # IPython: tracebacks start at the user's cell
    tree = desugar(cell.parse(), ns)
    plain, stateful = plain_roots(tree, ns)
    plan = analyse(tree, plain_roots=plain, copies=opts.private, stateful=stateful)
    _check_supported(plan, opts, ns)
    functions = {} if plan.is_async else notebook_functions(plan.loop.body, ns, plain, stateful)
    check_helpers_read_no_body_names(plan, ns, functions)
    check_iterated_not_changed(plan, ns, functions)
    check_iterable_reads_nothing_the_body_changes(plan, ns, functions)
    check_no_shared_file_writes(plan, ns, functions)
    if opts.explain:
        from .analysis.explain import render

        print(render(plan, opts, ns))
        return None
    backend = make_backend(opts, plan)
    backend.precheck(ns, plan.inputs - prologue_names(plan))

    _exec_block(plan.prologue, cell, ns)
    iterable = eval(compile(ast.Expression(body=plan.loop.iter), cell.filename, "eval"), ns)
    total = _total(iterable)
    worker_roots = classify_call_roots(plan, ns)
    # workers with their own copies of the items send the loop target back
    sync_names = (
        set()
        if backend.shares_memory
        # a range's items are ints: nothing to change in place
        else plan.target_roots
        | plan.stored_targets
        | (set() if isinstance(iterable, range) else changed_targets(plan))
    )
    hooked = opts.seed is not None or opts.timeout is not None or plan.body_seeds
    # notebook functions the body calls run as rewritten copies in the workers:
    # their writes to globals are logged; globals written and read are shared
    fn_writes = set().union(*(fp.writes() for fp in functions.values()))
    written = plan.roots | (plan.call_roots - worker_roots) | fn_writes
    shared = (
        plan.shared(worker_roots)
        | (plan.inputs & fn_writes)
        | set().union(*(written & fp.reads for fp in functions.values()))
    )
    canon = alias_groups(plan, ns, written)
    streams = (
        tuple(
            sorted(
                n
                for n in plan.inputs
                if n in ns and seeding.is_generator(ns[n]) and n not in shared
            )
        )
        if opts.seed is not None
        else ()
    )
    shared = frozenset(shared | set(canon))
    if plan.is_async:
        module = build_iteration_function(plan, worker_roots, hooked=hooked)
    else:
        module = build_chunk_function(
            plan,
            worker_roots,
            sync_names=sync_names,
            hooked=hooked,
            shared=shared,
            copies=set(functions),
            streams=streams,
        )
    factories = tuple(
        (
            fp.path,
            build_function_factory(fp, shared, set(functions), cell.filename),
            key,
            (fp.fdef.name, fp.fdef.lineno),
        )
        for key, fp in functions.items()
    )
    record = LastRun(
        magic=opts.magic,
        backend=backend.name,
        options=dict(opts.given),
        workers=backend.worker_count(),
        total=total,
        roles=plan.roles(),
    )
    parloop.last_run = record
    # the private= copies are written back by replay, not by their last values
    private = frozenset(plan.private - set(plan.copies))
    watch = tuple(
        p
        for p in watched(plan, ns, worker_roots, functions)
        if not (len(p) == 1 and p[0] in streams)
    )
    shape = LoopShape(
        private=private,
        shared=shared,
        functions=factories,
        streams=streams,
        same_key=frozenset(plan.same_key & shared) - set(canon),
        checked=frozenset(plan.checked),
        deleted=frozenset(plan.deleted),
        copies=plan.copies,
        body_seeds=plan.body_seeds,
        watch=watch,
        stored=() if backend.shares_memory else stored(plan, ns),
    )
    lock = run_lock() if shape.shared and backend.shares_memory else contextlib.nullcontext()
    # each iteration's private= copy is made from the object as it was before
    # the loop (the commits replay into the notebook's own object meanwhile)
    originals = {n: copy.deepcopy(ns[n]) for n in plan.copies if n in ns}
    originals.update({n: ns[n] for n in streams})
    job = Job(
        originals=originals if backend.shares_memory else None,
        chunk_module=module,
        filename=cell.filename,
        cell_source=cell.source,
        ns=ns,
        inputs={n for n in plan.inputs | worker_roots if n in ns},
        private=set(private),
        on_error=opts.on_error,
        seed=opts.seed,
        timeout=opts.timeout,
        live=bool(progress is not None and progress.wants_live),
        shape=shape,
        lock=lock,
        imports=submodules(plan, ns),
        sources=cell_sources(plan, ns) if not backend.shares_memory else {},
    )
    backend.prepare(job)
    threads = None
    if backend.concurrent_chunks:
        record.threads.update(mode="asyncio tasks", tasks=backend.worker_count())
    if backend.auto_workers and opts.threads is None:
        from .backends.threads import MAX_THREADS

        threads = ThreadCount(cores=cpu_count(), cap=MAX_THREADS)
        record.threads.update(mode="auto", cores=threads.cores, cap=MAX_THREADS)
    targets = TargetBinder(plan, cell.filename, ns)
    t0 = time.perf_counter()
    spec = None
    if (shape.speculative or shape.watch or canon) and not plan.is_async:
        from .backends.threads import compile_chunk_function

        spec = Speculation(
            shape=shape,
            kernel_fn=compile_chunk_function(job, ns),
            on_error=opts.on_error,
            seed=opts.seed,
            lock=lock,
            originals=originals,
            suggest=frozenset(shape.shared & plan.call_roots),
            canon=canon,
        )
    committer = Committer(
        ns, targets, record, opts.on_error, t0, bool(sync_names), spec, frozenset(plan.copies)
    )
    if backend.shares_memory:
        committer.before_serial = lambda index: _put_back(backend, committer.baseline, index)
    seeded = opts.seed is not None or plan.body_seeds
    if seeded:
        seeding.begin_run()
    take = make_taker(iterable, isinstance(plan.loop, ast.AsyncFor))
    view = progress or Progress()
    live = LiveState(concurrent=backend.concurrent_chunks)
    try:
        with OutputCapture():
            view.start(record, live)
            try:
                ran = 0
                if spec is not None and shape.watch and backend.shares_memory:
                    ran = _hidden_probe(
                        shape, ns, committer, take, opts, total, view, record, live, backend
                    )
                measured = None
                if not committer.stopped:
                    probed = ran
                    ran, measured = _native_first(
                        plan, cell, ns, opts, backend, take, total, record, threads, start=ran
                    )
                    if committer.baseline is not None and ran > probed:
                        # iterations ran in the kernel meanwhile, in order:
                        # what they changed is the serial state
                        committer.baseline = Baseline(
                            watch_all(shape.watch, ns, keep=True), committer.baseline.cost
                        )
                if not record.native and not committer.stopped:
                    Dispatcher(
                        backend,
                        take,
                        total,
                        opts,
                        committer,
                        record,
                        view,
                        live,
                        threads,
                        start=ran,
                        measured=measured,
                    ).run()
            except KeyboardInterrupt:
                record.interrupted = True
                raise
            finally:
                committer.finish()
                record.wall = time.perf_counter() - t0
                view.close(record, live)
    except IterationFailed as f:
        # a worker's frames are the exception's cause (RemoteTraceback): kept;
        # anything else parloop's own machinery chained is dropped
        err = f.error
        cause = err.exc.__cause__
        remote = cause if isinstance(cause, RemoteTraceback) else None
        raise _annotate(err.exc, err.index, err.values, total) from remote
    finally:
        if seeded:
            seeding.end_run()
        backend.finish()
        note = record.dependence_note()
        if note:
            record.notes.append(note)
    if record.errors:
        _report_errors(record, opts.on_error)
    epilogue = plan.epilogue
    if record.broke_at is not None:
        epilogue = epilogue[plan.orelse_count :]  # `for ... else`: no else after a break
    return _exec_block(epilogue, cell, ns, want_value=True)


def _hidden_probe(
    shape: LoopShape,
    ns: dict[str, Any],
    committer: Committer,
    take: Any,
    opts: Options,
    total: int | None,
    view: Progress,
    record: LastRun,
    live: LiveState,
    backend: Backend,
) -> int:
    """Threads share the kernel's objects, so a hidden change would race: the
    first iteration runs in the kernel with the watched objects fingerprinted
    around it; if one changed, the whole loop runs serially in the kernel.

    Otherwise the fingerprints, and the objects' pickles, become the run's
    baseline (``committer.baseline``): the dispatcher commits a chunk once a
    check against it vouches for the chunk (schedule.Dispatcher.vouched), and
    a change found there -- an iteration after the first that takes another
    path -- makes the kernel stop the threads, put the objects back
    (:func:`parloop.fingerprint.restore`) and run serially from the first
    chunk not vouched for (:func:`_put_back`).  An object whose state cannot
    be put back keeps the whole loop serial instead.  Returns the iterations
    run."""
    from .fingerprint import first_change, restorable
    from .schedule import ChunkSizer, _serial_rest

    items = take(0, 1)
    if not items:
        return 0
    concurrent = backend.max_in_flight() > 1
    before = watch_all(shape.watch, ns, keep=concurrent)
    committer.run_direct(items, 0)
    if committer.stopped:
        return 1
    t = time.perf_counter()
    why = first_change(before, "iteration 0")
    cost = time.perf_counter() - t
    if not why and concurrent:
        fixed = [w for w in before if not restorable(w)]
        if fixed:
            why = (
                f"{fixed[0].label} is handed to code parloop cannot see, and its state cannot "
                "be put back should a later iteration change it while other threads run"
            )
        else:
            committer.baseline = Baseline(before, cost)
    if not why:
        return 1
    committer.serial = True
    record.hidden = why
    record.serial_from = 0
    sizer = ChunkSizer(opts.chunksize, 1, total)
    _serial_rest(committer, [], take, 1, False, sizer, view, record, live)
    return committer.next


def _put_back(backend: Backend, baseline: Baseline | None, index: int) -> None:
    """A check found a watched object changed (hidden state), and the rest of
    the loop runs serially from iteration ``index``, the first that no check
    vouched for.  Workers that share the kernel's objects may have changed
    them out of order meanwhile: stop them, wait, and put every changed
    object back to the baseline -- the state the iterations before ``index``
    saw (see parloop.fingerprint.Baseline)."""
    if baseline is None:
        return
    backend.quiesce(index)
    label = baseline.put_back()
    if label:
        raise RuntimeError(
            f"parloop: iterations from {index} on changed {label} through a path the "
            "log does not hold while other threads ran, and its state could not be put "
            f"back: iterations 0..{index - 1} are applied in order, but {label} holds "
            "changes of later iterations. Run this loop serially, or under %%parallel "
            "(each engine works on its own copy)"
        )


def _check_supported(plan: LoopPlan, opts: Options, ns: dict[str, Any]) -> None:
    """What the analysis accepts but this run cannot do, said before anything runs."""
    if plan.is_async and (plan.has_break or plan.read_roots or plan.checked):
        what = (
            "`break`"
            if plan.has_break
            else f"reading `{sorted(plan.read_roots)[0]}`, which the loop also writes"
            if plan.read_roots
            else f"reading `{sorted(plan.checked)[0]}` before every path assigns it"
        )
        raise LoopAnalysisError(
            f"a loop body that awaits cannot be checked for dependences between its "
            f"iterations ({what}); keep this loop serial, or move the awaits into a "
            "function the loop calls",
            lineno=plan.loop.lineno,
        )
    for name in plan.copies:
        if name not in ns and name not in prologue_names(plan):
            raise LoopAnalysisError(
                f"private={name}: `{name}` is not defined before the loop", name=name
            )


def _report_errors(record: LastRun, on_error: str) -> None:
    verb = "skipped" if on_error == "skip" else "collected in parloop.last_run.errors"
    lines = [f"parloop: {len(record.errors)} iteration(s) raised and were {verb}:"]
    for e in record.errors[:10]:
        lines.append(
            f"  iteration {e.index} ({e.values}): {type(e.exception).__name__}: {e.exception}"
        )
    if len(record.errors) > 10:
        lines.append(f"  ... and {len(record.errors) - 10} more")
    print("\n".join(lines), file=sys.stderr)


__all__ = ["Cell", "run_cell", "LoopAnalysisError", "Progress", "Interrupted"]
