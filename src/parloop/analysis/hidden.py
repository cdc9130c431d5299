"""State the cell's text does not show: the outside objects an iteration
could change through a path the mutation log does not hold.

An outside object can change behind the log's back only where the body
hands it (or a part of it) to code: as the receiver of a method call inside
an expression (``net.train_step(b)``, ``rng.normal()``), as an argument
(``put(out, i)``, ``next(gen)``, ``fill(grid[i], v)``), bound to a private
alias (``row = A[i]``, then written through ``row``), iterated by an inner
loop or entered by ``with``.  Those are the *watched* names; a plain read
(``out[i] = src[i] * 2``) is not, so loops that only read pay nothing.
Notebook functions the body calls are watched through the globals they use
(decided at run time, see :mod:`parloop.run`).
"""

from __future__ import annotations

import ast

from .scopes import leftmost_name, walk_scope

#: modules with global state of their own (pyplot's current figure and axes):
#: statement-level calls through them are replayed in the kernel in iteration
#: order, like writes; a call whose result the body uses is rejected.  One
#: place, easy to extend (``tensorflow``'s default graph, ``torch``'s seeds...)
STATEFUL_MODULES = frozenset({"matplotlib.pyplot", "seaborn", "pylab"})

#: what to write instead, per module (the object-oriented form)
STATEFUL_ADVICE = {
    "matplotlib.pyplot": "create the figure before the loop (`fig, axes = plt.subplots(...)`) "
    "and draw on it in the loop (`axes[i].plot(...)`)",
}


def is_stateful_module(value: object) -> bool:
    return getattr(value, "__name__", None) in STATEFUL_MODULES and type(value).__name__ == "module"


#: builtins that never change their arguments (calling them is not a hidden path)
PURE_BUILTINS = frozenset(
    "abs all any ascii bin bool bytes callable chr complex dict divmod enumerate float "
    "format frozenset hasattr hash hex id int isinstance issubclass iter len list max "
    "min oct ord pow print range repr reversed round set slice sorted str sum tuple type "
    "zip".split()
)


def _roots(node: ast.AST) -> set[str]:
    """Names whose objects (or parts of them) ``node`` evaluates to."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        out: set[str] = set()
        for e in node.elts:
            out |= _roots(e)
        return out
    if isinstance(node, ast.Starred):
        return _roots(node.value)
    if isinstance(node, (ast.Name, ast.Subscript, ast.Attribute)):
        r = leftmost_name(node)
        if r is not None and not any(isinstance(n, ast.Call) for n in ast.walk(node)):
            return {r.id}
    return set()


def watch_candidates(body: list[ast.stmt], statement_receivers: bool = True) -> set[str]:
    """Names the body hands to code that could change them (see above).
    Without ``statement_receivers``, the receiver of a method call on its own
    line is left out (through the loop target, such a call is replayed on the
    kernel's item)."""
    out: set[str] = set()
    statement_calls = (
        set()
        if statement_receivers
        else {
            id(n.value)
            for st in body
            for n in walk_scope(st)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
        }
    )
    for st in body:
        for n in walk_scope(st):
            if isinstance(n, ast.Call):
                f = n.func
                pure = isinstance(f, ast.Name) and f.id in PURE_BUILTINS
                if not pure:
                    for a in list(n.args) + [k.value for k in n.keywords]:
                        out |= _roots(a)
                if isinstance(f, ast.Name) and not pure:
                    # a callable object (``model(x)``): calling it may change it
                    out.add(f.id)
                if isinstance(f, ast.Attribute) and id(n) not in statement_calls:
                    # a method call: its receiver (one on its own line through
                    # an outside name is a recorded write, filtered out later)
                    out |= _roots(f.value)
            elif isinstance(n, ast.Assign):
                for t in n.targets:
                    if isinstance(t, (ast.Name, ast.Tuple, ast.List)):
                        out |= _roots(n.value)
            elif isinstance(n, (ast.For, ast.AsyncFor)):
                out |= _roots(n.iter)
            elif isinstance(n, (ast.With, ast.AsyncWith)):
                for item in n.items:
                    out |= _roots(item.context_expr)
    return out


def called_names(body: list[ast.stmt]) -> set[str]:
    """Names the body calls directly (``f(x)``): notebook functions among them
    are watched through the globals they use."""
    return {
        n.func.id
        for st in body
        for n in walk_scope(st)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }


def stored_inputs(body: list[ast.stmt], outside: set[str]) -> set[str]:
    """Outside names whose objects (or elements) a write may store
    (``outputs[i] = inputs[i]``, ``picked.append(row)`` after ``row = rows[i]``):
    on engines such values are copies, and go back to the kernel as the
    kernel's own objects (``outputs[i] is inputs[i]``, as in serial)."""
    aliases: dict[str, set[str]] = {}
    for st in body:
        for n in walk_scope(st):
            if isinstance(n, ast.Assign):
                src = _roots(n.value)
                for t in n.targets:
                    for name in (
                        e.id
                        for e in ast.walk(t)
                        if isinstance(e, ast.Name) and isinstance(e.ctx, ast.Store)
                    ):
                        aliases.setdefault(name, set()).update(src)
    out: set[str] = set()

    def note(value: ast.AST) -> None:
        for r in _roots(value):
            out.add(r)
            out.update(aliases.get(r, ()))

    for st in body:
        for n in walk_scope(st):
            if isinstance(n, ast.Assign) and any(
                isinstance(t, (ast.Subscript, ast.Attribute)) for t in n.targets
            ):
                note(n.value)
            elif (
                isinstance(n, ast.Expr)
                and isinstance(n.value, ast.Call)
                and isinstance(n.value.func, ast.Attribute)
            ):
                for a in list(n.value.args) + [k.value for k in n.value.keywords]:
                    note(a)
    return out & outside
