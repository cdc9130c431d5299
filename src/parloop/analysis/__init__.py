"""Static analysis of a loop cell: split it, give every name a role, plan
how each dependence between iterations is kept serial-equivalent, reject
what cannot be (docs/design.md §3).

Pure functions over :mod:`ast`; nothing here runs user code.  One module per
concern: :mod:`.scopes` (names and chains), :mod:`.statements` (forbidden
statements, reads carried from the previous iteration), :mod:`.writes`
(write classification), :mod:`.dependence` (reductions, groups, shared
objects), :mod:`.plan` (the result), :mod:`.explain` (the ``explain`` flag).

Everything the analysis rejects raises :class:`~parloop.errors.LoopAnalysisError`
naming the line and the variable, before any statement of the cell runs.
"""

from __future__ import annotations

import ast

from ..errors import LoopAnalysisError
from .dependence import (
    argmax_groups,
    body_seeds,
    loads_outside_writes,
    rebinding_reductions,
    same_key_objects,
)
from .plan import LoopPlan
from .scopes import ScopeNames, chain_root, target_names, walk_scope
from .statements import CarriedReads, Forbidden, maybe_bound_before
from .writes import AUG_OPS, MUTATING_METHODS, Mutation, Mutations

__all__ = [
    "analyse",
    "split_cell",
    "prologue_names",
    "LoopPlan",
    "Mutation",
    "AUG_OPS",
    "MUTATING_METHODS",
    "chain_root",
    "walk_scope",
]


def split_cell(tree: ast.Module) -> tuple[list[ast.stmt], ast.For | ast.AsyncFor, list[ast.stmt]]:
    """prologue, the first top-level ``for``, epilogue (its ``else`` first)."""
    for i, st in enumerate(tree.body):
        if isinstance(st, (ast.For, ast.AsyncFor)):
            return tree.body[:i], st, list(st.orelse) + tree.body[i + 1 :]
    first = tree.body[0].lineno if tree.body else 1
    raise LoopAnalysisError(
        "the cell has no top-level `for` loop to parallelise (the cell is split at its "
        "first top-level `for` statement)",
        lineno=first,
    )


def analyse(
    tree: ast.Module,
    plain_roots: frozenset[str] = frozenset(),
    copies: tuple[str, ...] = (),
    stateful: dict[str, str] | None = None,
) -> LoopPlan:
    """Analyse a parsed cell; raise LoopAnalysisError for what cannot be parallel.

    ``plain_roots``: outside names known to be bound to modules, classes or
    functions (``np``): calls through them are calls, not writes.
    ``copies``: the ``private=`` option's names.
    ``stateful``: names bound to modules with global state (``plt``): module name.

    A loop that awaits (``async for`` at the top, or ``await``/``async with``/
    ``async for`` in the body) is accepted here with ``plan.is_async`` set; the
    magic decides whether it can run it (as asyncio tasks under %%threaded)."""
    prologue, loop, epilogue = split_cell(tree)
    targets = target_names(loop.target, "loop")
    forbidden = Forbidden()
    forbidden.visit(ast.Module(body=loop.body, type_ignores=[]))
    is_async = isinstance(loop, ast.AsyncFor) or any(
        isinstance(n, (ast.Await, ast.AsyncWith, ast.AsyncFor))
        for st in loop.body
        for n in walk_scope(st)
    )

    names = ScopeNames()
    for st in loop.body:
        names.visit(st)
    target_set = set(targets)
    for c in copies:
        if c in target_set:
            raise LoopAnalysisError(
                f"private={c}: `{c}` is the loop variable, private to each iteration already",
                name=c,
            )
    private = set(names.stores) | set(copies)
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
    rebinding = {
        n: ops for n, ops in rebinding_reductions(loop.body, target_set).items() if n not in copies
    }
    groups = [g for g in argmax_groups(loop.body, target_set) if not set(g.names) & set(copies)]
    group_names = {n for g in groups for n in g.names}
    private -= set(rebinding) | group_names
    reassigned_targets = target_set & private

    checker = CarriedReads(
        private - target_set | reassigned_targets,
        set(reductions),
        maybe_bound_before(loop.body, private),
    )
    checker.block(loop.body, set(target_set) | set(copies))
    for name, ops in rebinding.items():
        reductions.setdefault(name, []).extend(ops)

    stateful = {n: m for n, m in (stateful or {}).items() if n not in private}
    muts = Mutations(
        private,
        target_set - reassigned_targets,
        set(reductions),
        plain_roots=plain_roots - set(stateful),
        stateful=stateful,
    )
    for st in loop.body:
        muts.stmt(st)
    target_roots = {m.root for m in muts.found if m.through_target}
    roots = {m.root for m in muts.found if not m.through_target and m.kind != "call"}
    call_roots = muts.call_roots - roots
    for r in (roots | call_roots) & set(reductions):
        raise LoopAnalysisError(
            f"`{r}` is accumulated and also written through in the body: each iteration "
            "would depend on the one before; use one of the two forms",
            name=r,
        )

    inputs = set(names.loads) - private - target_set - set(reductions)
    read_roots = loads_outside_writes(loop.body, roots | call_roots)
    # a root used only as a root needs no snapshot; one also read is an input too
    inputs = {n for n in inputs if n not in roots and n not in call_roots or n in read_roots}
    inputs |= {c for c in copies}
    return LoopPlan(
        tree=tree,
        prologue=prologue,
        loop=loop,
        epilogue=epilogue,
        targets=targets,
        private=private - target_set | reassigned_targets,
        inputs=inputs,
        roots=roots,
        reductions=reductions,
        call_roots=call_roots,
        target_roots=target_roots,
        mutations=muts.found,
        is_async=is_async,
        stored_targets=muts.stored_targets,
        read_roots=read_roots,
        checked=dict(checker.checked),
        deleted=muts.deleted & private,
        groups=groups,
        copies=tuple(copies),
        break_lines=forbidden.breaks,
        body_seeds=body_seeds(loop.body),
        orelse_count=len(loop.orelse),
        stateful=set(stateful) & call_roots,
        same_key=same_key_objects(loop.body, read_roots & roots, target_set - reassigned_targets),
    )


def prologue_names(plan: LoopPlan) -> set[str]:
    """Names the statements before the loop bind."""
    names = ScopeNames()
    for st in plan.prologue:
        names.visit(st)
    return set(names.stores)
