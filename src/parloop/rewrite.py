"""Turn the loop body into a worker function that records a mutation log.

The generated function runs a whole chunk of iterations in one call (a Python
``for`` inside it), so the per-iteration cost is the body's own plus a stop
check, a log mark and a ``try`` (free since 3.11).  Writes through outside
names become one ``list.append`` of a tuple (see :mod:`parloop.log.entries`); writes
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

from .analysis import AUG_OPS, MUTATING_METHODS, LoopPlan, chain_root
from .analysis.dependence import rebind_operand
from .log.entries import (
    CALL,
    FINAL_AUG_ATTR,
    FINAL_AUG_ITEM,
    FINAL_DEL_ATTR,
    FINAL_DEL_ITEM,
    FINAL_SET_ATTR,
    FINAL_SET_ITEM,
    FLUSH,
    GROUP,
    PATH,
    REDUCE,
    SET_ATTR,
    SET_ITEM,
    STEP_ATTR,
    STEP_CALL,
    STEP_ITEM,
    TARGET_WRITE,
)

#: the chunk function: one call runs a chunk of iterations.  Statements named
#: ``___SLOT`` are placeholders that :func:`_fill` replaces (as IPython's
#: TimeitTemplateFiller does), never positions in the template.
_TEMPLATE = """
def ___parloop_chunk(___items, ___log, ___parts, ___ctl, ___h):
    ___rec = ___log.append
    ___mark = ___ctl.marks.append
    ___len = ___h.len
    ___slice = ___h.slice
    ___INIT
    for ___n, ___item in ___h.enumerate(___items):
        if ___ctl.stop:
            ___ctl.halt(___n)
            break
        ___mark(___len(___log))
        ___HOOK
        try:
            ___BODY
        except BaseException as ___e:
            if ___ctl.failed(___n, ___e, ___h.locals()):
                break
    return ___h.locals()
"""

#: the chunk function of a loop whose iterations may depend on each other
#: (shared objects, checked privates): per-iteration records, reads through
#: ``___R``, writes to shared objects through ``___wr``, privates unbound
#: between iterations (so each iteration's record holds what *it* bound)
_SPECULATIVE_TEMPLATE = """
def ___parloop_chunk(___items, ___log, ___parts, ___ctl, ___h):
    ___rec = ___log.append
    ___wr = ___ctl.write
    ___R = ___ctl.reader
    ___mark = ___ctl.marks.append
    ___len = ___h.len
    ___slice = ___h.slice
    ___NK = ___h.NeedsKernel
    ___INIT
    for ___n, ___item in ___h.enumerate(___items):
        if ___ctl.stop:
            ___ctl.halt(___n)
            break
        ___mark(___len(___log))
        ___ctl.begin_iter(___n)
        ___HOOK
        try:
            ___BODY
        except ___NK:
            ___ctl.needs_kernel(___n)
        except BaseException as ___e:
            if ___ctl.failed(___n, ___e, ___h.locals()):
                break
        finally:
            ___ctl.end_iter(___n, ___h.locals())
            ___UNBIND
    return ___h.locals()
