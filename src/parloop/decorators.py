"""``parloop.threaded(...)`` / ``parloop.parallel(...)``: the same rewrite for a
function whose body holds the loop, for code that leaves the notebook.

The function's body is treated like a cell: statements before its first
top-level ``for`` run first, the loop runs in parallel, the rest after; the
function's parameters and local names play the notebook namespace's part.

    @parloop.threaded(threads=16)
    def fetch_all(urls):
        pages = {}
        for u in urls:
            pages[u] = fetch(u)
        return pages
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Any, Callable, TypeVar

from .options import parse_options
from .run import Cell, _Return, run_cell

F = TypeVar("F", bound=Callable[..., Any])


class _Returns(ast.NodeTransformer):
    """``return x`` outside nested scopes -> ``raise ___Return(x)``."""

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        return node

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef

    def visit_Return(self, node: ast.Return) -> ast.AST:
        call = ast.Call(
            func=ast.Name("___Return", ast.Load()),
            args=[node.value or ast.Constant(None)],
            keywords=[],
        )
        return ast.copy_location(ast.Raise(exc=call, cause=None), node)


def _function_tree(fn: Callable) -> tuple[ast.Module, str]:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise TypeError(f"parloop: cannot read the source of {fn.__qualname__} ({e})") from None
    tree = ast.parse(source)
    # line numbers of the file, so tracebacks show the function's own lines
    ast.increment_lineno(tree, fn.__code__.co_firstlineno - 1)
    fdef = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    module = ast.Module(body=list(fdef.body), type_ignores=[])
    # the loop itself may not return; the prologue and epilogue may
    for i, st in enumerate(module.body):
        if isinstance(st, (ast.For, ast.AsyncFor)):
            module.body[:i] = [_Returns().visit(s) for s in module.body[:i]]
            st.orelse = [_Returns().visit(s) for s in st.orelse]
            module.body[i + 1 :] = [_Returns().visit(s) for s in module.body[i + 1 :]]
            break
    ast.fix_missing_locations(module)
    return module, fn.__code__.co_filename


def _decorator(magic: str, fn: Callable | None, options: dict[str, Any]) -> Any:
    words = []
    for key, value in options.items():
        if value is True:
            words.append(key)
        elif value is not None and value is not False:
            words.append(f"{key}={value}")
    opts = parse_options(" ".join(words), magic)  # bad options fail at decoration time

    def wrap(func: F) -> F:
        tree, filename = _function_tree(func)
        signature = inspect.signature(func)

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            from .backends import make_backend
            from .progress.text import TextProgress
            from .run import Progress

            ns: dict[str, Any] = dict(func.__globals__)
            if func.__closure__:
                ns.update(
                    zip(func.__code__.co_freevars, (c.cell_contents for c in func.__closure__))
                )
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            ns.update(bound.arguments)
            ns["___Return"] = _Return
            cell = Cell(source="", filename=filename, tree=tree)
            mode = opts.resolved_progress(False)
            try:
                run_cell(
                    cell, ns, opts, make_backend, TextProgress() if mode != "off" else Progress()
                )  # type: ignore
            except _Return as r:
                return r.value
            return None

        return run  # type: ignore[return-value]

    return wrap if fn is None else wrap(fn)


def threaded(fn: Callable | None = None, /, **options: Any) -> Any:
    """Run the first top-level ``for`` loop of the decorated function on a
    thread pool (options as for ``%%threaded``: ``threads=16``, ``seed=1``, ...)."""
    return _decorator("threaded", fn, options)


def parallel(fn: Callable | None = None, /, **options: Any) -> Any:
    """Run the first top-level ``for`` loop of the decorated function on
    ipyparallel engines (options as for ``%%parallel``)."""
    return _decorator("parallel", fn, options)
