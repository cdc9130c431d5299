"""The ``explain`` flag: a readable account of how parloop would run a cell,
run nothing: every name's role and how it is kept serial-equivalent, and the
hidden state found (objects handed to code, notebook functions' globals)."""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from typing import Any

from ..options import Options
from ..rewrite import is_plain_callable_root
from . import LoopPlan
from .scopes import chain_root
from .writes import MUTATING_METHODS

_HOW = {
    "target": "bound per iteration from the kernel's own item; after the loop: the last item",
    "target-mutation": "written through: replayed on the kernel's own item in order",
    "private": "private to each iteration; after the loop: the last value",
    "input": "read only: {travel}",
    "root": "mutated: writes recorded in the worker, replayed in iteration order",
    "shared": "written and read: reads recorded per iteration and checked at commit; an "
    "iteration that read what an earlier one wrote is re-run in the kernel "
    "(serially from there when most do)",
    "reduction-group": "kept together with the argmax/argmin comparison: compared again "
    "at commit, in iteration order (ties as serial)",
    "private-checked": "private, read before some paths assign it: an iteration that reads "
    "the previous iteration's value is re-run in the kernel",
    "private-copy": "private=: each iteration works on its own copy; its calls are "
    "replayed on the notebook's object in order",
    "reduction": "accumulated ({ops}): operands recorded, applied in iteration order",
    "call-root": "{call}",
}


def _kind(value: Any) -> str:
    if isinstance(value, types.ModuleType):
        return "module"
    if isinstance(value, type):
        return "class"
    if callable(value) and hasattr(value, "__code__"):
        return "function"
    return type(value).__name__


