"""Static analysis of a loop cell: split it, give every name a role, reject what
cannot run in parallel.

Pure functions over :mod:`ast`; nothing here runs user code.  The roles follow
DESIGN §3:

* ``target``      the loop target's names (``i, row``), bound per iteration;
* ``private``     names assigned in the body: per iteration, last value kept;
* ``input``       names the body only reads: a snapshot taken when the loop starts;
* ``root``        outside names whose objects the body mutates (``out[k] = v``,
                  ``out.append(v)``): recorded in the worker, replayed in order;
* ``reduction``   outside names updated with an augmented assignment
                  (``total += v``): operands recorded, applied in order;
* ``call-root``   outside names that a statement-level method call starts from;
                  whether that call is a mutation (replayed) or a plain call
                  (``time.sleep``, run in the worker) depends on the value, so it is
                  decided at run time (:func:`parloop.rewrite.classify_call_roots`).

Everything the analysis rejects raises :class:`~parloop.errors.LoopAnalysisError`
naming the line and the variable, before any statement of the cell runs.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

from .errors import LoopAnalysisError

#: Method names that mutate their object.  A call of one of these on an outside
#: name in the middle of an expression (``x = out.pop()``) cannot be replayed in
#: order, so it is rejected; as a statement (``out.append(v)``) it is recorded.
MUTATING_METHODS = frozenset(
    "append extend insert remove pop popitem clear update setdefault add discard "
    "sort reverse appendleft extendleft popleft rotate difference_update "
    "intersection_update symmetric_difference_update move_to_end __setitem__ "
    "__delitem__ __iadd__ fill resize put itemset".split()
)

AUG_OPS = {
    ast.Add: "+=", ast.Sub: "-=", ast.Mult: "*=", ast.Div: "/=", ast.FloorDiv: "//=",
    ast.Mod: "%=", ast.Pow: "**=", ast.LShift: "<<=", ast.RShift: ">>=", ast.BitOr: "|=",
    ast.BitXor: "^=", ast.BitAnd: "&=", ast.MatMult: "@=",
}

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


@dataclass
class Mutation:
    """One statement of the body that writes through a name bound outside the
    iteration (an outside name or the loop target)."""

    kind: str  # "set", "del", "call", "augassign"
    root: str
    lineno: int
    through_target: bool


@dataclass
class LoopPlan:
    """The analysed cell: what runs in the kernel, what runs in the workers, and
    the role of every name the loop touches."""

    tree: ast.Module
    prologue: list[ast.stmt]
    loop: ast.For | ast.AsyncFor
    epilogue: list[ast.stmt]
    targets: list[str]
    private: set[str]
    inputs: set[str]
    roots: set[str]
    reductions: dict[str, list[str]]
    call_roots: set[str]
    target_roots: set[str]
    mutations: list[Mutation] = field(default_factory=list)
    #: loop-target names whose objects a recorded write stores (``sel.append(row)``):
    #: the kernel must store its own item there, not a worker's copy
    stored_targets: set[str] = field(default_factory=set)
    is_async: bool = False

    @property
    def body_lines(self) -> tuple[int, int]:
        return self.loop.lineno, self.loop.end_lineno or self.loop.lineno

    def roles(self) -> dict[str, str]:
        """name -> role, for ``explain`` and ``last_run``."""
        out: dict[str, str] = {}
        for n in sorted(self.inputs):
            out[n] = "input"
        for n in sorted(self.call_roots):
            out[n] = "call-root"
        for n in sorted(self.roots):
            out[n] = "root"
        for n in sorted(self.reductions):
            out[n] = "reduction"
        for n in sorted(self.private):
            out[n] = "private"
        for n in self.targets:
            out[n] = "target-mutation" if n in self.target_roots else "target"
        return out


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def walk_scope(node: ast.AST):
    """Like :func:`ast.walk`, without entering nested functions, lambdas, classes."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        for child in ast.iter_child_nodes(n):
            if not isinstance(child, _SCOPES):
                todo.append(child)


