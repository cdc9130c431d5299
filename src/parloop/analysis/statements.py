"""Statement checks: what may not stand in a parallel loop body, and reads
of private names that would come from the previous iteration."""

from __future__ import annotations

import ast

from ..errors import LoopAnalysisError
from .scopes import SCOPES, ScopeNames, stored_names


class Forbidden(ast.NodeVisitor):
    """return/yield/global/nonlocal in the body's own scope are rejected; the
    body's own ``break`` statements are noted (the breaking iteration is the
    last one committed)."""

    def __init__(self) -> None:
        self.loop_depth = 0
        self.breaks: list[int] = []  # lines of the body's own `break`s

    def _nested_scope(self, node: ast.AST) -> None:
        # a nested function may return/yield/break freely; only its default
        # values and decorators belong to the body's scope
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d]:
                self.visit(d)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for d in node.decorator_list:
                self.visit(d)

    visit_FunctionDef = _nested_scope
    visit_AsyncFunctionDef = _nested_scope
    visit_Lambda = _nested_scope
    visit_ClassDef = _nested_scope

    def _loop(self, node: ast.For | ast.While | ast.AsyncFor) -> None:
        self.visit(node.iter if not isinstance(node, ast.While) else node.test)
        self.loop_depth += 1
        for st in node.body:
            self.visit(st)
        self.loop_depth -= 1
        for st in node.orelse:
            self.visit(st)

    visit_For = _loop
    visit_AsyncFor = _loop
    visit_While = _loop

    def visit_Break(self, node: ast.Break) -> None:
        if self.loop_depth == 0:
            self.breaks.append(node.lineno)

    def visit_Return(self, node: ast.Return) -> None:
        raise LoopAnalysisError(
            "`return` in the loop body cannot run in parallel; use "
            "`break` and return after the loop",
            lineno=node.lineno,
        )

    def _yield(self, node: ast.AST) -> None:
        raise LoopAnalysisError(
            "`yield` in the loop body cannot run in parallel; "
            "collect the values in a list and yield them after the loop",
            lineno=node.lineno,  # type: ignore[attr-defined]
        )

    visit_Yield = _yield
    visit_YieldFrom = _yield

    def visit_Global(self, node: ast.Global) -> None:
        raise LoopAnalysisError(
            f"`global {', '.join(node.names)}` in the loop body: iterations cannot "
            "rebind notebook names; assign the value to a name of the iteration and "
            "bind the global after the loop",
            lineno=node.lineno,
            name=node.names[0],
        )

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        raise LoopAnalysisError(
            f"`nonlocal {', '.join(node.names)}` in the loop body cannot run in parallel; "
            "assign to a name of the iteration and rebind after the loop",
            lineno=node.lineno,
            name=node.names[0],
        )


_ALL = None  # state of an unreachable path (after continue/raise)


