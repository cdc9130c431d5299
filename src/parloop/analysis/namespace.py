"""The cell against the namespace's values: what the analysis of the text
alone cannot say (which names are modules, which objects share state, what
the body hands to code, which cells define the functions it calls).  Reads
the namespace, runs nothing."""

from __future__ import annotations

import ast
import inspect
import io
import itertools
import sys
import types
from typing import Any

from ..errors import LoopAnalysisError
from . import LoopPlan
from .scopes import code_names, global_loads, walk_scope


def stored(plan: LoopPlan, ns: dict[str, Any]) -> tuple[str, ...]:
    """Inputs whose objects a write may store (engines send such values back
    as references to the kernel's own objects)."""
    from ..fingerprint import watchable
    from .hidden import stored_inputs

    return tuple(
        sorted(
            n for n in stored_inputs(plan.loop.body, plan.inputs) if n in ns and watchable(ns[n])
        )
    )


#: objects visited per name when looking for aliasing between outside names
ALIAS_REACH = 10_000


def reachable(value: Any) -> set[int]:
    """ids of the mutable objects reachable from ``value``, two levels deep
    (attributes of instances, items of containers), at most ALIAS_REACH."""
    from ..fingerprint import watchable

    out: set[int] = set()
    level = [value]
    for _ in range(3):
        nxt: list[Any] = []
        for v in level:
            if not watchable(v) or id(v) in out:
                continue
            out.add(id(v))
            if len(out) > ALIAS_REACH:
                return out
            if isinstance(v, dict):
                nxt.extend(itertools.islice(v.values(), ALIAS_REACH))
            elif isinstance(v, (list, tuple, set)):
                nxt.extend(itertools.islice(v, ALIAS_REACH))
            elif hasattr(v, "__dict__") and not isinstance(v, type):
                nxt.extend(vars(v).values())
        level = nxt
    return out


def alias_groups(
    plan: LoopPlan, ns: dict[str, Any], written: set[str]
) -> dict[str, tuple[str, bool]]:
    """Outside names whose objects share state with an object the loop writes
    (``a = b = {}``; ``opt = SGD(model.w)``: ``opt.step()`` changes what
    ``model`` reads): the dependence test must take them for one object.
    name -> (group key, whole: the objects are not identical, so keys of one
    say nothing of the other: every access is to the whole group)."""
    reads = {n for n in plan.inputs if n in ns}
    writes = {n for n in written if n in ns}
    if not writes or not reads - writes:
        return {}
    reach = {n: reachable(ns[n]) for n in reads | writes}
    out: dict[str, tuple[str, bool]] = {}
    for w in sorted(writes):
        for r in sorted(reads):
            if r == w or not reach[w] & reach[r]:
                continue
            key = out.get(w, (w, False))[0]
            whole = ns[w] is not ns[r]
            out[w] = (key, whole or out.get(w, (key, False))[1])
            out[r] = (key, whole)
    return out


def cell_sources(plan: LoopPlan, ns: dict[str, Any]) -> dict[str, Any]:
    """For engines' tracebacks: the lines of the notebook cells that define
    the functions (and classes) the body reads, and which function lives in
    which cell (cloudpickle sends code as ``<dynamic-code>``), so a frame
    inside ``boom`` shows ``boom``'s own lines."""
    import linecache

    where: dict[str, str] = {}

    def note(f: Any) -> None:
        if isinstance(f, types.FunctionType) and f.__globals__ is ns:
            where.setdefault(f.__name__, f.__code__.co_filename)
            for g in f.__code__.co_names:  # the functions it calls, one level
                h = ns.get(g)
                if isinstance(h, types.FunctionType) and h.__globals__ is ns:
                    where.setdefault(h.__name__, h.__code__.co_filename)

    for name in plan.inputs:
        v = ns.get(name)
        note(v)
        cls = v if isinstance(v, type) else type(v)
        if getattr(cls, "__module__", None) == "__main__":
            for f in vars(cls).values():
                note(f)
    files = {}
    for f in set(where.values()):
        lines = linecache.getlines(f)
        if lines and sum(map(len, lines)) < 1_000_000:
            files[f] = lines
    return {"files": files, "functions": {n: f for n, f in where.items() if f in files}}