"""

#: the one name of each generated function (also what tracebacks are cut at)
CHUNK_FN = "___parloop_chunk"
ITERATION_FN = "___parloop_iter"


class _Fill(ast.NodeTransformer):
    def __init__(self, slots: dict[str, list[ast.stmt]]):
        self.slots = slots

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for field, old in ast.iter_fields(node):
            if isinstance(old, list) and old and isinstance(old[0], ast.stmt):
                new: list[ast.stmt] = []
                for st in old:
                    if (
                        isinstance(st, ast.Expr)
                        and isinstance(st.value, ast.Name)
                        and st.value.id in self.slots
                    ):
                        new.extend(self.slots[st.value.id])
                    else:
                        new.append(self.visit(st))  # type: ignore[arg-type]
                setattr(node, field, new or [ast.Pass()])
            elif isinstance(old, ast.AST):
                self.visit(old)
        return node


def _fill(template: str, **slots: list[ast.stmt]) -> ast.Module:
    """The template with each ``___NAME`` placeholder statement replaced by
    ``slots["___NAME"]`` (an empty list removes it)."""
    module = ast.parse(template)
    _Fill({f"___{k}": v for k, v in slots.items()}).visit(module)
    return module


class _SharedReads(ast.NodeTransformer):
    """Reads of shared objects become calls of the worker's Reader
    (parloop.tracking): ``x[k]`` -> ``___R.item("x", x, k)``, ``x.get(k, d)``,
    ``k in x``, ``len(x)``, ``x.attr``; any other use of ``x`` is a read of
    the whole object.  Runs after the write rewrite, so every ``x`` left is
    a read."""

    def __init__(self, shared: frozenset[str]):
        self.shared = shared

    def _is_shared(self, node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Name) and node.id in self.shared and isinstance(node.ctx, ast.Load)
        )

    def _call(self, method: str, name: str, *args: ast.expr) -> ast.Call:
        return ast.Call(
            func=ast.Attribute(value=_name("___R"), attr=method, ctx=ast.Load()),
            args=[_const(name), _name(name), *args],
            keywords=[],
        )

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        if self._is_shared(node.value) and isinstance(node.ctx, ast.Load):
            key = self.visit(_key_expr(node.slice))
            return ast.copy_location(self._call("item", node.value.id, key), node)  # type: ignore
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        f = node.func
        if (
            isinstance(f, ast.Attribute)
            and f.attr == "get"
            and self._is_shared(f.value)
            and 1 <= len(node.args) <= 2
            and not node.keywords
            and not any(isinstance(a, ast.Starred) for a in node.args)
        ):
            args = [self.visit(a) for a in node.args]
            return ast.copy_location(self._call("get", f.value.id, *args), node)  # type: ignore
        if (
            isinstance(f, ast.Name)
            and f.id == "len"
            and len(node.args) == 1
            and not node.keywords
            and self._is_shared(node.args[0])
        ):
            return ast.copy_location(
                self._call(
                    "length",
                    node.args[0].id,  # type: ignore
                    _name("len"),
                ),
                node,
            )
        return self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        if (
            len(node.ops) == 1
            and isinstance(node.ops[0], (ast.In, ast.NotIn))
            and self._is_shared(node.comparators[0])
        ):
            call = self._call("has", node.comparators[0].id, self.visit(node.left))  # type: ignore
            out: ast.expr = call
            if isinstance(node.ops[0], ast.NotIn):
                out = ast.UnaryOp(op=ast.Not(), operand=call)
            return ast.copy_location(out, node)
        return self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if self._is_shared(node.value) and isinstance(node.ctx, ast.Load):
            return ast.copy_location(
                self._call(
                    "attr",
                    node.value.id,  # type: ignore
                    _const(node.attr),
                ),
                node,
            )
        return self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if self._is_shared(node):
            return ast.copy_location(self._call("whole", node.id), node)
        return node

    def _scope(self, node: ast.AST) -> ast.AST:
        """A nested function or lambda whose own names shadow a shared one
        (``def g(x): return x[0]``) reads its own ``x``, not the object."""
        args = node.args  # type: ignore[attr-defined]
        own = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
        own |= {a.arg for a in (args.vararg, args.kwarg) if a}
        body = node.body if isinstance(node.body, list) else [node.body]  # type: ignore
        for st in body:
            for n in ast.walk(st):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    own.add(n.id)
        hidden = self.shared & own
        if not hidden:
            return self.generic_visit(node)
        saved, self.shared = self.shared, self.shared - hidden
        try:
            return self.generic_visit(node)
        finally:
            self.shared = saved

    visit_FunctionDef = _scope
    visit_AsyncFunctionDef = _scope
    visit_Lambda = _scope


def is_plain_callable_root(value: Any) -> bool:
    """Statement calls on these run in the worker (``time.sleep(0.1)``,
    ``np.save(...)``, ``MyClass.register(...)``); on anything else
    (``out.append(v)``, ``logger.info(...)``) they are replayed in order."""
    from .analysis.hidden import is_stateful_module

    if is_stateful_module(value):
        return False  # pyplot's calls change its global state: replayed in order
    return isinstance(
        value, (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)
    ) or inspect.isroutine(value)


def classify_call_roots(plan: LoopPlan, ns: Mapping[str, Any]) -> set[str]:
    """The call roots whose statement calls run in the worker, decided from the
    values bound when the loop starts."""
    return {
        name
        for name in plan.call_roots
        if name in ns
        and is_plain_callable_root(ns[name])
        or name not in ns
        and hasattr(builtins, name)
    }


def _name(id_: str, store: bool = False) -> ast.Name:
    return ast.Name(id=id_, ctx=ast.Store() if store else ast.Load())


def _const(v: Any) -> ast.Constant:
    return ast.Constant(value=v)


def _tuple(elts: list[ast.expr]) -> ast.Tuple:
    return ast.Tuple(elts=elts, ctx=ast.Load())


def _key_expr(sl: ast.expr) -> ast.expr:
    """A subscript's key as a value: slices become ``slice(...)`` objects."""
    if isinstance(sl, ast.Slice):
        return ast.Call(
            func=_name("___slice"),
            args=[sl.lower or _const(None), sl.upper or _const(None), sl.step or _const(None)],
            keywords=[],
        )
    if isinstance(sl, ast.Tuple):
        return _tuple([_key_expr(e) for e in sl.elts])
    return sl


