"""Turn the loop body into a worker function that records a mutation log.

The generated function runs a whole chunk of iterations in one call (a Python
``for`` inside it), so the per-iteration cost is the body's own plus a stop
check, a log mark and a ``try`` (free since 3.11).  Writes through outside
names become one ``list.append`` of a tuple (see :mod:`parloop.replay`); writes
through the loop target are applied to the worker's copy *and* logged, so the
rest of the iteration reads them; everything else is the user's code as
written, at the user's line numbers, so tracebacks point at the cell.

Generated names start with three underscores (IPython's convention) so they
never meet user names.
"""
from __future__ import annotations

import ast
import builtins
import copy
import inspect
import types
from typing import Any, Mapping

from .analysis import AUG_OPS, LoopPlan, chain_root
from .replay import CALL, PATH, REDUCE, SET_ATTR, SET_ITEM

CHUNK_FN = "___parloop_chunk"

_TEMPLATE = '''
def ___parloop_chunk(___items, ___log, ___parts, ___ctl, ___h):
    ___rec = ___log.append
    ___mark = ___ctl.marks.append
    ___len = ___h.len
    ___slice = ___h.slice
    for ___n, ___item in ___h.enumerate(___items):
        if ___ctl.stop:
            ___ctl.halt(___n)
            break
        ___mark(___len(___log))
        try:
            pass
        except BaseException as ___e:
            if ___ctl.failed(___n, ___e, ___h.locals()):
                break
    return ___h.locals()
'''


def is_plain_callable_root(value: Any) -> bool:
    """Statement calls on these run in the worker (``time.sleep(0.1)``,
    ``np.save(...)``, ``MyClass.register(...)``); on anything else
    (``out.append(v)``, ``logger.info(...)``) they are replayed in order."""
    return isinstance(value, (types.ModuleType, type, types.FunctionType,
                              types.BuiltinFunctionType)) or inspect.isroutine(value)


def classify_call_roots(plan: LoopPlan, ns: Mapping[str, Any]) -> set[str]:
    """The call roots whose statement calls run in the worker, decided from the
    values bound when the loop starts."""
    return {name for name in plan.call_roots
            if name in ns and is_plain_callable_root(ns[name])
            or name not in ns and hasattr(builtins, name)}


def _name(id_: str, store: bool = False) -> ast.Name:
    return ast.Name(id=id_, ctx=ast.Store() if store else ast.Load())


def _const(v: Any) -> ast.Constant:
    return ast.Constant(value=v)


def _tuple(elts: list[ast.expr]) -> ast.Tuple:
    return ast.Tuple(elts=elts, ctx=ast.Load())


def _key_expr(sl: ast.expr) -> ast.expr:
    """A subscript's key as a value: slices become ``slice(...)`` objects."""
    if isinstance(sl, ast.Slice):
        return ast.Call(func=_name("___slice"), args=[
            sl.lower or _const(None), sl.upper or _const(None), sl.step or _const(None)],
            keywords=[])
    if isinstance(sl, ast.Tuple):
        return _tuple([_key_expr(e) for e in sl.elts])
    return sl


def _call_parts(call: ast.Call) -> tuple[ast.expr, ast.expr]:
    args = _tuple(list(call.args))
    if not call.keywords:
        return args, _const(None)
    kw = ast.Dict(keys=[_const(k.arg) if k.arg else None for k in call.keywords],
                  values=[k.value for k in call.keywords])
    return args, kw


def _steps(node: ast.expr) -> tuple[str, list[ast.expr]]:
    """Root name and the evaluated steps of a subscript/attribute/call chain."""
    steps: list[ast.expr] = []
    while not isinstance(node, ast.Name):
        if isinstance(node, ast.Subscript):
            steps.append(_tuple([_const("i"), _key_expr(node.slice)]))
            node = node.value
        elif isinstance(node, ast.Attribute):
            steps.append(_tuple([_const("a"), _const(node.attr)]))
            node = node.value
        elif isinstance(node, ast.Call):
            args, kw = _call_parts(node)
            steps.append(_tuple([_const("c"), args, kw]))
            node = node.func
        else:  # pragma: no cover - analysis rejected it
            raise AssertionError(ast.dump(node))
    steps.reverse()
    return node.id, steps