def submodules(plan: LoopPlan, ns: dict[str, Any]) -> tuple[str, ...]:
    """Submodules the body reaches as attributes of a module input
    (``xml.dom.minidom.parseString``) that the kernel has imported."""
    out: list[str] = []
    for node in ast.walk(plan.loop):
        if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
            continue
        chain: list[str] = []
        n: ast.AST = node
        while isinstance(n, ast.Attribute):
            chain.append(n.attr)
            n = n.value
        if not isinstance(n, ast.Name) or not isinstance(ns.get(n.id), types.ModuleType):
            continue
        name = ns[n.id].__name__
        for part in reversed(chain):
            name = f"{name}.{part}"
            if name not in sys.modules:
                break
            if name not in out:
                out.append(name)
    return tuple(out)


def check_helpers_read_no_body_names(
    plan: LoopPlan, ns: dict[str, Any], functions: dict[str, Any]
) -> None:
    """Reject a loop whose body binds a name (its target, or a name it
    assigns or reduces) that a notebook function it calls reads as a global
    (``scale = scale * 2`` in the body, ``return v * scale`` in ``apply``).
    In serial Python such a function sees the value the body bound last --
    this iteration's, or the one before's -- but a loop body's names are
    private to each iteration here, so a copy of the function in a worker
    would see the value from before the loop: a silently different answer.
    Functions are followed three calls deep, by their bytecode (closures,
    which the analysis does not rewrite, included)."""
    bound = plan.private | set(plan.targets) | set(plan.reductions)
    if not bound:
        return
    seen: set[int] = set()

    def reads(fn: Any, depth: int) -> tuple[str, str] | None:
        if id(fn) in seen or depth > 3:
            return None
        seen.add(id(fn))
        if not isinstance(fn, types.FunctionType) or fn.__globals__ is not ns:
            return None
        loads = global_loads(fn.__code__)
        if loads & bound:
            return fn.__name__, min(loads & bound)
        for g in sorted(loads):
            found = reads(ns.get(g), depth + 1)
            if found is not None:
                return found
        return None

    def reject(line: int, called: str, fname: str, g: str) -> None:
        via = "" if fname == called else f" (through `{fname}`)"
        raise LoopAnalysisError(
            f"`{called}` (called by the loop){via} reads the global `{g}`, which the loop "
            f"body binds: in serial Python each call sees the value the body bound last, "
            f"here a worker's copy would see the value from before the loop; pass `{g}` "
            f"to `{called}` as an argument",
            lineno=line,
            name=g,
        )

    for st in plan.loop.body:
        for n in walk_scope(st):
            if not isinstance(n, ast.Call):
                continue
            if isinstance(n.func, ast.Name):
                found = reads(ns.get(n.func.id), 1)
                if found is not None:
                    reject(n.lineno, n.func.id, *found)
            elif isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name):
                key = f"{n.func.value.id}.{n.func.attr}"
                fp = functions.get(key)
                if fp is not None and fp.reads & bound:
                    reject(n.lineno, key, key, min(fp.reads & bound))


#: calls that iterate their argument in place (``sorted``, ``list``... copy it)
_IN_PLACE = frozenset({"enumerate", "zip", "reversed", "iter"})


def _iterated(node: ast.expr, ns: dict[str, Any]) -> set[str]:
    """The outside names whose objects the loop's iterable runs over lazily,
    as serial Python does: ``items``, ``enumerate(items)``, ``d.items()``."""
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id in _IN_PLACE and not isinstance(ns.get(node.func.id), types.FunctionType):
            return set().union(*(_iterated(a, ns) for a in node.args)) if node.args else set()
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("items", "keys", "values")
        and isinstance(node.func.value, ast.Name)
        and isinstance(ns.get(node.func.value.id), dict)
    ):
        return {node.func.value.id}
    return set()


