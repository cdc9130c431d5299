"""Property-based differential test of the run-time dependence test.

Why this exists: the hand-written cases in ``test_differential.py`` and
``test_parallel.py`` each exercise one loop shape.  The run-time dependence
test (an iteration that reads an outside object written by an earlier
iteration is re-run in the kernel) and the forms that come with it (``break``,
``for ... else``, reductions written by rebinding, the argmax shape, privates
assigned on some paths only, ``del`` of a private) interact in ways no short
list of cases covers: a ``continue`` that depends on a set another iteration
fills, a ``break`` whose condition reads a dict, a private left over from the
last iteration that got that far, a reduction that stops at a ``break``...
Here Hypothesis builds small random loop cells from those forms, with keys
that collide across iterations on purpose (``i % 4``, ``(i * 3) % 5``,
``i + 1``...), and every cell must end, under ``%%threaded`` and under
``%%parallel``, with exactly the namespace and stdout of plain serial Python.

Every form generated here is meant to be supported: a ``LoopAnalysisError``
from the magic run fails the test (``helpers.differential`` asserts that the
magic run raised nothing), it is never accepted as "rejected, namespace
untouched".

Tests:

* ``test_generated_cells_run_serially``: the generator's own check; every cell
  runs under plain ``exec`` without an exception (no cluster, no parloop).
* ``test_analyse_accepts``: ``parloop.analysis.analyse`` does not raise on any
  generated cell (no cluster).
* ``test_threaded_matches_serial`` / ``test_parallel_matches_serial``: the
  differential check, ``chunksize`` drawn from 1..3; the latter starts the
  managed 2-engine cluster through the magic and stops it at the end of the
  module.

Budget: by default each differential test runs ``DEFAULT_EXAMPLES`` (40)
examples and each cheap check 300; the whole file must stay within about a
minute on a 2-core machine (a magic run of these cells takes milliseconds, the
cluster's start and stop a few seconds; a failure adds Hypothesis' shrinking).  The default run is
derandomized (the same examples every time) with no example database, so CI
is reproducible.  For a long exploratory run set ``PARLOOP_PROPERTY_EXAMPLES``:

    PARLOOP_PROPERTY_EXAMPLES=2000 .venv/bin/python -m pytest -q \\
        tests/test_dependence_property.py -p no:cacheprovider --timeout=0

which uses that many examples per differential test (and at least that many for
the cheap checks) and random examples (``--hypothesis-seed=N`` pins them).  A
failure prints the falsifying cell as source text (a Hypothesis note) together
with the setup and the magic line.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import textwrap
from dataclasses import dataclass
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from helpers import differential

# ------------------------------------------------------------------ budget

DEFAULT_EXAMPLES = 40
_ENV_EXAMPLES = os.environ.get("PARLOOP_PROPERTY_EXAMPLES", "").strip()
EXAMPLES = int(_ENV_EXAMPLES) if _ENV_EXAMPLES else DEFAULT_EXAMPLES
#: the cheap checks (no magic run) look at more cells
CHEAP_EXAMPLES = max(EXAMPLES, 300)


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=not _ENV_EXAMPLES,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )


# ------------------------------------------------------------------ the cells

N_MAX = 20
#: long enough for every list index below with i < N_MAX (``i + 1`` <= 20)
XS_LEN = 24
#: dict / set keys: collide across iterations (true cross-iteration dependences)
KEYS = ("i % 4", "(i * 3) % 5", "i % 2", "i // 3", "i", "i + 1")
#: list indices, all in range(XS_LEN) for 0 <= i < N_MAX + 1
INDICES = ("i % 4", "(i * 3) % 5", "i // 2", "(i + 3) % 6", "i", "i + 1")
#: conditions on the loop variable only (nesting)
I_CONDS = ("i % 2 == 0", "i % 3 == 1", "i > 6", "i < 9", "i % 4 != 3")

#: every name the cells can bind, rebind, mutate or delete; compared after the run
CHECKS = (
    "d",
    "xs",
    "s",
    "out",
    "w",
    "total",
    "acc",
    "m",
    "lo",
    "v",
    "best",
    "best_k",
    "tmp",
    "s_",
    "i",
    "finished",
    "LOGD",
)

#: forms whose name may appear in one statement only (reductions, argmax, the
#: conditional private): reading a reduction elsewhere would be a different
#: (unsupported) loop, and one use each keeps the cells readable
ONCE = frozenset({"total", "acc", "max", "min", "argmax", "cond_private"})

Lines = list[tuple[int, str]]  # (relative indentation level, text)


@dataclass(frozen=True)
class LoopCell:
    """A generated cell: ``setup`` binds every name in CHECKS but ``i``,
    ``tmp`` and ``s_`` (so serial never raises NameError); ``source`` is the
    loop (with its ``else`` when drawn)."""

    setup: str
    source: str


class _Body:
    """Draws the loop body: a block of 1-5 units, a unit being one of the
    forms below or an ``if <condition on i>:`` holding a nested block."""

    def __init__(self, draw: Callable, max_depth: int = 2) -> None:
        self.draw = draw
        self.used: set[str] = set()
        self.max_depth = max_depth

    def key(self) -> str:
        return self.draw(st.sampled_from(KEYS))

    def idx(self) -> str:
        return self.draw(st.sampled_from(INDICES))

    def forms(self, depth: int) -> list[str]:
        names = [
            "dict",
            "continue_set",
            "continue_i",
            "set_add",
            "list",
            "append",
            "print",
            "break",
            "del_tmp",
            "total",
            "acc",
            "max",
            "min",
            "argmax",
            "cond_private",
            "helper_log",
            "helper_xs",
        ]
        if depth < self.max_depth:
            names.append("if")
        return [f for f in names if f not in (ONCE & self.used)]

    def block(self, depth: int, lo: int, hi: int) -> Lines:
        n = self.draw(st.integers(lo, hi))
        units: list[Lines] = []
        for _ in range(n):
            units.extend(self.unit(depth))
        return [line for u in units for line in u]

    def unit(self, depth: int) -> list[Lines]:
        """One form; usually one unit, the conditional private gives two (its
        assignment and, later in the block, its read)."""
        form = self.draw(st.sampled_from(self.forms(depth)))
        if form in ONCE:
            self.used.add(form)
        k, k2, x, x2 = self.key(), self.key(), self.idx(), self.idx()
        if form == "dict":
            return [[(0, f"d[{k}] = d.get({k2}, 0) + i")]]
        if form == "continue_set":
            return [[(0, f"if {k} in s:"), (1, "continue")]]
        if form == "continue_i":
            return [[(0, "if i % 5 == 2:"), (1, "continue")]]
        if form == "set_add":
            return [[(0, f"s.add({k})")]]
        if form == "list":
            return [[(0, f"xs[{x}] = xs[{x2}] * 2 + i")]]
        if form == "append":
            return [[(0, f"out.append({k})")]]
        if form == "helper_log":
            # a notebook function that reads and writes a notebook global
            return [[(0, f"out.append(log_d({k}, i))")]]
        if form == "helper_xs":
            # a notebook function that writes an object the loop reads too
            return [[(0, f"bump_xs({x}, i)")]]
        if form == "print":
            text = self.draw(
                st.sampled_from(
                    (
                        f"print(i, {k})",
                        f"print('d', i, d.get({k}, 0))",
                        f"print('xs', i, xs[{x}])",
                        f"print('s', i, {k} in s)",
                    )
                )
            )
            return [[(0, text)]]
        if form == "break":
            cond = self.draw(
                st.sampled_from(
                    (
                        "i == 7",
                        "i > 12",
                        "i * i > 60",
                        f"{k} in s",
                        f"d.get({k}, 0) > 6",
                        f"xs[{x}] > 20",
                    )
                )
            )
            return [[(0, f"if {cond}:"), (1, "break")]]
        if form == "del_tmp":
            use = self.draw(
                st.sampled_from(
                    (
                        f"d[{k2}] = tmp",
                        "out.append(tmp)",
                        f"xs[{x}] = tmp + xs[{x2}]",
                        "print('tmp', tmp)",
                    )
                )
            )
            return [[(0, f"tmp = i * 2 + {_p(k)}"), (0, use), (0, "del tmp")]]
        if form == "total":
            return [[(0, self.draw(st.sampled_from(("total += i", f"total += {k}"))))]]
        if form == "acc":
            return [[(0, f"acc = acc + i * {_p(k)}")]]
        if form == "max":
            return [[(0, f"m = max(m, {_p(k)} * i)")]]
        if form == "min":
            return [[(0, f"lo = min({k}, lo)")]]
        if form == "argmax":
            expr = self.draw(
                st.sampled_from(
                    (
                        f"(i * 7) % 11 - {_p(k)}",
                        f"xs[{x}] - i",
                        f"d.get({k}, 0) * 2 - i",
                        "(i * 5) % 7",
                    )
                )
            )
            return [
                [(0, f"s_ = {expr}"), (0, "if s_ > best:"), (1, "best = s_"), (1, "best_k = i")]
            ]
        if form == "cond_private":
            cond = self.draw(st.sampled_from(("i % 3 == 0", "i % 2 == 1", "i > 4", f"{k} in s")))
            value = self.draw(st.sampled_from(("i", f"i * {_p(k)}", f"d.get({k2}, 0)")))
            read = self.draw(st.sampled_from(("w[i] = v", f"w[{k2}] = v + i", "out.append(v)")))
            # statements between the assignment and the read (they may hold a
            # continue or a break: then the read is skipped in that iteration)
            between = self.block(depth, 0, 2) if depth < self.max_depth else []
            return [[(0, f"if {cond}:"), (1, f"v = {value}")] + between, [(0, read)]]
        if form == "if":
            cond = self.draw(st.sampled_from(I_CONDS))
            inner = self.block(depth + 1, 1, 3)
            return [[(0, f"if {cond}:")] + [(lvl + 1, t) for lvl, t in inner]]
        raise AssertionError(form)


def _p(expr: str) -> str:
    """``expr`` as an operand of arithmetic: parenthesised unless a bare name."""
    return expr if expr.isidentifier() else f"({expr})"


def _render(lines: Lines, base: int) -> str:
    return "\n".join("    " * (base + lvl) + text for lvl, text in lines)


@st.composite
def loop_cells(draw: Callable) -> LoopCell:
    n = draw(st.integers(0, N_MAX))
    d0 = draw(st.sampled_from(("{}", "{0: 1, 3: 2}", "{1: 5, 2: 0, 4: 7}")))
    s0 = draw(st.sampled_from(("set()", "{1, 3}", "{0, 2, 4}")))
    xs0 = draw(st.sampled_from((f"[0] * {XS_LEN}", f"list(range({XS_LEN}))")))
    setup = textwrap.dedent(f"""\
        d = {d0}
        xs = {xs0}
        s = {s0}
        out = []
        w = {{}}
        total = 0
        acc = 0
        m = -1
        lo = 100
        v = -1
        best = -1
        best_k = -1
        finished = False
        LOGD = {{}}
        def log_d(k, i):
            LOGD[k] = LOGD.get(k, 0) + i
            return k
        def bump_xs(x, i):
            xs[x] = xs[x] + i""")
    body = _Body(draw).block(0, 1, 5)
    source = f"for i in range({n}):\n" + _render(body, 1)
    if draw(st.booleans()):
        tail = draw(
            st.sampled_from(
                (
                    [(0, "finished = True")],
                    [(0, "print('else', len(d), sorted(s))")],
                    [(0, "finished = True"), (0, "print('else', xs[:6], len(out))")],
                )
            )
        )
        source += "\nelse:\n" + _render(tail, 1)
    return LoopCell(setup=setup, source=source + "\n")


# ------------------------------------------------------------------ generator check


@_settings(CHEAP_EXAMPLES)
@given(cell=loop_cells())
def test_generated_cells_run_serially(cell: LoopCell) -> None:
    """The generator's own check: valid Python that plain exec runs without an
    exception (a failure here is a bug of this file, not of parloop)."""
    note(cell.source)
    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(cell.setup, "<setup>", "exec"), ns)
        exec(compile(cell.source, "<cell>", "exec"), ns)
    assert set(CHECKS) - {"i", "tmp", "s_"} <= set(ns)


# ------------------------------------------------------------------ analysis


@_settings(CHEAP_EXAMPLES)
@given(cell=loop_cells())
def test_analyse_accepts(cell: LoopCell) -> None:
    """Every generated form is supported: the static analysis accepts it."""
    from parloop.analysis import analyse

    note(cell.source)
    analyse(ast.parse(cell.source))


# ------------------------------------------------------------------ differential


def _check(ip, magic_line: str, cell: LoopCell) -> None:
    note(f"magic: {magic_line}\n--- setup ---\n{cell.setup}\n--- cell ---\n{cell.source}")
    # differential() asserts that the magic run raised nothing: a
    # LoopAnalysisError (a rejection) fails here like a wrong result does
    differential(ip, cell.setup, cell.source, magic_line, CHECKS)


@_settings(EXAMPLES)
@given(cell=loop_cells(), chunksize=st.integers(1, 3))
def test_threaded_matches_serial(ip, cell: LoopCell, chunksize: int) -> None:
    _check(ip, f"%%threaded threads=3 chunksize={chunksize} progress=off", cell)


# ``cluster`` (conftest.py): started before the first example, so that its
# start-up is not counted in one, and stopped at the end of the module
@pytest.mark.cluster
@_settings(EXAMPLES)
@given(cell=loop_cells(), chunksize=st.integers(1, 3))
def test_parallel_matches_serial(ip, cluster, cell: LoopCell, chunksize: int) -> None:
    _check(ip, f"%%parallel processes=2 chunksize={chunksize} progress=off", cell)