def _call_parts(call: ast.Call) -> tuple[ast.expr, ast.expr]:
    args = _tuple(list(call.args))
    if not call.keywords:
        return args, _const(None)
    kw = ast.Dict(
        keys=[_const(k.arg) if k.arg else None for k in call.keywords],
        values=[k.value for k in call.keywords],
    )
    return args, kw


def _steps(node: ast.expr) -> tuple[str, list[ast.expr]]:
    """Root name and the evaluated steps of a subscript/attribute/call chain."""
    steps: list[ast.expr] = []
    while not isinstance(node, ast.Name):
        if isinstance(node, ast.Subscript):
            steps.append(_tuple([_const(STEP_ITEM), _key_expr(node.slice)]))
            node = node.value
        elif isinstance(node, ast.Attribute):
            steps.append(_tuple([_const(STEP_ATTR), _const(node.attr)]))
            node = node.value
        elif isinstance(node, ast.Call):
            args, kw = _call_parts(node)
            steps.append(_tuple([_const(STEP_CALL), args, kw]))
            node = node.func
        else:  # pragma: no cover - analysis rejected it
            raise AssertionError(ast.dump(node))
    steps.reverse()
    return node.id, steps


class _BodyRewriter:
    """Rewrites the statements of the loop body (not nested scopes)."""

    def __init__(self, plan: LoopPlan, worker_call_roots: set[str], record_targets: bool = False):
        self.plan = plan
        #: workers with their own copies of the items (engines): writes through
        #: the loop target run on the copy *and* are logged, to be replayed on
        #: the kernel's own item (a DataFrame's data is not in its __dict__)
        self.replayed = set(plan.copies) | (plan.target_roots if record_targets else set())
        self.recorded_roots = plan.roots | (plan.call_roots - worker_call_roots)
        self.shared = plan.shared(worker_call_roots)
        self.groups = {(g.node.lineno, g.node.col_offset): g for g in plan.groups}
        self.tmp = 0
        self.loop_depth = 0

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
        # shared objects' writes also go to the iteration's own-write overlay
        rec = "___wr" if root in self.shared else "___rec"
        return [ast.Expr(ast.Call(func=_name(rec), args=[entry], keywords=[]))]

    def _write_entry(self, target: ast.expr, value: ast.expr) -> ast.expr:
        if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
            return _tuple(
                [_const(SET_ITEM), _const(target.value.id), value, _key_expr(target.slice)]
            )
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            return _tuple([_const(SET_ATTR), _const(target.value.id), value, _const(target.attr)])
        root, steps = _steps(target.value)  # type: ignore[attr-defined]
        final = (
            _tuple([_const(FINAL_SET_ITEM), _key_expr(target.slice), value])
            if isinstance(target, ast.Subscript)
            else _tuple([_const(FINAL_SET_ATTR), _const(target.attr), value])  # type: ignore[attr-defined]
        )
        return _tuple([_const(PATH), _const(root), _tuple(steps), final])

    # -- statements -----------------------------------------------------------
    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for st in stmts:
            out.extend(self.stmt(st))
        return out or [ast.Pass()]

    def stmt(self, st: ast.stmt) -> list[ast.stmt]:  # noqa: C901
        new: list[ast.stmt]
        if isinstance(st, ast.Break) and self.loop_depth == 0:
            # the body's own break: this iteration is the last one committed
            new = [ast.Expr(ast.parse("___ctl.broke(___n)").body[0].value), st]  # type: ignore
        elif isinstance(st, ast.If) and (st.lineno, st.col_offset) in self.groups:
            new = self._group(st, self.groups[(st.lineno, st.col_offset)])
        elif (
            isinstance(st, ast.Assign)
            and len(st.targets) == 1
            and isinstance(st.targets[0], ast.Name)
            and st.targets[0].id in self.plan.reductions
        ):
            name = st.targets[0].id
            op_operand = rebind_operand(name, st.value)
            if op_operand is None:
                # a notebook function's ``global last; last = x``
                assert "=" in self.plan.reductions[name], ast.dump(st)
                op_operand = ("=", st.value)
            op, operand = op_operand
            new = [
                ast.Expr(
                    ast.Call(
                        func=_name("___rec"),
                        args=[_tuple([_const(REDUCE), _const(name), _const(op), operand])],
                        keywords=[],
                    )
                )
            ]
        elif isinstance(st, ast.Delete) and any(
            isinstance(t, ast.Name) and t.id in self.plan.deleted for t in st.targets
        ):
            new = self._delete(st)
            for t in st.targets:
                if isinstance(t, ast.Name) and t.id in self.plan.deleted:
                    new.append(ast.parse(f"___ctl.deleted({t.id!r})").body[0])
        elif self.replayed and self._copy_root(st) is not None:
            new = self._copy_write(st)
        elif isinstance(st, (ast.For, ast.AsyncFor, ast.While)):
            new = [st]
            self.loop_depth += 1
            st.body = self.block(st.body)
            self.loop_depth -= 1
            if st.orelse:
                st.orelse = self.block(st.orelse)
        elif isinstance(st, ast.Assign):
            new = self._assign(st)
        elif (
            isinstance(st, ast.AnnAssign)
            and st.value is not None
            and self._is_recorded(chain_root(st.target)[0])
            and not isinstance(st.target, ast.Name)
        ):
            new = self._assign(ast.Assign(targets=[st.target], value=st.value))
        elif isinstance(st, ast.AugAssign):
            new = self._augassign(st)
        elif isinstance(st, ast.Delete):
            new = self._delete(st)
        elif (
            isinstance(st, ast.Expr)
            and isinstance(st.value, ast.Call)
            and isinstance(st.value.func, ast.Attribute)
        ):
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
            if isinstance(t, (ast.Subscript, ast.Attribute)) and self._is_recorded(
                chain_root(t)[0]
            ):
                tmp = self._temp()
                leaves.append((t, tmp))
                return _name(tmp, True)
            return t

        targets = [replace(t) for t in st.targets]
        if not leaves:
            return [st]
        if (
            len(st.targets) == 1
            and len(leaves) == 1
            and getattr(targets[0], "id", None) == leaves[0][1]
            and leaves[0][0].value.__class__ is ast.Name  # type: ignore[attr-defined]
        ):
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

    def _copy_root(self, st: ast.stmt) -> str | None:
        """The ``private=`` name a statement writes through, if any."""
        if (
            isinstance(st, ast.Expr)
            and isinstance(st.value, ast.Call)
            and isinstance(st.value.func, ast.Attribute)
        ):
            root, has_call = chain_root(st.value.func)
        elif isinstance(st, (ast.Assign, ast.AugAssign)):
            targets = st.targets if isinstance(st, ast.Assign) else [st.target]
            if len(targets) != 1 or not isinstance(targets[0], (ast.Subscript, ast.Attribute)):
                return None
            root, has_call = chain_root(targets[0])
        else:
            return None
        return root if root in self.replayed and not has_call else None

    def _copy_write(self, st: ast.stmt) -> list[ast.stmt]:
        """A write through a ``private=`` name or (engines) the loop target:
        made on the iteration's own object, and recorded, so that the kernel's
        object goes through the same writes in iteration order (the
        iteration's reads see its own changes)."""
        root = self._copy_root(st)
        assert root is not None
        out = self._copy_write_entry(st)
        if root in self.plan.copies:
            return out
        # the loop target: replayed on the kernel's item of this iteration
        rec = out[-1]
        assert isinstance(rec, ast.Expr) and isinstance(rec.value, ast.Call)
        entry = rec.value.args[0]
        assert isinstance(entry, ast.Tuple)
        inner = _tuple([entry.elts[0], _const(None), *entry.elts[2:]])
        rec.value.args[0] = _tuple([_const(TARGET_WRITE), _name("___n"), _const(root), inner])
        return out

    def _copy_write_entry(self, st: ast.stmt) -> list[ast.stmt]:
        if isinstance(st, ast.AugAssign):
            t = st.target
            tv = self._temp()
            op = AUG_OPS[type(st.op)]
            assert isinstance(t, (ast.Subscript, ast.Attribute))
            r, steps = _steps(t.value)
            final = (
                _tuple([_const(FINAL_AUG_ITEM), _key_expr(t.slice), _const(op), _name(tv)])
                if isinstance(t, ast.Subscript)
                else _tuple(
                    [
                        _const(FINAL_AUG_ATTR),
                        _const(t.attr),
                        _const(op),  # type: ignore
                        _name(tv),
                    ]
                )
            )
            return [
                ast.Assign(targets=[_name(tv, True)], value=st.value),
                ast.AugAssign(target=t, op=st.op, value=_name(tv)),
                ast.Expr(
                    ast.Call(
                        func=_name("___rec"),
                        args=[_tuple([_const(PATH), _const(r), _tuple(steps), final])],
                        keywords=[],
                    )
                ),
            ]
        if isinstance(st, ast.Expr):
            call = st.value
            assert isinstance(call, ast.Call)
            args, kw = _call_parts(call)
            ta, tk = self._temp(), self._temp()
            own = ast.Expr(
                ast.Call(
                    func=call.func,
                    args=[ast.Starred(value=_name(ta), ctx=ast.Load())],
                    keywords=[
                        ast.keyword(
                            arg=None,
                            value=ast.BoolOp(
                                op=ast.Or(), values=[_name(tk), ast.Dict(keys=[], values=[])]
                            ),
                        )
                    ],
                )
            )
            r, steps = _steps(call.func)
            entry = _tuple(
                [
                    _const(PATH),
                    _const(r),
                    _tuple(steps),
                    _tuple([_const(STEP_CALL), _name(ta), _name(tk)]),
                ]
            )
            return [
                ast.Assign(targets=[_name(ta, True)], value=args),
                ast.Assign(targets=[_name(tk, True)], value=kw),
                own,
                ast.Expr(ast.Call(func=_name("___rec"), args=[entry], keywords=[])),
            ]
        assert isinstance(st, ast.Assign)
        tv = self._temp()
        target = st.targets[0]
        return [
            ast.Assign(targets=[_name(tv, True)], value=st.value),
            ast.Assign(targets=[target], value=_name(tv)),
            ast.Expr(
                ast.Call(
                    func=_name("___rec"),
                    args=[self._write_entry(copy.deepcopy(target), _name(tv))],
                    keywords=[],
                )
            ),
        ]

    def _group(self, st: ast.If, group: Any) -> list[ast.stmt]:
        """``if s > best: best = s; best_k = k``: the worker compares with the
        value it sees (the kept value only ever moves one way, so a candidate
        that loses here loses in serial too) and records the candidate; the
        kernel compares again at commit, in order."""
        test = st.test
        assert isinstance(test, ast.Compare)
        left, right = test.left, test.comparators[0]
        cand = left if isinstance(right, ast.Name) and right.id == group.compared else right
        tmp = self._temp()
        values = [a.value for a in st.body]  # type: ignore[attr-defined]
        entry = _tuple(
            [
                _const(GROUP),
                _const(group.compared),
                _const(group.cmp),
                _name(tmp),
                _tuple([_const(n) for n in group.names]),
                _tuple(values),
            ]
        )
        cmp_op = {">": ast.Gt, ">=": ast.GtE, "<": ast.Lt, "<=": ast.LtE}[group.cmp]()
        record = ast.Expr(ast.Call(func=_name("___rec"), args=[entry], keywords=[]))
        return [
            ast.Assign(targets=[_name(tmp, True)], value=cand),
            ast.If(
                test=ast.Compare(
                    left=_name(tmp), ops=[cmp_op], comparators=[_name(group.compared)]
                ),
                body=[record],
                orelse=[],
            ),
        ]

    def _augassign(self, st: ast.AugAssign) -> list[ast.stmt]:
        op = AUG_OPS[type(st.op)]
        t = st.target
        if isinstance(t, ast.Name):
            if t.id in self.plan.reductions:
                return [
                    ast.Expr(
                        ast.Call(
                            func=_name("___rec"),
                            args=[_tuple([_const(REDUCE), _const(t.id), _const(op), st.value])],
                            keywords=[],
                        )
                    )
                ]
            return [st]
        root = chain_root(t)[0]
        if not self._is_recorded(root):
            return [st]
        assert root is not None
        root, steps = _steps(t.value)  # type: ignore[attr-defined]
        final = (
            _tuple([_const(FINAL_AUG_ITEM), _key_expr(t.slice), _const(op), st.value])
            if isinstance(t, ast.Subscript)
            else _tuple([_const(FINAL_AUG_ATTR), _const(t.attr), _const(op), st.value])
        )  # type: ignore
        return self._emit(
            root, _tuple([_const(PATH), _const(root), _tuple(steps), final]), st.lineno
        )

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
                final = (
                    _tuple([_const(FINAL_DEL_ITEM), _key_expr(t.slice)])
                    if isinstance(t, ast.Subscript)
                    else _tuple([_const(FINAL_DEL_ATTR), _const(t.attr)])
                )
                out.extend(
                    self._emit(
                        r, _tuple([_const(PATH), _const(r), _tuple(steps), final]), st.lineno
                    )
                )
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
        if root in self.plan.stateful or call.func.attr not in MUTATING_METHODS:
            # what the iteration printed so far comes out before the call's
            # own output (plt.show(), grid.show()) when it is replayed in the
            # kernel; container methods (append, add...) print nothing
            flush = ast.Expr(
                ast.Call(
                    func=_name("___rec"),
                    args=[
                        _tuple(
                            [
                                _const(FLUSH),
                                ast.Call(
                                    func=_name("___len"), args=[_name("___parts")], keywords=[]
                                ),
                            ]
                        )
                    ],
                    keywords=[],
                )
            )
            return [flush, *self._call_record(st, call, root)]
        return self._call_record(st, call, root)

    def _call_record(self, st: ast.Expr, call: ast.Call, root: str) -> list[ast.stmt]:
        assert isinstance(call.func, ast.Attribute)
        args, kw = _call_parts(call)
        if isinstance(call.func.value, ast.Name):
            entry = _tuple([_const(CALL), _const(root), _const(call.func.attr), args, kw])
        else:
            r, steps = _steps(call.func)
            entry = _tuple(
                [_const(PATH), _const(r), _tuple(steps), _tuple([_const(STEP_CALL), args, kw])]
            )
        return self._emit(root, entry, st.lineno)