def _current_key(loop: ast.For | ast.AsyncFor, root: str, ns: dict[str, Any]) -> str | None:
    """The loop target that names the item being visited in ``root``, when
    writing ``root[key] = v`` only replaces it (``for i, v in
    enumerate(xs)``: ``i``; ``for k in d`` or ``for k, v in d.items()``: ``k``)."""
    it, target = loop.iter, loop.target

    def first(t: ast.expr) -> str | None:
        if isinstance(t, ast.Tuple) and t.elts and isinstance(t.elts[0], ast.Name):
            return t.elts[0].id
        return None

    if (
        isinstance(it, ast.Call)
        and isinstance(it.func, ast.Name)
        and it.func.id == "enumerate"
        and len(it.args) == 1
        and not it.keywords
        and isinstance(it.args[0], ast.Name)
        and it.args[0].id == root
    ):
        return first(target)
    if isinstance(ns.get(root), dict):
        if isinstance(it, ast.Name) and isinstance(target, ast.Name):
            return target.id
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute):
            if it.func.attr == "keys" and isinstance(target, ast.Name):
                return target.id
            if it.func.attr == "items":
                return first(target)
    return None


def check_iterated_not_changed(
    plan: LoopPlan, ns: dict[str, Any], functions: dict[str, Any]
) -> None:
    """Reject a loop whose body changes the object it iterates over
    (``for x in items: items.append(...)``, ``del d[k]`` inside ``for k in
    d``).  Serial Python's loop sees such changes as it goes (more items,
    other items, or a RuntimeError for a dict that changed size); parloop
    takes the items when the loop starts.  Replacing the item being visited
    (``xs[i] = ...`` in ``for i, x in enumerate(xs)``, ``d[k] = ...`` in
    ``for k in d``) changes nothing the loop sees, and stays allowed."""
    roots = _iterated(plan.loop.iter, ns) - plan.private
    if not roots:
        return
    for fp in functions.values():
        hit = roots & fp.writes()
        if hit:
            raise _changes_iterated(min(hit), plan.loop.lineno, f" (in `{fp.name}`)")
    for st in plan.loop.body:
        for n in walk_scope(st):
            if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = n.targets if isinstance(n, (ast.Assign, ast.Delete)) else [n.target]
                for t in targets:
                    _check_target(t, roots, plan, ns, isinstance(n, ast.Delete))
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                recv = n.func.value
                if (
                    isinstance(recv, ast.Name)
                    and recv.id in roots
                    and any(
                        m.kind == "call" and m.root == recv.id and m.lineno == n.lineno
                        for m in plan.mutations
                    )
                ):
                    raise _changes_iterated(recv.id, n.lineno, "")


#: builtins and itertools that consume their arguments lazily, item by item
_LAZY_CALLS = frozenset({"map", "filter", "zip", "enumerate", "iter", "reversed"})


def _notebook_function(value: Any, ns: dict[str, Any]) -> types.FunctionType | None:
    if isinstance(value, types.FunctionType) and value.__globals__ is ns:
        return value
    return None