def _target_names(node: ast.AST, where: str) -> list[str]:
    """Names bound by a loop target; only names, tuples, lists and starred names
    are accepted (``for out[i] in ...`` writes outside state)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        names: list[str] = []
        for elt in node.elts:
            names.extend(_target_names(elt, where))
        return names
    if isinstance(node, ast.Starred):
        return _target_names(node.value, where)
    raise LoopAnalysisError(
        f"the {where} target `{ast.unparse(node)}` writes to an object; "
        "use a plain name and assign inside the body",
        lineno=node.lineno,
    )


def _free_names(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> set[str]:
    """Names a function or lambda reads from its enclosing scope *when called*
    (not its default values, which are evaluated when it is made)."""
    inner = _ScopeNames()
    for st in fn.body if isinstance(fn.body, list) else [fn.body]:
        inner.visit(st)
    a = fn.args
    params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    params |= {x.arg for x in (a.vararg, a.kwarg) if x}
    return set(inner.loads) - set(inner.stores) - params


def _spine(node: ast.AST) -> frozenset[int]:
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


def _stored_names(stmt_targets: list[ast.AST]) -> list[str]:
    out: list[str] = []
    for t in stmt_targets:
        for n in ast.walk(t):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                out.append(n.id)
    return out


class _ScopeNames(ast.NodeVisitor):
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
        inner = _ScopeNames()
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
        inner = _ScopeNames()
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
            local.update(_stored_names([g.target]))
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
                raise LoopAnalysisError("`from ... import *` inside the loop", lineno=node.lineno)
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


# ---------------------------------------------------------------------------
# forbidden statements
# ---------------------------------------------------------------------------
class _Forbidden(ast.NodeVisitor):
    """break/return/yield/global/nonlocal in the body's own scope."""

    def __init__(self) -> None:
        self.loop_depth = 0

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
            raise LoopAnalysisError(
                "`break` in the loop body: iterations run in parallel, so no iteration "
                "can stop the others; filter the iterable instead, or run the cell "
                "without the magic",
                lineno=node.lineno,
            )

    def visit_Return(self, node: ast.Return) -> None:
        raise LoopAnalysisError("`return` in the loop body cannot run in parallel",
                                lineno=node.lineno)

    def _yield(self, node: ast.AST) -> None:
        raise LoopAnalysisError("`yield` in the loop body cannot run in parallel",
                                lineno=node.lineno)  # type: ignore[attr-defined]

    visit_Yield = _yield
    visit_YieldFrom = _yield

    def visit_Global(self, node: ast.Global) -> None:
        raise LoopAnalysisError(
            f"`global {', '.join(node.names)}` in the loop body: iterations cannot "
            "rebind notebook names", lineno=node.lineno, name=node.names[0])

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        raise LoopAnalysisError(
            f"`nonlocal {', '.join(node.names)}` in the loop body cannot run in parallel",
            lineno=node.lineno, name=node.names[0])


# ---------------------------------------------------------------------------
# definite assignment: loop-carried reads
# ---------------------------------------------------------------------------
_ALL = None  # state of an unreachable path (after continue/raise)