def changed_targets(plan: LoopPlan) -> set[str]:
    """Loop-target names whose items the body may change where the log does
    not see it: handed to code (``heapq.heapify(lst)``, ``bump(rec)``,
    ``r = row`` then written through ``r``) or changed in place by an
    augmented assignment (``lst += [x]``, ``row *= 2`` on an array's row).
    A worker with its own copies sends such an item back when the iteration
    changed it, and the kernel brings its own item to that state."""
    from .analysis.hidden import watch_candidates

    augmented = {
        n.target.id
        for st in plan.loop.body
        for n in ast.walk(st)
        if isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name)
    }
    return set(plan.targets) & (
        watch_candidates(plan.loop.body, statement_receivers=False) | augmented
    )


def build_chunk_function(
    plan: LoopPlan,
    worker_call_roots: set[str],
    *,
    sync_names: set[str],
    hooked: bool,
    shared: frozenset[str] | None = None,
    copies: set[str] = frozenset(),  # type: ignore
    streams: tuple[str, ...] = (),
) -> ast.Module:
    """The module that defines the chunk function for this loop.

    ``hooked``: call ``___ctl.begin(n)`` before each iteration (per-iteration
    random streams, the per-iteration timeout).
    ``sync_names``: loop-target names whose objects go back to the kernel at
    the end of every iteration (workers with their own copies of the items:
    the kernel syncs its own item to the copy's final state, and maps the copy
    back to its item wherever the log stores it).
    ``shared``: the shared objects (default: the plan's); ``copies``: the
    notebook functions the body calls that run as rewritten copies."""
    if shared is None:
        shared = plan.shared(worker_call_roots)
    speculative = bool(shared or plan.checked)
    body = copy.deepcopy(plan.loop.body)
    rewriter = _BodyRewriter(plan, worker_call_roots, record_targets=bool(sync_names))
    rewriter.shared = shared
    rewritten = rewriter.block(body)
    if shared:
        rewritten = [_SharedReads(shared).visit(st) for st in rewritten]
    rewritten = calls_to_copies(rewritten, set(copies))
    target = ast.Assign(targets=[plan.loop.target], value=_name("___item"))
    ast.copy_location(target, plan.loop.target)
    inner: list[ast.stmt] = [*_copies(plan), target, *rewritten]
    if sync_names:
        # a finally: `continue` and exceptions pass through it too
        # targets handed to code that may change them are synced back whole
        # (when changed); the writes the body makes through them are replayed
        deleted_through = {
            chain_root(t)[0]
            for st in plan.loop.body
            for n in ast.walk(st)
            if isinstance(n, ast.Delete)
            for t in n.targets
        }
        mutated = sorted(
            sync_names & changed_targets(plan) | (sync_names & plan.target_roots & deleted_through)
        )
        # only what must come back travels back: an item a write stores (the
        # kernel stores its own), or one handed to code (synced whole); an
        # item merely written through does not (an Axes would come back with
        # its figure, and register it with the kernel's pyplot)
        stored = sorted(sync_names & plan.stored_targets)
        if stored or mutated:
            sync = ast.parse(f"___ctl.sync(___n, ___h.locals(), {stored!r}, {mutated!r})").body
            if mutated:
                # what they are before the iteration: only a changed one goes back
                at = inner.index(target) + 1
                inner[at:at] = ast.parse(f"___ctl.watch_items(___h.locals(), {mutated!r})").body
            inner = [ast.Try(body=inner, handlers=[], orelse=[], finalbody=sync)]
    # per-iteration set-up (seed=, timeout=, seeds in the body): only paid for when asked
    hook = ast.parse("___ctl.begin(___n)").body if hooked else []
    # seed= and a generator object from outside: the iteration's own stream
    hook += [ast.parse(f"{n} = ___ctl.stream({n!r}, ___n)").body[0] for n in streams]
    fns = ast.parse("___fns = ___ctl.fns").body if copies else []
    if not speculative:
        module = _fill(_TEMPLATE, INIT=fns, HOOK=hook, BODY=inner)
    else:
        init = fns + [
            ast.parse(f"if {n!r} in ___ctl.init:\n    {n} = ___ctl.init[{n!r}]").body[0]
            for n in sorted(plan.checked)
        ]
        # (in the kernel, re-executing iterations in order, privates carry
        # over from one iteration to the next as in serial)
        unbind = [
            ast.parse(
                f"if not ___ctl.direct:\n    try:\n        del {n}\n"
                "    except NameError:\n        pass"
            ).body[0]
            for n in sorted(plan.private)
        ]
        module = _fill(_SPECULATIVE_TEMPLATE, INIT=init, HOOK=hook, BODY=inner, UNBIND=unbind)
    return _at_loop_line(module, plan, rewritten, target)


