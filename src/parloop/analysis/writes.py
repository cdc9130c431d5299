"""Write classification: every statement of the body that writes through a
name bound outside the iteration, by what it writes through (a private, the
loop target, an outside object), and the writes parloop cannot replay in
order (rejected)."""

from __future__ import annotations

import ast
from dataclasses import dataclass

from ..errors import LoopAnalysisError
from .scopes import SCOPES, ScopeNames, chain_root, free_names, spine, stored_names

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
    ast.Add: "+=",
    ast.Sub: "-=",
    ast.Mult: "*=",
    ast.Div: "/=",
    ast.FloorDiv: "//=",
    ast.Mod: "%=",
    ast.Pow: "**=",
    ast.LShift: "<<=",
    ast.RShift: ">>=",
    ast.BitOr: "|=",
    ast.BitXor: "^=",
    ast.BitAnd: "&=",
    ast.MatMult: "@=",
}


@dataclass
class Mutation:
    """One statement of the body that writes through a name bound outside the
    iteration (an outside name or the loop target)."""

    kind: str  # "set", "del", "call", "augassign"
    root: str
    lineno: int
    through_target: bool


class Mutations:
    """Classify every writing statement of the body by the name it writes
    through: a private name (plain code), the loop target (replayed on the
    kernel's item), or an outside name (recorded, replayed in order)."""

    def __init__(
        self,
        private: set[str],
        targets: set[str],
        reductions: set[str],
        plain_roots: frozenset[str] = frozenset(),
        stateful: dict[str, str] | None = None,
    ):
        self.private = private
        #: name -> module, for names bound to modules with global state (pyplot)
        self.stateful = stateful or {}
        #: outside names bound to modules, classes and functions: ``np.sort(a)``
        #: is a call, never a write to ``np``
        self.plain_roots = plain_roots
        self.deleted: set[str] = set()  # private names the body `del`s
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
                "name (assign the object to a variable first)",
                lineno=getattr(node, "lineno", None),
            )
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
                "parloop replays only subscript and attribute chains: bind the call's "
                "result to a name before the loop and write through that name",
                lineno=lineno,
                name=root,
            )
        self.found.append(Mutation(kind, root, lineno, root in self.targets))

    def _stores_targets(self, st: ast.stmt) -> None:
        """Loop-target names a recorded write stores as a value (not only reads
        through: ``out[i] = row["a"]`` stores no target)."""
        through = set()
        for n in ast.walk(st):
            if isinstance(n, (ast.Subscript, ast.Attribute)) and isinstance(n.value, ast.Name):
                through.add(id(n.value))
        for n in ast.walk(st):
            if (
                isinstance(n, ast.Name)
                and isinstance(n.ctx, ast.Load)
                and n.id in self.targets
                and id(n) not in through
            ):
                self.stored_targets.add(n.id)

    def stmt(self, st: ast.stmt) -> None:
        before = len(self.found)
        self._stmt(st)
        if any(not m.through_target for m in self.found[before:]) and not isinstance(
            st,
            (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.AsyncFor, ast.AsyncWith, ast.Match),
        ):
            self._stores_targets(st)
            self._escaping_closures(st)
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.body_functions[st.name] = free_names(st)
        elif isinstance(st, ast.Assign) and isinstance(st.value, ast.Lambda):
            for name in stored_names(st.targets):
                self.body_functions[name] = free_names(st.value)

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
            stored = [*st.value.args, *(k.value for k in st.value.keywords)]
        for v in list(stored):
            if isinstance(v, (ast.Tuple, ast.List, ast.Set)):
                stored.extend(v.elts)
            elif isinstance(v, ast.Dict):
                stored.extend(v.values)
        for n in stored:
            free: set[str] = set()
            if isinstance(n, ast.Lambda):
                free = free_names(n)
            elif isinstance(n, ast.Name) and n.id in self.body_functions:
                free = self.body_functions[n.id]
            late = sorted(free & local)
            if late:
                raise LoopAnalysisError(
                    f"a function made in the loop body is stored outside it and reads "
                    f"`{late[0]}` when called: serial Python would show it the last "
                    f"iteration's `{late[0]}` (late binding), parallel iterations their "
                    f"own; bind the value now with a default argument "
                    f"(`lambda {late[0]}={late[0]}: ...`)",
                    lineno=st.lineno,
                    name=late[0],
                )

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
                    self.deleted.add(t.id)  # a private: unbound after the loop as in serial
                    continue
                self._write(t, "del", st.lineno)
        elif (
            isinstance(st, ast.Expr)
            and isinstance(st.value, ast.Call)
            and isinstance(st.value.func, ast.Attribute)
        ):
            root, _ = chain_root(st.value)
            if root is not None and root not in self.private:
                if root in self.targets:
                    self.found.append(Mutation("call", root, st.lineno, True))
                else:
                    self.call_roots.add(root)
                    self.found.append(Mutation("call", root, st.lineno, False))
                self._expr(st.value, skip=spine(st.value))
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
                elif isinstance(sub, ast.stmt) and not isinstance(st, SCOPES):
                    self.stmt(sub)
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self._nested_scope(st)

    def _expr(self, node: ast.AST, skip: frozenset[int] = frozenset()) -> None:
        """Mutating method calls inside expressions cannot be replayed in order
        (``skip``: the calls of a statement chain that is itself recorded)."""
        for n in ast.walk(node):
            if id(n) in skip:
                continue
            if isinstance(n, ast.Call) and self.stateful:
                root = chain_root(n.func)[0]
                if root in self.stateful and root not in self.private:
                    from .hidden import STATEFUL_ADVICE

                    advice = STATEFUL_ADVICE.get(self.stateful[root], "call it on its own line")
                    raise LoopAnalysisError(
                        f"`{ast.unparse(n)}` uses the global state of `{self.stateful[root]}` "
                        "(its current figure) and the body needs its result: calls through it "
                        f"are replayed in the kernel in iteration order only as statements; "
                        f"{advice}",
                        lineno=n.lineno,
                        name=root,
                    )
            if (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute)
                and n.func.attr in MUTATING_METHODS
            ):
                root, _ = chain_root(n.func)
                if (
                    root is not None
                    and root not in self.private
                    and root not in self.targets
                    and root not in self.plain_roots
                ):
                    raise LoopAnalysisError(
                        f"`{ast.unparse(n)}` changes `{root}` inside an expression; only a "
                        f"statement such as `{root}.{n.func.attr}(...)` on its own line can "
                        f"be replayed in iteration order: call it on its own line and read "
                        f"the result afterwards, or give each iteration its own copy with "
                        f"`private={root}`",
                        lineno=n.lineno,
                        name=root,
                    )
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                self._nested_scope(n)

    def _nested_scope(self, fn: ast.AST) -> None:
        """A function defined in the body that writes to an outside object would
        do so in the worker, out of order (and on a copy under %%parallel)."""
        inner = ScopeNames()
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
                    if (
                        root
                        and root not in local
                        and root not in self.private
                        and root not in self.targets
                    ):
                        raise LoopAnalysisError(
                            f"a function defined in the loop body writes to the outside "
                            f"object `{root}` (`{ast.unparse(tgt)}`); write it in the loop "
                            "body itself so it can be replayed in order",
                            lineno=getattr(n, "lineno", None),
                            name=root,
                        )
