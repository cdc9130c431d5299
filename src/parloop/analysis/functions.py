"""Notebook functions are part of the cell: the functions defined in the
notebook that the body calls (directly or through each other) are analysed
like the body.  Their writes to notebook globals (``SEEN[x] = ...``,
``LOG.append(...)``, ``global counter; counter += 1``) become log entries,
replayed in the kernel in iteration order; their reads of globals that the
loop writes take part in the dependence test.  Workers run rewritten copies
(parloop.rewrite.build_function_factory); the kernel's functions are never
touched.  What cannot be replayed is rejected naming the function and line.

Only plain ``def`` functions of the notebook's namespace whose source can be
read qualify (no closures, generators, coroutines or decorators); anything
else a body calls stays covered by the hidden-state fingerprints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
from dataclasses import dataclass, field
from typing import Any

from ..errors import LoopAnalysisError
from .scopes import ScopeNames, code_names, walk_scope
from .writes import AUG_OPS, Mutations

#: how deep the body's calls are followed
MAX_DEPTH = 3


@dataclass
class FunctionPlan:
    """One notebook function as parloop will run it in the workers."""

    name: str
    path: tuple[str, ...]  # how to reach it from the body's globals
    fdef: ast.FunctionDef  # its source, lines as in the notebook
    locals: set[str]
    roots: set[str]  # globals written through (recorded)
    call_roots: set[str]  # globals with statement-level method calls
    reductions: dict[str, list[str]]  # ``global g; g += v``
    reads: set[str]  # globals it reads
    calls: set[str] = field(default_factory=set)  # notebook functions it calls
    stateful: set[str] = field(default_factory=set)

    def writes(self) -> set[str]:
        return self.roots | self.call_roots | set(self.reductions)


def _source(fn: types.FunctionType) -> ast.FunctionDef | None:
    if fn.__code__.co_freevars or fn.__code__.co_flags & (
        inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
    ):
        return None
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        return None
    try:
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError:
        return None
    fdef = tree.body[0] if tree.body else None
    if not isinstance(fdef, ast.FunctionDef) or fdef.decorator_list or fdef.name != fn.__name__:
        return None
    ast.increment_lineno(tree, first - 1)
    return fdef


def _plan(
    name: str,
    path: tuple[str, ...],
    fdef: ast.FunctionDef,
    plain: frozenset[str],
    stateful: dict[str, str],
    worker_roots: frozenset[str] = frozenset(),
) -> FunctionPlan:
    declared: set[str] = set()
    for n in walk_scope(fdef):
        if isinstance(n, ast.Global):
            declared.update(n.names)
        elif isinstance(n, ast.Nonlocal):
            raise LoopAnalysisError(
                f"`{name}` (called by the loop) uses `nonlocal`", lineno=n.lineno, name=name
            )
    a = fdef.args
    params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    params |= {x.arg for x in (a.vararg, a.kwarg) if x}
    sn = ScopeNames()
    for st in fdef.body:
        sn.visit(st)
    local = (params | set(sn.stores)) - declared
    reductions: dict[str, list[str]] = {}
    for n in walk_scope(fdef):
        if (
            isinstance(n, ast.AugAssign)
            and isinstance(n.target, ast.Name)
            and n.target.id in declared
        ):
            reductions.setdefault(n.target.id, []).append(AUG_OPS[type(n.op)])
        elif (
            isinstance(n, ast.Assign)
            and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name)
            and n.targets[0].id in declared
        ):
            # ``global last; last = x``: the last call's value, bound in order
            reductions.setdefault(n.targets[0].id, []).append("=")
        elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.Delete)):
            targets = n.targets if isinstance(n, (ast.Assign, ast.Delete)) else [n.target]
            for t in targets:
                for x in ast.walk(t):
                    if (
                        isinstance(x, ast.Name)
                        and x.id in declared
                        and not isinstance(x.ctx, ast.Load)
                    ):
                        raise LoopAnalysisError(
                            f"`{name}` (called by the loop) rebinds the notebook global "
                            f"`{x.id}`: iterations cannot rebind notebook names; return the "
                            "value and bind it after the loop",
                            lineno=n.lineno,
                            name=x.id,
                        )
    loads = set(sn.loads) - local
    for g in reductions:
        if g in loads:
            line = next(
                n.lineno
                for n in walk_scope(fdef)
                if isinstance(n, ast.Name) and n.id == g and isinstance(n.ctx, ast.Load)
            )
            raise LoopAnalysisError(
                f"`{name}` (called by the loop) binds the global `{g}` and also reads it: "
                "each call would depend on the one before; return the value instead and "
                "keep it in the loop body",
                lineno=line,
                name=g,
            )
    muts = Mutations(local, set(), set(reductions), plain_roots=plain, stateful=stateful)
    try:
        for st in fdef.body:
            muts.stmt(st)
    except LoopAnalysisError as e:
        msg = str(e)
        if e.lineno is not None and msg.startswith(f"line {e.lineno}: "):
            msg = msg[len(f"line {e.lineno}: ") :]
        raise LoopAnalysisError(
            f"in `{name}`, called by the loop: {msg}", lineno=e.lineno, name=e.name
        ) from None
    roots = {m.root for m in muts.found if m.kind != "call"}
    call_roots = muts.call_roots - roots - worker_roots
    return FunctionPlan(
        name=name,
        path=path,
        fdef=fdef,
        locals=local,
        roots=roots,
        call_roots=call_roots,
        reductions=reductions,
        reads=loads - set(reductions),
        stateful=set(stateful) & call_roots,
    )


#: the step of a path that goes from an instance to its class's method
METHOD = "#method"


def _method(obj: Any, name: str, ns: dict[str, Any]) -> types.FunctionType | None:
    """The plain function behind ``obj.name(...)`` when ``obj`` is an
    instance of a class defined in the notebook."""
    cls = type(obj)
    if getattr(cls, "__module__", None) != "__main__" or isinstance(obj, type):
        return None
    fn = inspect.getattr_static(cls, name, None)
    if isinstance(fn, types.FunctionType) and fn.__globals__ is ns:
        return fn
    return None


#: analysed functions by code object (re-reading and parsing a function's
#: source costs about a millisecond; a warm cell must not pay it each time)
_CACHE: dict[tuple, FunctionPlan | None] = {}


def _own_plain(fn: types.FunctionType) -> frozenset[str]:
    """The function's own globals bound to modules, classes and functions:
    its statement calls through them (``time.sleep(d)``, ``np.save(...)``)
    run in the worker, and calls through them inside expressions are calls,
    not writes -- as for the loop body (rewrite.classify_call_roots,
    namespace.plain_roots), which only sees the names the cell mentions.
    Modules with global state of their own (``plt``) stay call roots,
    replayed in the kernel in order."""
    from ..rewrite import is_plain_callable_root

    g = fn.__globals__
    return frozenset(n for n in code_names(fn.__code__) if n in g and is_plain_callable_root(g[n]))


def _analysed(
    fn: types.FunctionType,
    name: str,
    path: tuple[str, ...],
    plain: frozenset[str],
    stateful: dict[str, str],
) -> FunctionPlan | None:
    own = _own_plain(fn)
    key = (fn.__code__, plain | own, tuple(sorted(stateful.items())))
    if key not in _CACHE:
        fdef = _source(fn)
        if len(_CACHE) > 256:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = None if fdef is None else _plan(name, path, fdef, plain | own, stateful, own)
    fp = _CACHE[key]
    if fp is None:
        return None
    return dataclasses.replace(fp, path=path, calls=set(fp.calls))


def notebook_functions(
    body: list[ast.stmt], ns: dict[str, Any], plain: frozenset[str], stateful: dict[str, str]
) -> dict[str, FunctionPlan]:
    """The notebook functions the body calls, followed MAX_DEPTH calls deep:
    name -> plan.  Functions that do not qualify are left out."""
    out: dict[str, FunctionPlan] = {}
    todo: list[tuple[str, tuple[str, ...], int]] = [
        (n.func.id, (n.func.id,), 1)
        for st in body
        for n in walk_scope(st)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    ]
    for st in body:
        for n in walk_scope(st):
            # recv.meth(...) on an instance of a class defined in the notebook
            if (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute)
                and isinstance(n.func.value, ast.Name)
            ):
                recv, meth = n.func.value.id, n.func.attr
                fn = _method(ns.get(recv), meth, ns)
                key = f"{recv}.{meth}"
                if fn is not None and key not in out:
                    fp = _analysed(fn, key, (recv, METHOD, meth), plain, stateful)
                    if fp is not None:
                        out[key] = fp
                        todo.extend(
                            (c.func.id, fp.path + (c.func.id,), 2)  # type: ignore
                            for c in walk_scope(fp.fdef)
                            if isinstance(c, ast.Call)
                            and isinstance(c.func, ast.Name)
                            and c.func.id not in fp.locals
                        )
    while todo:
        name, path, depth = todo.pop(0)
        if name in out or depth > MAX_DEPTH:
            continue
        fn = ns.get(name)
        if not isinstance(fn, types.FunctionType) or fn.__globals__ is not ns:
            continue
        fp = _analysed(fn, name, path, plain, stateful)
        if fp is None:
            continue
        out[name] = fp
        for n in walk_scope(fp.fdef):
            if (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Name)
                and n.func.id not in fp.locals
            ):
                fp.calls.add(n.func.id)
                todo.append((n.func.id, path + (n.func.id,), depth + 1))
    for fp in out.values():
        fp.calls &= set(out)
    return out