def _copies(plan: LoopPlan) -> list[ast.stmt]:
    """``private=name``: each iteration starts from its own copy."""
    return [ast.parse(f"{n} = ___ctl.copy_of({n!r})").body[0] for n in plan.copies]


_ITERATION_TEMPLATE = """
async def ___parloop_iter(___item, ___n, ___log, ___ctl, ___h):
    ___rec = ___log.append
    ___len = ___h.len
    ___slice = ___h.slice
    ___HOOK
    try:
        for ___once in ___h.once:
            ___BODY
    except BaseException as ___e:
        return ___h.locals(), ___e
    return ___h.locals(), None
"""


def build_iteration_function(
    plan: LoopPlan, worker_call_roots: set[str], *, hooked: bool
) -> ast.Module:
    """For a body that awaits: one coroutine function per *iteration* (each
    iteration becomes an asyncio task).  The body sits in a one-pass ``for``
    so that its ``continue`` means what it meant."""
    body = copy.deepcopy(plan.loop.body)
    rewritten = _BodyRewriter(plan, worker_call_roots).block(body)
    target = ast.Assign(targets=[plan.loop.target], value=_name("___item"))
    ast.copy_location(target, plan.loop.target)
    hook = ast.parse("___ctl.begin(___n)").body if hooked else []
    module = _fill(_ITERATION_TEMPLATE, HOOK=hook, BODY=[*_copies(plan), target, *rewritten])
    return _at_loop_line(module, plan, rewritten, target)