class _BodyRewriter:
    """Rewrites the statements of the loop body (not nested scopes)."""

    def __init__(self, plan: LoopPlan, worker_call_roots: set[str]):
        self.plan = plan
        self.recorded_roots = plan.roots | (plan.call_roots - worker_call_roots)
        self.tmp = 0

    def _temp(self) -> str:
        self.tmp += 1
        return f"___t{self.tmp}"

    def _is_recorded(self, root: str | None) -> bool:
        """Writes through outside names are recorded; writes through the loop
        target run as written (on the kernel's own item under threads, on the
        engine's copy under %%parallel, whose final state is synced back)."""
        return root is not None and (root in self.plan.roots or root in self.plan.reductions)

    # -- entries ------------------------------------------------------------
    def _emit(self, root: str, entry: ast.expr, lineno: int) -> list[ast.stmt]:
        return [ast.Expr(ast.Call(func=_name("___rec"), args=[entry], keywords=[]))]

    def _write_entry(self, target: ast.expr, value: ast.expr) -> ast.expr:
        if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
            return _tuple([_const(SET_ITEM), _const(target.value.id), value,
                           _key_expr(target.slice)])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            return _tuple([_const(SET_ATTR), _const(target.value.id), value,
                           _const(target.attr)])
        root, steps = _steps(target.value)  # type: ignore[attr-defined]
        final = (_tuple([_const("si"), _key_expr(target.slice), value])
                 if isinstance(target, ast.Subscript)
                 else _tuple([_const("sa"), _const(target.attr), value]))  # type: ignore
        return _tuple([_const(PATH), _const(root), _tuple(steps), final])

    # -- statements -----------------------------------------------------------
    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for st in stmts:
            out.extend(self.stmt(st))
        return out or [ast.Pass()]

    def stmt(self, st: ast.stmt) -> list[ast.stmt]:  # noqa: C901
        new: list[ast.stmt]
        if isinstance(st, ast.Assign):
            new = self._assign(st)
        elif isinstance(st, ast.AnnAssign) and st.value is not None \
                and self._is_recorded(chain_root(st.target)[0]) \
                and not isinstance(st.target, ast.Name):
            new = self._assign(ast.Assign(targets=[st.target], value=st.value))
        elif isinstance(st, ast.AugAssign):
            new = self._augassign(st)
        elif isinstance(st, ast.Delete):
            new = self._delete(st)
        elif isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) \
                and isinstance(st.value.func, ast.Attribute):
            new = self._call_stmt(st)
        else:
            new = [st]
            for field in ("body", "orelse", "finalbody"):
                if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    break
                sub = getattr(st, field, None)
                if sub:
                    setattr(st, field, self.block(sub))
            for h in getattr(st, "handlers", []) or []:
                h.body = self.block(h.body)
            for c in getattr(st, "cases", []) or []:
                c.body = self.block(c.body)
        for n in new:
            ast.copy_location(n, st)
        return new

    def _assign(self, st: ast.Assign) -> list[ast.stmt]:
        leaves: list[tuple[ast.expr, str]] = []

        def replace(t: ast.expr) -> ast.expr:
            if isinstance(t, (ast.Tuple, ast.List)):
                return type(t)(elts=[replace(e) for e in t.elts], ctx=ast.Store())
            if isinstance(t, ast.Starred):
                return ast.Starred(value=replace(t.value), ctx=ast.Store())
            if isinstance(t, (ast.Subscript, ast.Attribute)) \
                    and self._is_recorded(chain_root(t)[0]):
                tmp = self._temp()
                leaves.append((t, tmp))
                return _name(tmp, True)
            return t

        targets = [replace(t) for t in st.targets]
        if not leaves:
            return [st]
        if len(st.targets) == 1 and len(leaves) == 1 and targets[0].id == leaves[0][1] \
                and leaves[0][0].value.__class__ is ast.Name:  # type: ignore[attr-defined]
            # the hot path: out[k] = v  ->  ___rec((0, 'out', v, k))
            t = leaves[0][0]
            root = chain_root(t)[0]
            assert root is not None
            return self._emit(root, self._write_entry(t, st.value), st.lineno)
        out: list[ast.stmt] = [ast.Assign(targets=targets, value=st.value)]
        for t, tmp in leaves:
            root = chain_root(t)[0]
            assert root is not None
            out.extend(self._emit(root, self._write_entry(t, _name(tmp)), st.lineno))
        return out

    def _augassign(self, st: ast.AugAssign) -> list[ast.stmt]:
        op = AUG_OPS[type(st.op)]
        t = st.target
        if isinstance(t, ast.Name):
            if t.id in self.plan.reductions:
                return [ast.Expr(ast.Call(func=_name("___rec"), args=[_tuple(
                    [_const(REDUCE), _const(t.id), _const(op), st.value])], keywords=[]))]
            return [st]
        root = chain_root(t)[0]
        if not self._is_recorded(root):
            return [st]
        assert root is not None
        root, steps = _steps(t.value)  # type: ignore[attr-defined]
        final = (_tuple([_const("ri"), _key_expr(t.slice), _const(op), st.value])
                 if isinstance(t, ast.Subscript)
                 else _tuple([_const("ra"), _const(t.attr), _const(op), st.value]))  # type: ignore
        return self._emit(root, _tuple([_const(PATH), _const(root), _tuple(steps), final]),
                          st.lineno)

    def _delete(self, st: ast.Delete) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        keep: list[ast.expr] = []
        for t in st.targets:
            root = chain_root(t)[0]
            if isinstance(t, (ast.Subscript, ast.Attribute)) and self._is_recorded(root):
                if keep:
                    out.append(ast.Delete(targets=keep))
                    keep = []
                r, steps = _steps(t.value)
                final = (_tuple([_const("di"), _key_expr(t.slice)])
                         if isinstance(t, ast.Subscript)
                         else _tuple([_const("da"), _const(t.attr)]))
                out.extend(self._emit(r, _tuple([_const(PATH), _const(r), _tuple(steps),
                                                 final]), st.lineno))
            else:
                keep.append(t)
        if keep:
            out.append(ast.Delete(targets=keep))
        return out

    def _call_stmt(self, st: ast.Expr) -> list[ast.stmt]:
        call = st.value
        assert isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
        root = chain_root(call)[0]
        if root is None or root not in self.recorded_roots:
            return [st]
        args, kw = _call_parts(call)
        if isinstance(call.func.value, ast.Name):
            entry = _tuple([_const(CALL), _const(root), _const(call.func.attr), args, kw])
        else:
            r, steps = _steps(call.func)
            entry = _tuple([_const(PATH), _const(r), _tuple(steps),
                            _tuple([_const("c"), args, kw])])
        return self._emit(root, entry, st.lineno)