class _CarriedReads:
    """Walk the body in order, tracking the names surely bound in the current
    iteration; a read of a private name that may not be bound yet would see the
    previous iteration's value (``prev = x``) and is rejected."""

    def __init__(self, private: set[str], reductions: set[str]) -> None:
        self.private = private
        self.reductions = reductions

    def check_expr(self, node: ast.AST | None, bound: set[str]) -> set[str]:
        """Check the reads of an expression; return the names its walrus
        operators bind (bound from here on)."""
        if node is None:
            return set()
        sn = _ScopeNames()
        sn.visit(node)
        walrus = set(sn.stores)
        for name, ln in sn.loads.items():
            if name in self.reductions:
                raise LoopAnalysisError(
                    f"`{name}` is accumulated with an augmented assignment and also read "
                    "in the body: each iteration would depend on the one before",
                    lineno=ln, name=name)
            if name in self.private and name not in bound and name not in walrus:
                raise LoopAnalysisError(
                    f"`{name}` is read before it is assigned in the iteration, so its "
                    "value would come from the previous iteration (a loop-carried "
                    f"dependency); assign `{name}` first in the body, or keep this loop "
                    "serial", lineno=ln, name=name)
        return walrus

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
        b = set(bound)
        if isinstance(st, (ast.Continue, ast.Raise)):
            if isinstance(st, ast.Raise):
                self.check_expr(st.exc, b)
                self.check_expr(st.cause, b)
            return _ALL
        if isinstance(st, ast.Assign):
            b |= self.check_expr(st.value, b)
            for t in st.targets:
                self._check_target(t, b)
            return b | set(_stored_names(st.targets))
        if isinstance(st, ast.AnnAssign):
            self.check_expr(st.value, b)
            self._check_target(st.target, b)
            return b | set(_stored_names([st.target])) if st.value is not None else b
        if isinstance(st, ast.AugAssign):
            b |= self.check_expr(st.value, b)
            if isinstance(st.target, ast.Name):
                name = st.target.id
                if name in self.private and name not in b:
                    raise LoopAnalysisError(
                        f"`{name}` is updated with `{AUG_OPS[type(st.op)]}` but also assigned "
                        "in the body, and may not be assigned yet here: its value would "
                        "come from the previous iteration", lineno=st.lineno, name=name)
                return b
            self._check_target(st.target, b)
            return b
        if isinstance(st, ast.If):
            b |= self.check_expr(st.test, b)
            return self._meet(self.block(st.body, b), self.block(st.orelse, b))
        if isinstance(st, (ast.For, ast.AsyncFor)):
            b |= self.check_expr(st.iter, b)
            inner = b | set(_stored_names([st.target]))
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
                    b |= set(_stored_names([item.optional_vars]))
            return self.block(st.body, b)
        if isinstance(st, (ast.Try, getattr(ast, "TryStar", ast.Try))):
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
                sn = _ScopeNames()
                sn.visit(case.pattern)
                cb = b | set(sn.stores)
                self.check_expr(case.guard, cb)
                ends.append(self.block(case.body, cb))
            return self._meet(b, *ends)
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            # defaults and decorators are evaluated now; the body later
            sn = _ScopeNames()
            sn.visit(st)
            return b | {st.name}
        if isinstance(st, (ast.Import, ast.ImportFrom)):
            sn = _ScopeNames()
            sn.visit(st)
            return b | set(sn.stores)
        if isinstance(st, ast.Delete):
            for t in st.targets:
                self._check_target(t, b)
            return b
        # Expr, Assert, Pass, ...: reads only
        for child in ast.iter_child_nodes(st):
            self.check_expr(child, b)
        sn = _ScopeNames()
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