def _at_loop_line(
    module: ast.Module, plan: LoopPlan, rewritten: list[ast.stmt], target: ast.stmt
) -> ast.Module:
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


#: the factory that makes a worker's copy of a notebook function: the same
#: code, with its writes to notebook globals logged (``___rt`` finds the
#: running chunk's log) and its calls of other notebook functions going to
#: their copies (``___fns``)
_FUNCTION_TEMPLATE = """
def ___parloop_factory(___rt, ___fns, ___g):
    ___FUNCTION
"""

#: what a copy binds first (the names the rewritten statements use)
_FUNCTION_PRELUDE = """
___ctl = ___rt.control()
___parts = ___ctl.parts
___rec = ___ctl.log.append
___wr = ___rt.writer(___ctl, ___g)
___R = ___ctl.reader
___len = len
___slice = slice
"""


class _CallsToCopies(ast.NodeTransformer):
    """``f(x)`` -> ``___fns.get("f", f)(x)`` and ``obj.m(x)`` ->
    ``___fns.get("obj.m", type(obj).m)(obj, x)`` for the notebook functions
    and methods that run as copies (the original when no copy was made: its
    code changed since the analysis)."""

    def __init__(self, names: set[str]):
        self.names = names

    def _get(self, key: str, fallback: ast.expr) -> ast.expr:
        return ast.Call(
            func=ast.Attribute(value=_name("___fns"), attr="get", ctx=ast.Load()),
            args=[_const(key), fallback],
            keywords=[],
        )

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Name) and f.id in self.names:
            node.func = ast.copy_location(self._get(f.id, _name(f.id)), f)
        elif (
            isinstance(f, ast.Attribute)
            and isinstance(f.value, ast.Name)
            and f"{f.value.id}.{f.attr}" in self.names
        ):
            recv = f.value.id
            cls_fn = ast.Attribute(
                value=ast.Call(func=_name("type"), args=[_name(recv)], keywords=[]),
                attr=f.attr,
                ctx=ast.Load(),
            )
            node.func = ast.copy_location(self._get(f"{recv}.{f.attr}", cls_fn), f)
            node.args = [_name(recv), *node.args]
        return node


