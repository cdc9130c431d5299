"""The cell against the namespace's values: what the analysis of the text
alone cannot say (which names are modules, which objects share state, what
the body hands to code, which cells define the functions it calls).  Reads
the namespace, runs nothing."""

from __future__ import annotations

import ast
import itertools
import sys
import types
from typing import Any

from . import LoopPlan
from .scopes import code_names


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
        globals_of(f, ns.get(f), 0)
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