# ---------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------
class _Mutations:
    """Classify every writing statement of the body by the name it writes
    through: a private name (plain code), the loop target (replayed on the
    kernel's item), or an outside name (recorded, replayed in order)."""

    def __init__(self, private: set[str], targets: set[str], reductions: set[str]):
        self.private = private
        self.targets = targets
        self.reductions = reductions
        self.found: list[Mutation] = []
        self.call_roots: set[str] = set()
        self.stored_targets: set[str] = set()
        self.body_functions: dict[str, set[str]] = {}  # def/lambda name -> free names

    def _classify_root(self, root: str | None, node: ast.AST, what: str) -> str | None:
        if root is None:
            raise LoopAnalysisError(
                f"cannot tell which object `{ast.unparse(node)}` {what}: write through a "
                "name (assign the object to a variable first)", lineno=node.lineno)
        if root in self.private:
            return None
        return root

    def _write(self, target: ast.AST, kind: str, lineno: int) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for e in target.elts:
                self._write(e, kind, lineno)
            return
        if isinstance(target, ast.Starred):
            self._write(target.value, kind, lineno)
            return
        if not isinstance(target, (ast.Subscript, ast.Attribute)):
            return
        root, has_call = chain_root(target)
        root = self._classify_root(root, target, "changes")
        if root is None:
            return
        if has_call:
            raise LoopAnalysisError(
                f"`{ast.unparse(target)}` writes through a call's result on `{root}`; "
                "parloop replays only subscript and attribute chains",
                lineno=lineno, name=root)
        self.found.append(Mutation(kind, root, lineno, root in self.targets))

    def _stores_targets(self, st: ast.stmt) -> None:
        """Loop-target names a recorded write stores as a value (not only reads
        through: ``out[i] = row["a"]`` stores no target)."""
        through = set()
        for n in ast.walk(st):
            if isinstance(n, (ast.Subscript, ast.Attribute)) and isinstance(n.value, ast.Name):
                through.add(id(n.value))
        for n in ast.walk(st):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) \
                    and n.id in self.targets and id(n) not in through:
                self.stored_targets.add(n.id)

    def stmt(self, st: ast.stmt) -> None:
        before = len(self.found)
        self._stmt(st)
        if any(not m.through_target for m in self.found[before:]) and not isinstance(
                st, (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.AsyncFor,
                     ast.AsyncWith, ast.Match)):
            self._stores_targets(st)
            self._escaping_closures(st)
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.body_functions[st.name] = _free_names(st)
        elif isinstance(st, ast.Assign) and isinstance(st.value, ast.Lambda):
            for name in _stored_names(st.targets):
                self.body_functions[name] = _free_names(st.value)

    def _escaping_closures(self, st: ast.stmt) -> None:
        """A function made in the body and stored outside it (``fns.append(lambda:
        i)``) reads the iteration's names when it is called: serial Python
        would show it the *last* iteration's values (late binding), a parallel
        iteration its own.  Rejected rather than silently different."""
        local = self.private | self.targets
        stored: list[ast.AST] = []
        if isinstance(st, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and st.value is not None:
            stored = [st.value]
        elif isinstance(st, ast.Expr) and isinstance(st.value, ast.Call):
            stored = list(st.value.args) + [k.value for k in st.value.keywords]
        for v in list(stored):
            if isinstance(v, (ast.Tuple, ast.List, ast.Set)):
                stored.extend(v.elts)
            elif isinstance(v, ast.Dict):
                stored.extend(v.values)
        for n in stored:
            free: set[str] = set()
            if isinstance(n, ast.Lambda):
                free = _free_names(n)
            elif isinstance(n, ast.Name) and n.id in self.body_functions:
                free = self.body_functions[n.id]
            late = sorted(free & local)
            if late:
                raise LoopAnalysisError(
                    f"a function made in the loop body is stored outside it and reads "
                    f"`{late[0]}` when called: serial Python would show it the last "
                    f"iteration's `{late[0]}` (late binding), parallel iterations their "
                    f"own; bind the value now with a default argument "
                    f"(`lambda {late[0]}={late[0]}: ...`)", lineno=st.lineno, name=late[0])

    def _stmt(self, st: ast.stmt) -> None:
        if isinstance(st, ast.Assign):
            for t in st.targets:
                self._write(t, "set", st.lineno)
        elif isinstance(st, ast.AnnAssign):
            if st.value is not None:
                self._write(st.target, "set", st.lineno)
        elif isinstance(st, ast.AugAssign):
            if isinstance(st.target, ast.Name):
                return
            self._write(st.target, "augassign", st.lineno)
        elif isinstance(st, ast.Delete):
            for t in st.targets:
                if isinstance(t, ast.Name):
                    raise LoopAnalysisError(
                        f"`del {t.id}` in the loop body: parloop keeps the last value of "
                        "every name; delete it after the loop", lineno=st.lineno, name=t.id)
                self._write(t, "del", st.lineno)
        elif isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) \
                and isinstance(st.value.func, ast.Attribute):
            root, _ = chain_root(st.value)
            if root is not None and root not in self.private:
                if root in self.targets:
                    self.found.append(Mutation("call", root, st.lineno, True))
                else:
                    self.call_roots.add(root)
                    self.found.append(Mutation("call", root, st.lineno, False))
                self._expr(st.value, skip=_spine(st.value))
                return
        for child in ast.iter_child_nodes(st):
            # the statement's own expressions (blocks and handlers come below)
            if isinstance(child, ast.expr):
                self._expr(child)
            elif isinstance(child, ast.withitem):
                self._expr(child.context_expr)
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            for sub in getattr(st, block, []) or []:
                if isinstance(sub, ast.ExceptHandler):
                    if sub.type is not None:
                        self._expr(sub.type)
                    for s2 in sub.body:
                        self.stmt(s2)
                elif isinstance(sub, ast.match_case):
                    if sub.guard is not None:
                        self._expr(sub.guard)
                    for s2 in sub.body:
                        self.stmt(s2)
                elif isinstance(sub, ast.stmt) and not isinstance(st, _SCOPES):
                    self.stmt(sub)
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self._nested_scope(st)

    def _expr(self, node: ast.AST, skip: frozenset[int] = frozenset()) -> None:
        """Mutating method calls inside expressions cannot be replayed in order
        (``skip``: the calls of a statement chain that is itself recorded)."""
        for n in ast.walk(node):
            if id(n) in skip:
                continue
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) \
                    and n.func.attr in MUTATING_METHODS:
                root, _ = chain_root(n.func)
                if root is not None and root not in self.private and root not in self.targets:
                    raise LoopAnalysisError(
                        f"`{ast.unparse(n)}` changes `{root}` inside an expression; only a "
                        f"statement such as `{root}.{n.func.attr}(...)` on its own line can "
                        "be replayed in iteration order", lineno=n.lineno, name=root)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                self._nested_scope(n)

    def _nested_scope(self, fn: ast.AST) -> None:
        """A function defined in the body that writes to an outside object would
        do so in the worker, out of order (and on a copy under %%parallel)."""
        inner = _ScopeNames()
        body = fn.body if isinstance(fn.body, list) else [fn.body]  # type: ignore[attr-defined]
        for st in body:
            inner.visit(st)
        local = set(inner.stores)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = fn.args
            local |= {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
            local |= {x.arg for x in (a.vararg, a.kwarg) if x}
        for n in ast.walk(fn):
            tgt = None
            if isinstance(n, (ast.Assign, ast.Delete)):
                tgts = n.targets
            elif isinstance(n, (ast.AugAssign, ast.AnnAssign)):
                tgts = [n.target]
            else:
                tgts = []
            for tgt in tgts:
                if isinstance(tgt, (ast.Subscript, ast.Attribute)):
                    root, _ = chain_root(tgt)
                    if root and root not in local and root not in self.private \
                            and root not in self.targets:
                        raise LoopAnalysisError(
                            f"a function defined in the loop body writes to the outside "
                            f"object `{root}` (`{ast.unparse(tgt)}`); write it in the loop "
                            "body itself so it can be replayed in order",
                            lineno=n.lineno, name=root)


class _ReadsAfterWrites:
    """An iteration that changes an outside object and then reads it sees the
    snapshot, not its own change (the change is replayed in the kernel after
    the iteration): ``out[0] = i; print(out[0])``.  Rejected."""

    def __init__(self, roots: set[str]):
        self.roots = roots

    def block(self, stmts: list[ast.stmt], written: set[str] | None = None) -> set[str]:
        written = set() if written is None else written
        for st in stmts:
            written = self.stmt(st, written)
        return written

    def stmt(self, st: ast.stmt, written: set[str]) -> set[str]:
        if isinstance(st, (ast.For, ast.AsyncFor, ast.While)):
            # a nested loop: a write in one of its passes is seen by the next
            self._check(st.iter if not isinstance(st, ast.While) else st.test, written, None)
            inner = written | self._writes(st.body)
            self.block(st.body, inner)
            return self.block(st.orelse, inner)
        subs = [getattr(st, f, None) or [] for f in ("body", "orelse", "finalbody")]
        subs += [h.body for h in getattr(st, "handlers", []) or []]
        subs += [c.body for c in getattr(st, "cases", []) or []]
        if any(subs) and not isinstance(st, _SCOPES):
            for field_ in ("test", "subject"):
                if getattr(st, field_, None) is not None:
                    self._check(getattr(st, field_), written, None)
            for item in getattr(st, "items", []) or []:
                self._check(item.context_expr, written, None)
            out = set(written)
            for sub in subs:
                out |= self.block(sub, set(written))
            return out
        own = self._roots_of(st)
        self._check(st, written, own)
        return written | own

    def _writes(self, stmts: list[ast.stmt]) -> set[str]:
        out: set[str] = set()
        for st in stmts:
            for n in walk_scope(st):
                if isinstance(n, ast.stmt):
                    out |= self._roots_of(n)
        return out

    def _roots_of(self, st: ast.stmt) -> set[str]:
        return {r.id for r in write_root_names(st) if r.id in self.roots}

    def _check(self, node: ast.AST, written: set[str], own: set[str] | None) -> None:
        if not written:
            return
        spine_roots: set[int] = set()
        if own:
            for leaf in _flatten_targets(getattr(node, "value", node)) + [
                    t for t in getattr(node, "targets", []) or []] + (
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []):
                for t in _flatten_targets(leaf):
                    r = _leftmost_name(t)
                    if r is not None:
                        spine_roots.add(id(r))
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in written \
                    and id(n) not in spine_roots:
                raise LoopAnalysisError(
                    f"`{n.id}` is read after the same iteration changed it: iterations see "
                    f"`{n.id}` as it was when the loop started (their changes are applied "
                    f"in order afterwards); compute the value in a variable of the "
                    f"iteration and use that", lineno=n.lineno, name=n.id)


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------
def split_cell(tree: ast.Module) -> tuple[list[ast.stmt], ast.For | ast.AsyncFor, list[ast.stmt]]:
    """prologue, the first top-level ``for``, epilogue (its ``else`` first)."""
    for i, st in enumerate(tree.body):
        if isinstance(st, (ast.For, ast.AsyncFor)):
            return tree.body[:i], st, list(st.orelse) + tree.body[i + 1:]
    first = tree.body[0].lineno if tree.body else 1
    raise LoopAnalysisError(
        "the cell has no top-level `for` loop to parallelise (DESIGN §2: the cell is "
        "split at its first top-level `for` statement)", lineno=first)


def analyse(tree: ast.Module) -> LoopPlan:
    """Analyse a parsed cell; raise LoopAnalysisError for what cannot be parallel.

    A loop that awaits (``async for`` at the top, or ``await``/``async with``/
    ``async for`` in the body) is accepted here with ``plan.is_async`` set; the
    magic decides whether it can run it (as asyncio tasks under %%threaded)."""
    prologue, loop, epilogue = split_cell(tree)
    targets = _target_names(loop.target, "loop")
    _Forbidden().visit(ast.Module(body=loop.body, type_ignores=[]))
    is_async = isinstance(loop, ast.AsyncFor) or any(
        isinstance(n, (ast.Await, ast.AsyncWith, ast.AsyncFor))
        for st in loop.body for n in walk_scope(st))

    names = _ScopeNames()
    for st in loop.body:
        names.visit(st)
    target_set = set(targets)
    private = set(names.stores)
    reductions: dict[str, list[str]] = {}
    for st in loop.body:
        for n in walk_scope(st):
            if isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name):
                name = n.target.id
                if name in target_set:
                    private.add(name)
                elif name not in private:
                    reductions.setdefault(name, []).append(AUG_OPS[type(n.op)])
    # a reduction name only ever augassigned; a target reassigned becomes private
    for name in list(reductions):
        if name in private:
            del reductions[name]
    reassigned_targets = target_set & private

    _CarriedReads(private - target_set | reassigned_targets, set(reductions)).block(
        loop.body, set(target_set))

    muts = _Mutations(private, target_set - reassigned_targets, set(reductions))
    for st in loop.body:
        muts.stmt(st)
    _ReadsAfterWrites({m.root for m in muts.found if not m.through_target}).block(loop.body)
    target_roots = {m.root for m in muts.found if m.through_target}
    roots = {m.root for m in muts.found if not m.through_target and m.kind != "call"}
    call_roots = muts.call_roots - roots

    inputs = set(names.loads) - private - target_set - set(reductions)
    # a root used only as a root needs no snapshot; one also read is an input too
    loads_outside_writes = _loads_outside_mutations(loop.body, roots | call_roots)
    inputs = {n for n in inputs
              if n not in roots and n not in call_roots or n in loads_outside_writes}
    return LoopPlan(tree=tree, prologue=prologue, loop=loop, epilogue=epilogue,
                    targets=targets, private=private - target_set | reassigned_targets,
                    inputs=inputs, roots=roots, reductions=reductions,
                    call_roots=call_roots, target_roots=target_roots,
                    mutations=muts.found, is_async=is_async,
                    stored_targets=muts.stored_targets)