def calls_to_copies(stmts: list[ast.stmt], names: set[str]) -> list[ast.stmt]:
    if not names:
        return stmts
    t = _CallsToCopies(names)
    return [t.visit(st) for st in stmts]


def build_function_factory(
    fplan: Any, shared: frozenset[str], copies: set[str], filename: str
) -> ast.Module:
    """The module defining ``___parloop_factory(___rt, ___fns, ___g)``, which
    returns the worker's copy of one notebook function (see
    parloop.analysis.functions)."""
    from .analysis.plan import LoopPlan

    fdef = copy.deepcopy(fplan.fdef)
    fdef.name = fplan.fdef.name
    plan = LoopPlan(
        tree=ast.Module(body=[], type_ignores=[]),
        prologue=[],
        loop=ast.For(target=_name("___x", True), iter=_name("___y"), body=[], orelse=[]),
        epilogue=[],
        targets=[],
        private=set(fplan.locals),
        inputs=set(),
        roots=set(fplan.roots),
        reductions=dict(fplan.reductions),
        call_roots=set(fplan.call_roots),
        target_roots=set(),
        read_roots=set(shared),
        stateful=set(fplan.stateful),
    )
    rewriter = _BodyRewriter(plan, set())
    rewriter.shared = shared
    body = rewriter.block(fdef.body)
    body = [st for st in body if not isinstance(st, ast.Global)]
    reads = shared - set(fplan.locals)
    if reads:
        body = [_SharedReads(frozenset(reads)).visit(st) for st in body]
    body = calls_to_copies(body, copies)
    prelude = ast.parse(_FUNCTION_PRELUDE).body
    fdef.body = prelude + (body or [ast.Pass()])
    ret = ast.Return(value=_name(fdef.name))
    module = _fill(_FUNCTION_TEMPLATE, FUNCTION=[fdef, ret])
    line = fplan.fdef.lineno
    user = set(ast.walk(ast.Module(body=body, type_ignores=[])))
    for node in ast.walk(module):
        if "lineno" in node._attributes and node not in user:
            node.lineno = line  # type: ignore[attr-defined]
            node.end_lineno = line  # type: ignore[attr-defined]
    ast.fix_missing_locations(module)
    return module
