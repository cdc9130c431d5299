"""Scopes and chains: the one walker of names and of ``a[k].b(...)`` chains
that every other analysis module uses.  Pure functions over :mod:`ast`."""

from __future__ import annotations

import ast
import dis
import functools
import types
from typing import Iterator, Sequence

from ..errors import LoopAnalysisError

SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def code_names(code: types.CodeType) -> set[str]:
    """The global and attribute names a compiled function uses, its nested
    functions, lambdas and comprehensions included (``co_names``, recursively)."""
    names: set[str] = set()
    codes = [code]
    while codes:
        c = codes.pop()
        names.update(c.co_names)
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return names


@functools.lru_cache(maxsize=512)
def global_loads(code: types.CodeType) -> frozenset[str]:
    """The globals a compiled function reads (``LOAD_GLOBAL``/``LOAD_NAME``),
    its nested functions, lambdas and comprehensions included: unlike
    :func:`code_names`, not the attribute names it uses (``obj.scale``).
    Cached by code object: every cell asks again for the functions it calls,
    and a warm cell must not pay for reading their bytecode each time."""
    names: set[str] = set()
    codes = [code]
    while codes:
        c = codes.pop()
        names.update(
            i.argval for i in dis.get_instructions(c) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")
        )
        codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return frozenset(names)


def walk_scope(node: ast.AST) -> Iterator[ast.AST]:
    """Like :func:`ast.walk`, without entering nested functions, lambdas, classes."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        for child in ast.iter_child_nodes(n):
            if not isinstance(child, SCOPES):
                todo.append(child)


def target_names(node: ast.AST, where: str) -> list[str]:
    """Names bound by a loop target; only names, tuples, lists and starred names
    are accepted (``for out[i] in ...`` writes outside state)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        names: list[str] = []
        for elt in node.elts:
            names.extend(target_names(elt, where))
        return names
    if isinstance(node, ast.Starred):
        return target_names(node.value, where)
    raise LoopAnalysisError(
        f"the {where} target `{ast.unparse(node)}` writes to an object; "
        "use a plain name and assign inside the body",
        lineno=getattr(node, "lineno", None),
    )