def _loads_outside_mutations(body: list[ast.stmt], roots: set[str]) -> set[str]:
    """Roots that the body also reads in keys, values or other expressions (so
    their snapshot must travel to the workers), found by counting every
    occurrence of the name against its occurrences as the root of a write."""
    pure: dict[str, int] = {}
    total: dict[str, int] = {}
    for st in body:
        for n in ast.walk(st):
            if isinstance(n, ast.Name) and n.id in roots:
                total[n.id] = total.get(n.id, 0) + 1
            if isinstance(n, ast.stmt):
                for r in write_root_names(n):
                    if r.id in roots:
                        pure[r.id] = pure.get(r.id, 0) + 1
    return {n for n, c in total.items() if c > pure.get(n, 0)}


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
        for leaf in _flatten_targets(t):
            r = _leftmost_name(leaf)
            if r is not None:
                out.append(r)
    return out


def _flatten_targets(t: ast.AST) -> list[ast.AST]:
    if isinstance(t, (ast.Tuple, ast.List)):
        out: list[ast.AST] = []
        for e in t.elts:
            out.extend(_flatten_targets(e))
        return out
    if isinstance(t, ast.Starred):
        return _flatten_targets(t.value)
    return [t]


def _leftmost_name(node: ast.AST) -> ast.Name | None:
    while isinstance(node, (ast.Subscript, ast.Attribute, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node if isinstance(node, ast.Name) else None


def prologue_names(plan: LoopPlan) -> set[str]:
    """Names the statements before the loop bind."""
    names = _ScopeNames()
    for st in plan.prologue:
        names.visit(st)
    return set(names.stores)
