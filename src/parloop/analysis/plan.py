"""The analysed cell (:class:`LoopPlan`): what runs in the kernel, what runs
in the workers, and the role of every name the loop touches, in the words a
numba or OpenMP reader knows (private/lastprivate, reduction, shared)."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from .dependence import Group
from .writes import Mutation


@dataclass
class LoopPlan:
    """Roles of names (docs/design.md §3):

    * ``targets``     the loop target's names, bound per iteration;
    * ``private``     names assigned in the body (lastprivate): per iteration,
                      the last value kept; ``checked`` ones may be read before
                      the iteration assigns them (checked at run time);
                      ``copies`` (the ``private=`` option) start each iteration
                      as a copy of the outside object;
    * ``inputs``      outside names the body reads: a snapshot at loop start;
    * ``roots``       outside objects the body writes (``out[k] = v``);
    * ``call_roots``  outside names a statement-level method call starts from
                      (a mutation, or a plain call on a module: decided at run time);
    * ``reductions``  outside names accumulated (``total += v``, ``acc = acc + v``,
                      ``m = max(m, v)``): name -> operators;
    * ``groups``      the argmax shape ``if s > best: best = s; best_k = k``;
    * ``read_roots``  written objects the body also reads: *shared*, their
                      reads recorded and checked at run time.
    """

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
    read_roots: set[str] = field(default_factory=set)
    checked: dict[str, int] = field(default_factory=dict)  # name -> line of the read
    deleted: set[str] = field(default_factory=set)
    groups: list[Group] = field(default_factory=list)
    copies: tuple[str, ...] = ()
    break_lines: list[int] = field(default_factory=list)
    body_seeds: bool = False
    #: the loop's `else:` statements (the first of the epilogue): run only
    #: when no iteration breaks
    orelse_count: int = 0
    #: call roots bound to modules with global state (pyplot): replayed in order
    stateful: set[str] = field(default_factory=set)
    #: shared objects read and written at one key expression of the loop
    #: variables only (``df[c] = g(df[c])``): reads need no recording
    same_key: set[str] = field(default_factory=set)

    @property
    def body_lines(self) -> tuple[int, int]:
        return self.loop.lineno, self.loop.end_lineno or self.loop.lineno

    @property
    def has_break(self) -> bool:
        return bool(self.break_lines)

    def shared(self, worker_call_roots: set[str]) -> frozenset[str]:
        """The shared objects once it is known which call roots are plain
        (modules, classes: their calls run in the worker, they are not written)."""
        written = self.roots | (self.call_roots - worker_call_roots)
        return frozenset(self.read_roots & written)

    def group_names(self) -> set[str]:
        return {n for g in self.groups for n in g.names}

    def roles(self) -> dict[str, str]:
        """name -> role, for ``explain`` and ``last_run``."""
        out: dict[str, str] = {}
        for n in sorted(self.inputs):
            out[n] = "input"
        for n in sorted(self.call_roots):
            out[n] = "call-root"
        for n in sorted(self.roots):
            out[n] = "root"
        for n in sorted(self.read_roots):
            out[n] = "shared"
        for n in sorted(self.reductions):
            out[n] = "reduction"
        for g in self.groups:
            for n in g.names:
                out[n] = "reduction-group"
        for n in sorted(self.private):
            out[n] = "private"
        for n in sorted(self.checked):
            out[n] = "private-checked"
        for n in self.copies:
            out[n] = "private-copy"
        for n in self.targets:
            out[n] = "target-mutation" if n in self.target_roots else "target"
        return out