def _lazy_reads(node: ast.expr, ns: dict[str, Any]) -> tuple[set[str], bool]:
    """The outside names a lazy iterable reads while it produces items (a
    generator expression, a notebook generator function's call, ``map``,
    ``zip``..., a generator object made before the loop), and whether it
    prints as it goes.  An eager iterable (a list, a range, ``sorted(...)``)
    reads nothing later: ``(set(), False)``."""
    names: set[str] = set()
    prints = False
    seen: set[int] = set()

    def function(fn: types.FunctionType | None, depth: int) -> None:
        nonlocal prints
        if fn is None or id(fn) in seen or depth > 3:
            return
        seen.add(id(fn))
        loads = global_loads(fn.__code__)
        prints = prints or ("print" in loads and "print" not in ns)
        for g in loads:
            if g in ns:
                names.add(g)
                function(_notebook_function(ns[g], ns), depth + 1)

    def loads_in(expr: ast.AST) -> None:
        for n in ast.walk(expr):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                names.add(n.id)
                function(_notebook_function(ns.get(n.id), ns), 1)

    if isinstance(node, ast.GeneratorExp):
        loads_in(node)
        # its own loop variables are its locals, not outside names
        names.difference_update(
            n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)
        )
    elif isinstance(node, ast.Call):
        fn = (
            _notebook_function(ns.get(node.func.id), ns)
            if isinstance(node.func, ast.Name)
            else None
        )
        if fn is not None and fn.__code__.co_flags & inspect.CO_GENERATOR:
            function(fn, 1)
            for a in [*node.args, *(k.value for k in node.keywords)]:
                loads_in(a)
        elif isinstance(node.func, ast.Name) and node.func.id in _LAZY_CALLS:
            for a in node.args:
                sub, p = _lazy_reads(a, ns)
                names |= sub
                prints = prints or p
                loads_in(a)
    elif isinstance(node, ast.Name):
        gen = ns.get(node.id)
        if isinstance(gen, types.GeneratorType) and gen.gi_frame is not None:
            if gen.gi_frame.f_globals is ns:
                function(types.FunctionType(gen.gi_code, ns), 1)
            # what it holds in its frame: outside objects it goes on reading
            held = {id(v) for v in gen.gi_frame.f_locals.values()}
            names |= {k for k, v in ns.items() if id(v) in held and not k.startswith("_")}
    return names - {"print"}, prints


def check_iterable_reads_nothing_the_body_changes(
    plan: LoopPlan, ns: dict[str, Any], functions: dict[str, Any]
) -> None:
    """Reject a loop whose iterable produces its items lazily (a generator)
    from state the body changes, or prints as it goes.  Serial Python
    produces item k after iterations 0..k-1 ran, and prints what producing
    it prints right before what iteration k prints; parloop takes items
    ahead of the iterations, so it would see the state from before them,
    and the output would come in another order."""
    iterable = plan.loop.iter
    reads, prints = _lazy_reads(iterable, ns)
    line = plan.loop.lineno
    shown = ast.unparse(iterable)
    if prints:
        raise LoopAnalysisError(
            f"the loop's iterable `{shown}` prints while it produces items: serial Python "
            "interleaves that output with the iterations', parloop takes items ahead of "
            "them, so the output would come in another order; print in the loop body "
            "instead, or keep this loop serial",
            lineno=line,
        )
    changed = (
        plan.roots
        | plan.call_roots
        | set(plan.reductions)
        | plan.private
        | set(plan.targets)
        | set().union(*(fp.writes() for fp in functions.values()))
    )
    hit = (reads & changed) - _iterated(iterable, ns)
    if hit:
        name = min(hit)
        raise LoopAnalysisError(
            f"the loop's iterable `{shown}` reads `{name}` as it produces items, and the body "
            f"changes `{name}`: serial Python produces each item after the iterations before "
            "it ran, parloop takes items ahead of them; make the items first "
            f"(`list({shown})`) if that is what you mean, or keep this loop serial",
            lineno=line,
            name=name,
        )


def _check_target(
    t: ast.expr, roots: set[str], plan: LoopPlan, ns: dict[str, Any], deleting: bool
) -> None:
    if isinstance(t, (ast.Tuple, ast.List)):
        for e in t.elts:
            _check_target(e, roots, plan, ns, deleting)
        return
    if isinstance(t, ast.Starred):
        _check_target(t.value, roots, plan, ns, deleting)
        return
    if isinstance(t, ast.Name):
        if t.id in roots and t.id in plan.reductions:
            raise _changes_iterated(t.id, t.lineno, "")
        return
    node = t
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in roots:
        return
    if (
        not deleting
        and isinstance(t, ast.Subscript)
        and t.value is node
        and isinstance(t.slice, ast.Name)
        and t.slice.id == _current_key(plan.loop, node.id, ns)
    ):
        return  # the visited item replaced: nothing the loop sees changes
    if isinstance(t, ast.Subscript | ast.Attribute) and t.value is not node:
        return  # inside an item (``rows[i]["x"] = v``): the items stay the same objects
    raise _changes_iterated(node.id, t.lineno, "")