def build_chunk_function(plan: LoopPlan, worker_call_roots: set[str], *,
                         sync_names: set[str], hooked: bool) -> ast.Module:
    """The module that defines the chunk function for this loop.

    ``hooked``: call ``___ctl.begin(n)`` before each iteration (per-iteration
    random streams, the per-iteration timeout).
    ``sync_names``: loop-target names whose objects go back to the kernel at
    the end of every iteration (workers with their own copies of the items:
    the kernel syncs its own item to the copy's final state, and maps the copy
    back to its item wherever the log stores it)."""
    module = ast.parse(_TEMPLATE)
    fn = module.body[0]
    assert isinstance(fn, ast.FunctionDef)
    loop = fn.body[-2]
    assert isinstance(loop, ast.For)
    try_ = loop.body[-1]
    assert isinstance(try_, ast.Try)
    body = copy.deepcopy(plan.loop.body)
    rewritten = _BodyRewriter(plan, worker_call_roots).block(body)
    target = ast.Assign(targets=[plan.loop.target], value=_name("___item"))
    ast.copy_location(target, plan.loop.target)
    inner: list[ast.stmt] = [target, *rewritten]
    if sync_names:
        # a finally: `continue` and exceptions pass through it too
        mutated = sorted(sync_names & plan.target_roots)
        sync = ast.parse(f"___ctl.sync(___n, ___h.locals(), {sorted(sync_names)!r}, "
                         f"{mutated!r})").body
        inner = [ast.Try(body=inner, handlers=[], orelse=[], finalbody=sync)]
    try_.body = inner
    if hooked:
        # per-iteration set-up (seed=, timeout=): only paid for when asked for
        hook = ast.parse("___ctl.begin(___n)").body[0]
        loop.body.insert(len(loop.body) - 1, hook)
    return _at_loop_line(module, plan, rewritten, target)


_ITERATION_TEMPLATE = '''
async def ___parloop_iter(___item, ___n, ___log, ___ctl, ___h):
    ___rec = ___log.append
    ___len = ___h.len
    ___slice = ___h.slice
    try:
        for ___once in ___h.once:
            pass
    except BaseException as ___e:
        return ___h.locals(), ___e
    return ___h.locals(), None
'''

ITERATION_FN = "___parloop_iter"


def build_iteration_function(plan: LoopPlan, worker_call_roots: set[str], *,
                             hooked: bool) -> ast.Module:
    """For a body that awaits: one coroutine function per *iteration* (each
    iteration becomes an asyncio task).  The body sits in a one-pass ``for``
    so that its ``continue`` means what it meant."""
    module = ast.parse(_ITERATION_TEMPLATE)
    fn = module.body[0]
    assert isinstance(fn, ast.AsyncFunctionDef)
    try_ = fn.body[-2]
    assert isinstance(try_, ast.Try)
    once = try_.body[0]
    assert isinstance(once, ast.For)
    body = copy.deepcopy(plan.loop.body)
    rewritten = _BodyRewriter(plan, worker_call_roots).block(body)
    target = ast.Assign(targets=[plan.loop.target], value=_name("___item"))
    ast.copy_location(target, plan.loop.target)
    once.body = [target, *rewritten]
    if hooked:
        fn.body.insert(3, ast.parse("___ctl.begin(___n)").body[0])
    return _at_loop_line(module, plan, rewritten, target)


def _at_loop_line(module: ast.Module, plan: LoopPlan, rewritten: list[ast.stmt],
                  target: ast.stmt) -> ast.Module:
    """Template lines sit at the loop's own line, the user's keep theirs, so
    tracebacks stay in the cell."""
    line = plan.loop.lineno
    user_nodes = _descendants(rewritten) | set(ast.walk(target))
    for node in ast.walk(module):
        if "lineno" in node._attributes and node not in user_nodes:
            node.lineno = line  # type: ignore[attr-defined]
            node.end_lineno = line  # type: ignore[attr-defined]
    ast.fix_missing_locations(module)
    return module


def _descendants(stmts: list[ast.stmt]) -> set[ast.AST]:
    out: set[ast.AST] = set()
    for st in stmts:
        out.update(ast.walk(st))
    return out