def global_writes(fn: Any, ns: dict[str, Any]) -> list[tuple[str, str]]:
    """(global name, how) for every notebook global that ``fn`` changes by
    itself: ``global`` statements, subscript/attribute writes and mutating
    method calls on names it does not bind locally."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError):
        return []
    fdef = next(
        (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None
    )
    if fdef is None:
        return []
    local = {a.arg for a in fdef.args.args + fdef.args.kwonlyargs + fdef.args.posonlyargs}
    for n in ast.walk(fdef):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            local.add(n.id)
    found: list[tuple[str, str]] = []
    for n in ast.walk(fdef):
        if isinstance(n, ast.Global):
            found.extend((g, "rebinds it (`global`)") for g in n.names if g in ns)
        targets: list[ast.AST] = []
        if isinstance(n, (ast.Assign, ast.Delete)):
            targets = list(n.targets)
        elif isinstance(n, (ast.AugAssign, ast.AnnAssign)):
            targets = [n.target]
        for t in targets:
            if isinstance(t, (ast.Subscript, ast.Attribute)):
                root, _ = chain_root(t)
                if (
                    root
                    and root not in local
                    and root in ns
                    and not isinstance(ns[root], types.ModuleType)
                ):
                    found.append((root, f"`{ast.unparse(t)} = ...`"))
        if (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr in MUTATING_METHODS
        ):
            root, _ = chain_root(n.func)
            if (
                root
                and root not in local
                and root in ns
                and not isinstance(ns[root], types.ModuleType)
            ):
                found.append((root, f"`{ast.unparse(n)}`"))
    return found


def hidden_state(plan: LoopPlan, ns: dict[str, Any]) -> list[str]:
    """What the body hands to code that could change it behind the log (see
    parloop.analysis.hidden), and what parloop does about it."""
    from ..rewrite import classify_call_roots
    from .functions import notebook_functions
    from .namespace import plain_roots, watched

    plain, stateful = plain_roots(plan.tree, ns)
    functions = notebook_functions(plan.loop.body, ns, plain, stateful)
    out = []
    for path in watched(plan, ns, classify_call_roots(plan, ns), functions):
        if len(path) == 1:
            out.append(f"`{path[0]}` is handed to code that may change it")
            continue
        fname, g = path
        fn = ns.get(fname)
        how = (
            [h for name, h in global_writes(fn, ns) if name == g]
            if isinstance(fn, types.FunctionType)
            else []
        )
        out.append(
            f"`{fname}` (a notebook function the loop calls) "
            + (f"changes the global `{g}` ({how[0]})" if how else f"uses the global `{g}`")
        )
    return out


def render(plan: LoopPlan, opts: Options, ns: dict[str, Any]) -> str:
    """The table printed by ``%%threaded explain`` / ``%%parallel explain``."""
    where = "ipyparallel engines" if opts.magic == "parallel" else "a thread pool in the kernel"
    if opts.serial:
        where = "the kernel, one chunk at a time (serial)"
    travel = (
        "sent by value once per engine (cloudpickle)"
        if opts.magic == "parallel"
        else "shared with the kernel (threads)"
    )
    lines = [f"parloop {opts.magic}: the loop at line {plan.loop.lineno} runs on {where}."]
    first, last = plan.body_lines
    lines.append(f"  prologue: {len(plan.prologue)} statement(s), run in the kernel first")
    lines.append(f"  loop:     lines {first}-{last}, iterable evaluated in the kernel")
    lines.append(f"  epilogue: {len(plan.epilogue)} statement(s), run in the kernel after")
    if plan.is_async:
        if opts.magic == "parallel":
            lines.append("  the loop awaits: %%parallel cannot run it (use %%threaded)")
        else:
            lines[0] = (
                f"parloop {opts.magic}: the loop at line {plan.loop.lineno} awaits; "
                "each iteration runs as an asyncio task on parloop's own event loop "
                "(in a worker thread)."
            )
            lines.append(f"  tasks:    at most {1 if opts.serial else opts.tasks} at once")
    elif opts.magic == "threaded":
        t = (
            "auto (TC = N x (T1 + T2) / T1, measured on the first iterations)"
            if opts.threads is None
            else str(opts.threads)
        )
        lines.append(f"  threads:  {t}")
    lines.append(
        f"  chunksize: {'auto' if opts.chunksize is None else opts.chunksize}, "
        f"on_error: {opts.on_error}, seed: {opts.seed}"
    )
    lines.append("")
    roles = plan.roles()
    width = max([len(n) for n in roles] + [4])
    lines.append(f"  {'name':<{width}}  {'role':<15}  how")
    for name, role in roles.items():
        value = ns.get(name, None)
        kind = (
            f" [{_kind(value)}]"
            if name in ns and role in ("input", "root", "reduction", "call-root", "shared")
            else ""
        )
        if role == "call-root":
            runs_here = name in ns and is_plain_callable_root(value)
            call = (
                "its method calls run in the worker"
                if runs_here
                else "method calls on it are recorded and replayed in order in the kernel"
            )
            how = _HOW[role].format(call=call)
        else:
            how = _HOW[role].format(
                travel=travel, ops=", ".join(sorted(set(plan.reductions.get(name, []))))
            )
        lines.append(f"  {name:<{width}}  {role:<15}  {how}{kind}")
    if plan.break_lines:
        lines.append(
            f"  break at line(s) {', '.join(map(str, plan.break_lines))}: the "
            "breaking iteration is the last one committed; later work is discarded"
        )
    from .functions import notebook_functions
    from .namespace import plain_roots

    plain, stateful = plain_roots(plan.tree, ns)
    functions = notebook_functions(plan.loop.body, ns, plain, stateful)
    if functions:
        lines.append("")
        lines.append(
            "  notebook functions the loop calls (the workers run copies whose writes to "
            "notebook globals are logged and replayed in iteration order):"
        )
        for fp in functions.values():
            writes = ", ".join(f"`{g}`" for g in sorted(fp.writes())) or "nothing outside itself"
            lines.append(f"    {fp.name} (line {fp.fdef.lineno}): writes {writes}")
    hidden = hidden_state(plan, ns)
    if hidden:
        lines.append("")
        lines.append("  hidden state (changes the log cannot see):")
        lines.extend(f"    {h}" for h in hidden)
        where = (
            "on the engines around every chunk"
            if opts.magic == "parallel"
            else "around the first iteration, which runs in the kernel, and again while "
            "the threads run (a change then: they stop, the objects are put back)"
        )
        lines.append(
            f"  these are fingerprinted {where}; if one changes, the loop runs "
            "serially in the kernel from there (parloop.last_run.notes says why)"
        )
    return "\n".join(lines)