def free_names(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> set[str]:
    """Names a function or lambda reads from its enclosing scope *when called*
    (not its default values, which are evaluated when it is made)."""
    inner = ScopeNames()
    for st in fn.body if isinstance(fn.body, list) else [fn.body]:
        inner.visit(st)
    a = fn.args
    params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    params |= {x.arg for x in (a.vararg, a.kwarg) if x}
    return set(inner.loads) - set(inner.stores) - params


def spine(node: ast.AST) -> frozenset[int]:
    """The nodes of a chain from its end down to its root name (not the keys
    and arguments hanging off it)."""
    out = set()
    while isinstance(node, (ast.Subscript, ast.Attribute, ast.Call)):
        out.add(id(node))
        node = node.func if isinstance(node, ast.Call) else node.value
    return frozenset(out)


def chain_root(node: ast.AST) -> tuple[str | None, bool]:
    """The name a chain of subscripts, attributes and calls starts from.

    Returns ``(name, has_call_before_end)``; name is None when the chain does not
    start at a name (``f()[k] = v``)."""
    has_call = False
    while True:
        if isinstance(node, (ast.Subscript, ast.Attribute)):
            node = node.value
        elif isinstance(node, ast.Call):
            has_call = True
            node = node.func
        elif isinstance(node, ast.Name):
            return node.id, has_call
        else:
            return None, has_call


def stored_names(stmt_targets: Sequence[ast.AST]) -> list[str]:
    out: list[str] = []
    for t in stmt_targets:
        for n in ast.walk(t):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                out.append(n.id)
    return out


class ScopeNames(ast.NodeVisitor):
    """Collect the names a block binds and loads in its own scope.

    Nested functions, lambdas and classes bind only their own name here; their
    free names count as loads.  Comprehension variables are local to the
    comprehension; walrus targets inside it bind in the enclosing scope."""

    def __init__(self) -> None:
        self.stores: dict[str, int] = {}
        self.loads: dict[str, int] = {}
        self.deleted: dict[str, int] = {}
        self.aug_names: dict[str, int] = {}
        self._comp_locals: list[set[str]] = []

    def _store(self, name: str, lineno: int) -> None:
        self.stores.setdefault(name, lineno)

    def _load(self, name: str, lineno: int) -> None:
        if any(name in s for s in self._comp_locals):
            return
        self.loads.setdefault(name, lineno)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            if not any(node.id in s for s in self._comp_locals):
                self._store(node.id, node.lineno)
        elif isinstance(node.ctx, ast.Del):
            self.deleted.setdefault(node.id, node.lineno)
        else:
            self._load(node.id, node.lineno)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self.aug_names.setdefault(node.target.id, node.lineno)
            self.visit(node.value)
        else:
            self.generic_visit(node)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self._store(node.target.id, node.lineno)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        args = node.args
        for d in args.defaults + [d for d in args.kw_defaults if d is not None]:
            self.visit(d)
        if not isinstance(node, ast.Lambda):
            for d in node.decorator_list:
                self.visit(d)
            self._store(node.name, node.lineno)
        inner = ScopeNames()
        body = node.body if isinstance(node.body, list) else [node.body]
        for st in body:
            inner.visit(st)
        params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
        if args.vararg:
            params.add(args.vararg.arg)
        if args.kwarg:
            params.add(args.kwarg.arg)
        for name, ln in inner.loads.items():
            if name not in inner.stores and name not in params:
                self._load(name, ln)

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function
    visit_Lambda = _visit_function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for d in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self.visit(d)
        self._store(node.name, node.lineno)
        inner = ScopeNames()
        for st in node.body:
            inner.visit(st)
        for name, ln in inner.loads.items():
            if name not in inner.stores:
                self._load(name, ln)

    def _visit_comp(self, node: ast.AST) -> None:
        gens = node.generators  # type: ignore[attr-defined]
        # the first iterable is evaluated in the enclosing scope
        self.visit(gens[0].iter)
        local: set[str] = set()
        for g in gens:
            local.update(stored_names([g.target]))
        self._comp_locals.append(local)
        for i, g in enumerate(gens):
            if i:
                self.visit(g.iter)
            for c in g.ifs:
                self.visit(c)
        if isinstance(node, ast.DictComp):
            self.visit(node.key)
            self.visit(node.value)
        else:
            self.visit(node.elt)  # type: ignore[attr-defined]
        self._comp_locals.pop()

    visit_ListComp = _visit_comp
    visit_SetComp = _visit_comp
    visit_DictComp = _visit_comp
    visit_GeneratorExp = _visit_comp

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._store((a.asname or a.name).split(".")[0], node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            if a.name == "*":
                raise LoopAnalysisError(
                    "`from ... import *` inside the loop: import the names before the loop",
                    lineno=node.lineno,
                )
            self._store(a.asname or a.name, node.lineno)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._store(node.name, node.lineno)
        for st in node.body:
            self.visit(st)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name:
            self._store(node.name, node.lineno)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self._store(node.name, node.lineno)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        if node.rest:
            self._store(node.rest, node.lineno)
        self.generic_visit(node)


def write_root_names(st: ast.stmt) -> list[ast.Name]:
    """The Name nodes a statement writes through: ``out`` of ``out[k] = v``,
    ``del out[k]``, ``out[k] += v``, ``out.append(v)``."""
    targets: list[ast.AST] = []
    if isinstance(st, (ast.Assign, ast.Delete)):
        targets = list(st.targets)
    elif isinstance(st, (ast.AugAssign, ast.AnnAssign)):
        targets = [st.target]
    elif isinstance(st, ast.Expr) and isinstance(st.value, ast.Call):
        targets = [st.value]
    out = []
    for t in targets:
        for leaf in flatten_targets(t):
            r = leftmost_name(leaf)
            if r is not None:
                out.append(r)
    return out


def flatten_targets(t: ast.AST) -> list[ast.AST]:
    if isinstance(t, (ast.Tuple, ast.List)):
        out: list[ast.AST] = []
        for e in t.elts:
            out.extend(flatten_targets(e))
        return out
    if isinstance(t, ast.Starred):
        return flatten_targets(t.value)
    return [t]


def leftmost_name(node: ast.AST) -> ast.Name | None:
    while isinstance(node, (ast.Subscript, ast.Attribute, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node if isinstance(node, ast.Name) else None
