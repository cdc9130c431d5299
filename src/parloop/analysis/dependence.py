"""The dependence plan: which names and objects carry values from one
iteration to the next, and how each is kept serial-equivalent.

* reductions written by rebinding (``acc = acc + v``, ``m = max(m, v)``):
  OpenMP's and numba's reductions; the operands are recorded and applied in
  iteration order;
* the argmax/argmin shape (``if s > best: best = s; best_k = k``): the names
  assigned together in the branch travel together, the comparison is made
  again in the kernel at commit, in order (ties as serial);
* shared objects: outside objects the body both writes (through the log) and
  reads; their reads are recorded and checked at run time (parloop.tracking,
  parloop.log.conflicts);
* seeds set in the body (``np.random.seed(i)``): seed that iteration's own
  streams.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from ..errors import LoopAnalysisError
from .scopes import walk_scope, write_root_names

_BINOPS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.MatMult: "@",
}
#: the comparison of ``if E <op> kept`` as "candidate <op> kept"; the mirror
#: image for ``if kept <op> E``
_CMP = {ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<="}
_MIRROR = {">": "<", ">=": "<=", "<": ">", "<=": ">="}

#: calls in the body that seed a module-level generator for the iteration
SEED_CALLS = frozenset({"random.seed", "np.random.seed", "numpy.random.seed"})


@dataclass
class Group:
    """``if candidate <cmp> compared: compared = candidate; other = ...``."""

    compared: str
    cmp: str
    names: list[str]
    node: ast.If


def _loads(node: ast.AST, name: str) -> int:
    return sum(
        1
        for n in ast.walk(node)
        if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
    )


def _rebind_op(name: str, value: ast.expr) -> str | None:
    """The reduction operator of ``name = value``, or None."""
    if isinstance(value, ast.BinOp) and type(value.op) in _BINOPS:
        op = _BINOPS[type(value.op)]
        left, right = value.left, value.right
        if isinstance(left, ast.Name) and left.id == name and not _loads(right, name):
            return op
        if isinstance(right, ast.Name) and right.id == name and not _loads(left, name):
            return "r" + op
        return None
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id in ("max", "min")
        and len(value.args) == 2
        and not value.keywords
        and not any(isinstance(a, ast.Starred) for a in value.args)
    ):
        a, b = value.args
        if isinstance(a, ast.Name) and a.id == name and not _loads(b, name):
            return value.func.id
        if isinstance(b, ast.Name) and b.id == name and not _loads(a, name):
            return "r" + value.func.id
    return None


def _stores(body: list[ast.stmt]) -> dict[str, list[ast.AST]]:
    """name -> every node of the body's own scope that binds it."""
    out: dict[str, list[ast.AST]] = {}
    for st in body:
        for n in walk_scope(st):
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                out.setdefault(n.id, []).append(n)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.setdefault(n.name, []).append(n)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                for a in n.names:
                    out.setdefault((a.asname or a.name).split(".")[0], []).append(n)
            elif isinstance(n, ast.ExceptHandler) and n.name:
                out.setdefault(n.name, []).append(n)
    return out