def _changes_iterated(name: str, line: int, where: str) -> LoopAnalysisError:
    return LoopAnalysisError(
        f"the loop iterates over `{name}`, which the body changes{where}: serial Python's "
        "loop would see the change as it goes (other items, more items, or a RuntimeError "
        "for a dict that changed size), parloop takes the items when the loop starts; "
        f"iterate over a copy (`list({name})`) if that is what you mean, or keep this loop serial",
        lineno=line,
        name=name,
    )


def _conditional(statements: list[ast.stmt]) -> set[int]:
    """The ids of the nodes that run only on some paths: inside an ``if``
    (or an ``except``) of ``statements``."""
    out: set[int] = set()
    for st in statements:
        for n in walk_scope(st):
            if isinstance(n, ast.If):
                for sub in (*n.body, *n.orelse):
                    out.update(id(x) for x in walk_scope(sub))
            elif isinstance(n, ast.ExceptHandler):
                for sub in n.body:
                    out.update(id(x) for x in walk_scope(sub))
    return out


def _shared_file_writes(
    statements: list[ast.stmt], per_call: set[str], ns: dict[str, Any]
) -> ast.Call | None:
    """The first ``open(path, mode)`` that every run of ``statements`` makes
    (not one under an ``if``: a checkpoint written once is fine) and that
    writes (``w``, ``a``, ``x`` or ``+`` in a constant mode) a path built
    from none of ``per_call`` (the names that differ between iterations or
    calls): the same file in every iteration."""
    bound = ns.get("open", io.open)
    if bound is not io.open and getattr(bound, "__wrapped__", None) is not io.open:
        return None  # not the builtin (IPython's wraps it, to guard its own streams)
    some_paths = _conditional(statements)
    for st in statements:
        for n in walk_scope(st):
            if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
                continue
            if n.func.id != "open" or not n.args or id(n) in some_paths:
                continue
            mode_node = n.args[1] if len(n.args) > 1 else None
            for k in n.keywords:
                if k.arg == "mode":
                    mode_node = k.value
            if not (isinstance(mode_node, ast.Constant) and isinstance(mode_node.value, str)):
                continue  # reading (the default), or a mode only known at run time
            if not set(mode_node.value) & set("wax+"):
                continue
            used = {x.id for x in ast.walk(n.args[0]) if isinstance(x, ast.Name)}
            if not used & per_call:
                return n
    return None