class CarriedReads:
    """Walk the body in order, tracking the names surely bound in the current
    iteration.  A read of a private name that is surely not bound yet on any
    path (``out[x] = prev; prev = x``) always sees the previous iteration's
    value: rejected.  One that is bound on some paths only (``if c: v = 1``
    and then ``v``) is *checked*: it is allowed, and an iteration that reads it
    unbound is re-run in the kernel after the one before it (see
    parloop.runtime)."""

    def __init__(
        self, private: set[str], reductions: set[str], maybe_bound: dict[int, set[str]]
    ) -> None:
        self.private = private
        self.reductions = reductions
        #: id(statement) -> private names that some path may have bound before it
        self.maybe_bound = maybe_bound
        self.checked: dict[str, int] = {}
        self._maybe: set[str] = set()

    def check_expr(self, node: ast.AST | None, bound: set[str]) -> set[str]:
        """Check the reads of an expression; return the names its walrus
        operators bind (bound from here on)."""
        if node is None:
            return set()
        sn = ScopeNames()
        sn.visit(node)
        walrus = set(sn.stores)
        for name, ln in sn.loads.items():
            if name in self.reductions:
                raise LoopAnalysisError(
                    f"`{name}` is accumulated with an augmented assignment and also read "
                    "in the body: each iteration would depend on the one before; read it "
                    "after the loop, or accumulate into a list and combine it afterwards",
                    lineno=ln,
                    name=name,
                )
            if name in self.private and name not in bound and name not in walrus:
                self._carried(name, ln)
        return walrus

    def _carried(self, name: str, lineno: int) -> None:
        if name in self._maybe:
            self.checked.setdefault(name, lineno)
            return
        raise LoopAnalysisError(
            f"`{name}` is read before it is assigned in the iteration, so its value "
            "always comes from the previous iteration (a loop-carried dependency); "
            f"assign `{name}` first in the body, or keep this loop serial",
            lineno=lineno,
            name=name,
        )

    def block(self, stmts: list[ast.stmt], bound: set[str] | None) -> set[str] | None:
        for st in stmts:
            if bound is _ALL:
                return _ALL
            bound = self.stmt(st, bound)
        return bound

    @staticmethod
    def _meet(*states: set[str] | None) -> set[str] | None:
        live = [s for s in states if s is not _ALL]
        if not live:
            return _ALL
        out = set(live[0])
        for s in live[1:]:
            out &= s
        return out

    def stmt(self, st: ast.stmt, bound: set[str]) -> set[str] | None:  # noqa: C901
        self._maybe = self.maybe_bound.get(id(st), set())
        b = set(bound)
        if isinstance(st, (ast.Continue, ast.Break, ast.Raise)):
            if isinstance(st, ast.Raise):
                self.check_expr(st.exc, b)
                self.check_expr(st.cause, b)
            return _ALL
        if isinstance(st, ast.Assign):
            b |= self.check_expr(st.value, b)
            for t in st.targets:
                self._check_target(t, b)
            return b | set(stored_names(st.targets))
        if isinstance(st, ast.AnnAssign):
            self.check_expr(st.value, b)
            self._check_target(st.target, b)
            return b | set(stored_names([st.target])) if st.value is not None else b
        if isinstance(st, ast.AugAssign):
            b |= self.check_expr(st.value, b)
            if isinstance(st.target, ast.Name):
                name = st.target.id
                if name in self.private and name not in b:
                    self._carried(name, st.lineno)
                return b
            self._check_target(st.target, b)
            return b
        if isinstance(st, ast.If):
            b |= self.check_expr(st.test, b)
            return self._meet(self.block(st.body, b), self.block(st.orelse, b))
        if isinstance(st, (ast.For, ast.AsyncFor)):
            b |= self.check_expr(st.iter, b)
            inner = b | set(stored_names([st.target]))
            self.block(st.body, inner)
            after = self.block(st.orelse, b)
            return b if after is _ALL else after
        if isinstance(st, ast.While):
            b |= self.check_expr(st.test, b)
            self.block(st.body, b)
            after = self.block(st.orelse, b)
            return b if after is _ALL else after
        if isinstance(st, (ast.With, ast.AsyncWith)):
            for item in st.items:
                b |= self.check_expr(item.context_expr, b)
                if item.optional_vars is not None:
                    b |= set(stored_names([item.optional_vars]))
            return self.block(st.body, b)
        if isinstance(st, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            assert isinstance(st, ast.Try)  # TryStar has the same fields
            body_end = self.block(st.body, b)
            if body_end is not _ALL:
                body_end = self.block(st.orelse, body_end)
            ends = [body_end]
            for h in st.handlers:
                self.check_expr(h.type, b)
                hb = b | ({h.name} if h.name else set())
                ends.append(self.block(h.body, hb))
            after = self._meet(*ends)
            fin = self.block(st.finalbody, b)
            if after is _ALL or fin is _ALL:
                return _ALL
            return after | fin
        if isinstance(st, ast.Match):
            b |= self.check_expr(st.subject, b)
            ends = []
            for case in st.cases:
                sn = ScopeNames()
                sn.visit(case.pattern)
                cb = b | set(sn.stores)
                self.check_expr(case.guard, cb)
                ends.append(self.block(case.body, cb))
            return self._meet(b, *ends)
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            # defaults and decorators are evaluated now; the body later
            sn = ScopeNames()
            sn.visit(st)
            return b | {st.name}
        if isinstance(st, (ast.Import, ast.ImportFrom)):
            sn = ScopeNames()
            sn.visit(st)
            return b | set(sn.stores)
        if isinstance(st, ast.Delete):
            for t in st.targets:
                self._check_target(t, b)
            return b
        # Expr, Assert, Pass, ...: reads only
        for child in ast.iter_child_nodes(st):
            self.check_expr(child, b)
        sn = ScopeNames()
        sn.visit(st)
        return b | set(sn.stores)

    def _check_target(self, t: ast.AST, b: set[str]) -> None:
        if isinstance(t, (ast.Subscript, ast.Attribute)):
            self.check_expr(t, b)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self._check_target(e, b)
        elif isinstance(t, ast.Starred):
            self._check_target(t.value, b)


def maybe_bound_before(body: list[ast.stmt], names: set[str]) -> dict[int, set[str]]:
    """id(statement) -> the names of ``names`` that some path through the
    iteration may have bound before the statement runs: names bound by
    statements earlier in the text, and, inside a nested loop, anything its
    body binds (an earlier pass of that loop)."""
    out: dict[int, set[str]] = {}

    def binds(stmts: list[ast.stmt]) -> set[str]:
        sn = ScopeNames()
        for s in stmts:
            sn.visit(s)
        return set(sn.stores) & names

    def block(stmts: list[ast.stmt], before: set[str]) -> set[str]:
        cur = set(before)
        for st in stmts:
            out[id(st)] = set(cur)
            if isinstance(st, (ast.For, ast.AsyncFor, ast.While)):
                target = [] if isinstance(st, ast.While) else stored_names([st.target])
                inner = cur | binds(st.body) | (set(target) & names)
                block(st.body, inner)
                block(st.orelse, inner)
                cur = inner | binds(st.orelse)
                continue
            subs = [getattr(st, f, None) or [] for f in ("body", "orelse", "finalbody")]
            subs += [h.body for h in getattr(st, "handlers", []) or []]
            subs += [c.body for c in getattr(st, "cases", []) or []]
            if any(subs) and not isinstance(st, SCOPES):
                after = set(cur)
                for sub in subs:
                    after |= block(sub, cur)
                cur = after | binds([st])
            else:
                cur = cur | binds([st])
        return cur

    block(body, set())
    return out