def _all_loads(body: list[ast.stmt]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for st in body:
        for n in ast.walk(st):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                counts[n.id] = counts.get(n.id, 0) + 1
    return counts


def rebinding_reductions(body: list[ast.stmt], targets: set[str]) -> dict[str, list[str]]:
    """Names updated only as ``acc = acc <op> e`` / ``m = max(m, e)`` /
    ``m = min(e, m)`` and read nowhere else: name -> operators."""
    sites: dict[str, list[ast.Assign]] = {}
    for st in body:
        for n in walk_scope(st):
            if (
                isinstance(n, ast.Assign)
                and len(n.targets) == 1
                and isinstance(n.targets[0], ast.Name)
            ):
                sites.setdefault(n.targets[0].id, []).append(n)
    stores = _stores(body)
    loads = _all_loads(body)
    out: dict[str, list[str]] = {}
    for name, assigns in sites.items():
        if name in targets or len(stores.get(name, ())) != len(assigns):
            continue
        ops = [_rebind_op(name, a.value) for a in assigns]
        if None in ops or loads.get(name, 0) != len(assigns):
            continue
        out[name] = [op for op in ops if op is not None]
    return out


def _group_of(node: ast.If) -> tuple[str, str, ast.expr, list[str]] | None:
    test = node.test
    if (
        node.orelse
        or not isinstance(test, ast.Compare)
        or len(test.ops) != 1
        or type(test.ops[0]) not in _CMP
    ):
        return None
    if not node.body or not all(
        isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
        for s in node.body
    ):
        return None
    names = [s.targets[0].id for s in node.body]  # type: ignore[attr-defined]
    if len(set(names)) != len(names):
        return None
    cmp = _CMP[type(test.ops[0])]
    left, right = test.left, test.comparators[0]
    for kept, cand, c in ((right, left, cmp), (left, right, _MIRROR[cmp])):
        if isinstance(kept, ast.Name) and kept.id in names:
            value = node.body[names.index(kept.id)].value  # type: ignore[attr-defined]
            if ast.dump(value) == ast.dump(cand):
                return kept.id, c, cand, names
    return None


def argmax_groups(body: list[ast.stmt], targets: set[str]) -> list[Group]:
    """The ``if s > best: best = s; best_k = k`` statements whose names are
    bound nowhere else in the body and read nowhere but in the comparison."""
    stores = _stores(body)
    loads = _all_loads(body)
    found: list[Group] = []
    for st in body:
        for n in walk_scope(st):
            if not isinstance(n, ast.If):
                continue
            g = _group_of(n)
            if g is None:
                continue
            compared, cmp, cand, names = g
            if set(names) & targets:
                continue
            if any(len(stores.get(x, ())) != 1 for x in names):
                continue
            if _loads(n.test, compared) != 1 or any(
                _loads(n.test, x) for x in names if x != compared
            ):
                continue
            if any(_loads(s.value, x) for s in n.body for x in names):  # type: ignore[attr-defined]
                continue
            if any(loads.get(x, 0) != (x == compared) for x in names):
                continue
            found.append(Group(compared, cmp, names, n))
    return found


def body_seeds(body: list[ast.stmt]) -> bool:
    """Whether the body seeds the module-level generators; such calls must
    lead the body (draws before them would come from the previous
    iteration's stream, which no worker has)."""
    leading = True
    found = False
    for st in body:
        is_seed = (
            isinstance(st, ast.Expr)
            and isinstance(st.value, ast.Call)
            and ast.unparse(st.value.func) in SEED_CALLS
        )
        if is_seed and not leading:
            raise LoopAnalysisError(
                f"`{ast.unparse(st.value)}` seeds the generator in the middle of the "  # type: ignore[attr-defined]
                "iteration: draws before it would continue the previous iteration's "
                "stream; seed at the top of the body, or use the seed= option",
                lineno=st.lineno,
            )
        found = found or is_seed
        leading = leading and is_seed
        if not is_seed:
            for n in walk_scope(st):
                if isinstance(n, ast.Call) and ast.unparse(n.func) in SEED_CALLS:
                    raise LoopAnalysisError(
                        f"`{ast.unparse(n)}` seeds the generator inside the iteration's "
                        "code: seed at the top of the body, or use the seed= option",
                        lineno=n.lineno,
                    )
    return found


def loads_outside_writes(body: list[ast.stmt], roots: set[str]) -> set[str]:
    """Roots that the body also reads in keys, values or other expressions
    (found by counting every occurrence of the name against its occurrences
    as the root of a write): the shared objects, when they are written."""
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


def rebind_operand(name: str, value: ast.expr) -> tuple[str, ast.expr] | None:
    """``(operator, operand)`` of a reduction written by rebinding (the
    operand is the expression the worker evaluates and records)."""
    op = _rebind_op(name, value)
    if op is None:
        return None
    if isinstance(value, ast.BinOp):
        return op, (value.right if not op.startswith("r") else value.left)
    assert isinstance(value, ast.Call)
    return op, (value.args[1] if not op.startswith("r") else value.args[0])


def same_key_objects(body: list[ast.stmt], names: set[str], targets: set[str]) -> set[str]:
    """Shared objects that every iteration reads and writes at one key only,
    the same expression of the loop variables everywhere (``df[c] =
    g(df[c])``), written unconditionally by a top-level statement: their reads
    need no recording, the key each iteration writes is the one it read
    (only a repeated key conflicts)."""
    out: set[str] = set()
    for name in names:
        keys: set[str] = set()
        bare = False
        for st in body:
            subs = {
                id(n.value)
                for n in ast.walk(st)
                if isinstance(n, ast.Subscript)
                and isinstance(n.value, ast.Name)
                and n.value.id == name
            }
            for n in ast.walk(st):
                if (
                    isinstance(n, ast.Subscript)
                    and isinstance(n.value, ast.Name)
                    and n.value.id == name
                ):
                    keys.add(ast.dump(n.slice))
                    loads = {x.id for x in ast.walk(n.slice) if isinstance(x, ast.Name)}
                    if not loads <= targets or any(
                        isinstance(x, ast.Call) for x in ast.walk(n.slice)
                    ):
                        bare = True
                elif isinstance(n, ast.Name) and n.id == name and id(n) not in subs:
                    bare = True
        if bare or len(keys) != 1:
            continue
        for st in body:
            if (
                isinstance(st, ast.Assign)
                and len(st.targets) == 1
                and isinstance(st.targets[0], ast.Subscript)
                and isinstance(st.targets[0].value, ast.Name)
                and st.targets[0].value.id == name
            ):
                out.add(name)
                break
            if not isinstance(st, (ast.Assign, ast.AnnAssign, ast.Expr, ast.AugAssign)) or any(
                isinstance(n, ast.NamedExpr) for n in ast.walk(st)
            ):
                break
    return out