def check_no_shared_file_writes(
    plan: LoopPlan, ns: dict[str, Any], functions: dict[str, Any]
) -> None:
    """Reject a loop whose iterations write one and the same file (``with
    open(LOG, "a") as f: f.write(...)`` in the body or in a notebook function
    it calls): serial Python writes it in iteration order, parallel
    iterations in whatever order they run -- and for ``"w"`` the last one to
    run wins.  A path built from the iteration's own names (``f"out_{i}.csv"``,
    or a function's parameters) is a file per iteration, and stays parallel;
    so does a write on some paths only (``if i == best: save...``), which
    may well be one iteration's."""
    per_iteration = plan.private | set(plan.targets)
    call = _shared_file_writes(plan.loop.body, per_iteration, ns)
    where = ""
    if call is None:
        some_paths = _conditional(plan.loop.body)
        sometimes = {
            n.func.id
            for st in plan.loop.body
            for n in walk_scope(st)
            if id(n) in some_paths and isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        for fp in functions.values():
            if fp.name in sometimes:
                continue  # called on some paths only
            call = _shared_file_writes(fp.fdef.body, fp.locals, ns)
            if call is not None:
                where = f" in `{fp.name}` (called by the loop)"
                break
    if call is not None:
        raise LoopAnalysisError(
            f"`{ast.unparse(call)}`{where} writes the same file in every iteration (its path "
            "does not change with the iteration): serial Python writes it in iteration order, "
            "parallel iterations would not; collect what to write in a list and write the file "
            "after the loop, write one file per iteration, or keep this loop serial",
            lineno=call.lineno,
        )


def watched(
    plan: LoopPlan,
    ns: dict[str, Any],
    worker_roots: set[str],
    functions: dict[str, Any] | None = None,
) -> tuple[tuple[str, ...], ...]:
    """The objects an iteration could change behind the log's back (see
    parloop.analysis.hidden): inputs the body hands to code, and the mutable
    globals of the notebook functions it calls (two calls deep), except the
    globals the workers' copies of those functions log (``functions``), when
    the body only ever calls the function (never hands it on)."""
    functions = functions or {}
    handed = {
        n.id
        for st in plan.loop.body
        for n in ast.walk(st)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    } - {
        n.func.id
        for st in plan.loop.body
        for n in ast.walk(st)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    logged = {g for name, fp in functions.items() if name not in handed for g in fp.writes()}
    from ..fingerprint import watchable
    from .hidden import called_names, watch_candidates

    recorded = plan.roots | (plan.call_roots - worker_roots) | set(plan.reductions)
    local = plan.private | set(plan.targets) | recorded | set(plan.copies)
    out: list[tuple[str, ...]] = [
        (n,)
        for n in sorted(watch_candidates(plan.loop.body) - local)
        if n in ns and watchable(ns[n])
    ]
    seen: set[int] = set()

    def globals_of(fname: str, fn: Any, depth: int) -> None:
        if id(fn) in seen or depth > 2:
            return
        seen.add(id(fn))
        if not isinstance(fn, types.FunctionType) or fn.__globals__ is not ns:
            return
        for g in sorted(code_names(fn.__code__)):
            v = ns.get(g)
            if isinstance(v, types.FunctionType):
                globals_of(fname, v, depth + 1)
            elif g in ns and watchable(v) and (fname, g) not in out and g not in logged:
                out.append((fname, g))

    for f in sorted(called_names(plan.loop.body) - local):
        fn = ns.get(f)
        # a notebook function with state of its own (closure cells,
        # attributes, mutable defaults) that its calls may change
        if isinstance(fn, types.FunctionType) and (f,) not in out and watchable(fn):
            out.append((f,))
        globals_of(f, fn, 0)
    return tuple(out)


def plain_roots(tree: ast.Module, ns: dict[str, Any]) -> tuple[frozenset[str], dict[str, str]]:
    """Names of the cell bound to modules, classes and functions (in the
    namespace, or imported by the statements before the loop): calls through
    them (``np.sort(a)``) are calls, not writes.  And apart, the names bound
    to modules with global state of their own (``plt``): name -> module."""
    from .hidden import STATEFUL_MODULES, is_stateful_module

    plain = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    out = {n for n in names if isinstance(ns.get(n), plain)}
    stateful = {n: ns[n].__name__ for n in out if is_stateful_module(ns[n])}
    for st in tree.body:
        if isinstance(st, (ast.For, ast.AsyncFor)):
            break
        if isinstance(st, ast.Import):
            for a in st.names:
                if a.asname and a.name in STATEFUL_MODULES:
                    stateful[a.asname] = a.name
                out.add((a.asname or a.name).split(".")[0])
        elif isinstance(st, ast.ImportFrom) and st.module == "matplotlib":
            stateful.update(
                {
                    (a.asname or a.name): f"matplotlib.{a.name}"
                    for a in st.names
                    if f"matplotlib.{a.name}" in STATEFUL_MODULES
                }
            )
    return frozenset(out - set(stateful)), stateful
