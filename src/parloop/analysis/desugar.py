"""Spellings of attribute access that the analysis would not see, rewritten
to the attribute syntax they mean before anything looks at the cell.

``setattr(o, "x", v)`` as a statement is ``o.x = v``, and ``getattr(o, "x")``
is ``o.x``: with a constant identifier for the name, these are the same
operations (the same ``__setattr__``/``__getattribute__`` calls), but as calls
they hide a write and a read of ``o`` from the dependence test -- ``o`` would
only be an object handed to code, watched by fingerprint, which under threads
checks the first iteration alone (one that writes the value already there is
missed).  Rewritten, they are attribute writes and reads like any other:
logged, replayed in order, checked for conflicts.

Only the two builtins' plain forms are touched: ``getattr`` with a default,
computed names, keyword or starred arguments, and ``setattr`` used for its
value (``None``) stay calls.  A cell that rebinds ``setattr``/``getattr`` (or
imports them) is left alone."""

from __future__ import annotations

import ast


def _is_builtin_call(node: ast.AST, name: str, nargs: int) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == name
        and len(node.args) == nargs
        and not node.keywords
        and not any(isinstance(a, ast.Starred) for a in node.args)
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and node.args[1].value.isidentifier()
    )


class _Desugar(ast.NodeTransformer):
    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        self.generic_visit(node)
        call = node.value
        if _is_builtin_call(call, "setattr", 3):
            assert isinstance(call, ast.Call)
            obj, name, value = call.args
            target = ast.Attribute(value=obj, attr=name.value, ctx=ast.Store())  # type: ignore[attr-defined]
            return ast.copy_location(
                ast.Assign(targets=[ast.copy_location(target, call)], value=value), node
            )
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if _is_builtin_call(node, "getattr", 2):
            obj, name = node.args
            return ast.copy_location(
                ast.Attribute(value=obj, attr=name.value, ctx=ast.Load()),  # type: ignore[attr-defined]
                node,
            )
        return node


def _rebinds(tree: ast.AST, names: set[str]) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names and not isinstance(node.ctx, ast.Load):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name in names:
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name) in names for a in node.names):
                return True
    return False


def desugar(tree: ast.Module, ns: dict) -> ast.Module:
    """The cell with ``setattr``/``getattr`` of constant names as attribute
    syntax (in place; returned for convenience), unless the cell or the
    notebook rebinds those names."""
    names = {"setattr", "getattr"}
    if _rebinds(tree, names) or names & set(ns):
        return tree
    _Desugar().visit(tree)
    ast.fix_missing_locations(tree)
    return tree
