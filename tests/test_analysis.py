"""Static analysis (docs/design.md §3): roles of names in accepted loops, and the
rejections, each a LoopAnalysisError naming the line and the variable."""

from __future__ import annotations

import ast
import textwrap

import pytest

import parloop
from parloop.analysis import analyse


def plan_of(src: str):
    return analyse(ast.parse(textwrap.dedent(src)))


# (id, source, expected roles (subset, name -> role), extra expectations)
ACCEPTED = [
    (
        "everything",
        """
        for i, row in enumerate(rows):
            row['x'] = f(i)
            y = i * 2
            out[i] = y
            total += y
            log.append(y)
            time.sleep(0)
        """,
        {
            "i": "target",
            "row": "target-mutation",
            "y": "private",
            "f": "input",
            "out": "root",
            "total": "reduction",
            "log": "call-root",
            "time": "call-root",
        },
        {"reductions": {"total": ["+="]}, "private": {"y"}, "inputs": {"f"}},
    ),
    (
        "plain_target",
        """
        for x in xs:
            out[x] = x
        """,
        {"x": "target", "out": "root"},
        {"private": set(), "inputs": set()},
    ),
    (
        "reduction_ops",
        """
        for x in xs:
            a += x
            b -= x
            c *= x
            d |= x
            e ^= x
        """,
        {k: "reduction" for k in "abcde"},
        {"reductions": {"a": ["+="], "b": ["-="], "c": ["*="], "d": ["|="], "e": ["^="]}},
    ),
    (
        "str_and_list_reduction",
        """
        for x in xs:
            s += str(x)
            acc += [x]
        """,
        {"s": "reduction", "acc": "reduction"},
        {},
    ),
    (
        "index_augassign_is_root",
        """
        for x in xs:
            counts[x % 3] += 1
        """,
        {"counts": "root", "x": "target"},
        {"reductions": {}},
    ),
    (
        "attr_set_and_augassign",
        """
        for x in xs:
            box.last = x
            box.total += x
        """,
        {"box": "root"},
        {},
    ),
    (
        "del_subscript",
        """
        for k in keys:
            del d[k]
        """,
        {"d": "root", "k": "target"},
        {},
    ),
    (
        "nested_index_and_numpy_slice",
        """
        for a in range(5):
            grid[a][0] = a
            arr[a, :] = a
        """,
        {"grid": "root", "arr": "root", "a": "target"},
        {"inputs": set()},
    ),  # the iterable is evaluated in the kernel, not an input
    (
        "setdefault_chain",
        """
        for i in range(9):
            groups.setdefault(i % 4, []).append(i)
        """,
        {"groups": "call-root"},
        {},
    ),
    (
        "root_also_read_is_input",
        """
        for x in xs:
            out[x] = len(out)
        """,
        {"out": "shared"},
        {"inputs": {"out", "len"}},
    ),
    (
        "break_in_nested_loop",
        """
        for i in range(3):
            found = -1
            for j in range(10):
                if j * i > 4:
                    found = j
                    break
            out[i] = found
        """,
        {"found": "private", "j": "private", "out": "root"},
        {},
    ),
    (
        "continue_then_else_read",
        """
        for x in xs:
            if x < 0:
                continue
            else:
                y = x
            out[x] = y
        """,
        {"y": "private", "x": "target"},
        {},
    ),
    (
        "try_except_both_assign",
        """
        for x in xs:
            try:
                y = 1 / x
            except ZeroDivisionError:
                y = 0
            out[x] = y
        """,
        {"y": "private", "ZeroDivisionError": "input"},
        {},
    ),
    (
        "walrus_same_expression",
        """
        for x in xs:
            out[x] = [m := x * 2, m + 1]
        """,
        {"m": "private"},
        {},
    ),
    (
        "walrus_in_comprehension_binds_outer",
        """
        for x in xs:
            ys = [y for v in range(x) if (y := v * 2) > 3]
            out[x] = ys
        """,
        {"ys": "private", "y": "private"},
        {},
    ),
    (
        "assigned_then_conditionally_reassigned",
        """
        for x in xs:
            v = x
            if x % 2:
                v = -x
            out[x] = v
        """,
        {"v": "private"},
        {},
    ),
    (
        "comprehension_variable_not_private",
        """
        for x in xs:
            out[x] = [k * k for k in range(x)]
        """,
        {"x": "target", "out": "root"},
        {"private": set()},
    ),
    (
        "function_in_body",
        """
        for x in xs:
            def g(y):
                return y + x
            out[x] = g(1)
        """,
        {"g": "private", "out": "root"},
        {},
    ),
    (
        "import_in_body",
        """
        for x in xs:
            import math
            out[x] = math.sqrt(x)
        """,
        {"math": "private"},
        {},
    ),
    (
        "starred_target",
        """
        for a, *rest in rows:
            out[a] = rest
        """,
        {"a": "target", "rest": "target"},
        {},
    ),
    (
        "with_block",
        """
        for x in xs:
            with open(p) as fh:
                out[x] = fh.read()
        """,
        {"fh": "private", "open": "input", "p": "input"},
        {},
    ),
    (
        "for_else_is_epilogue",
        """
        for x in xs:
            out[x] = x
        else:
            done = True
        """,
        {"x": "target"},
        {},
    ),
    (
        "walrus_in_if_test",
        """
        for x in xs:
            if (m := f(x)) > 3:
                big[x] = m
        """,
        {"m": "private", "big": "root"},
        {},
    ),
    (
        "walrus_in_while_test",
        """
        for x in xs:
            n = x
            while (h := n // 2) > 1:
                n = h
            out[x] = h
        """,
        {"h": "private", "n": "private"},
        {},
    ),
]


@pytest.mark.parametrize("name,src,roles,extra", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted(name, src, roles, extra):
    plan = plan_of(src)
    got = plan.roles()
    for n, role in roles.items():
        assert got.get(n) == role, f"{n}: {got.get(n)} != {role} (roles: {got})"
    if "reductions" in extra:
        assert plan.reductions == extra["reductions"]
    if "private" in extra:
        assert plan.private == extra["private"]
    if "inputs" in extra:
        assert set(extra["inputs"]) <= plan.inputs
        if not extra["inputs"]:
            assert plan.inputs == set()


def test_split_prologue_loop_epilogue():
    plan = plan_of("""
        a = 1
        b = 2
        for i in range(3):
            out[i] = a
        c = 3
        c
        """)
    assert len(plan.prologue) == 2 and len(plan.epilogue) == 2
    assert isinstance(plan.loop, ast.For) and plan.loop.lineno == 4
    assert plan.targets == ["i"]


def test_first_top_level_for_is_the_loop():
    plan = plan_of("""
        for i in range(3):
            out[i] = i
        for j in range(3):
            other[j] = j
        """)
    assert plan.targets == ["i"]
    assert len(plan.epilogue) == 1


# (id, source, words the message must contain)
REJECTED = [
    (
        "return",
        """
        for i in range(3):
            return i
        """,
        ["return", "line 3"],
    ),
    (
        "yield",
        """
        for i in range(3):
            out[i] = yield i
        """,
        ["yield", "line 3"],
    ),
    (
        "global",
        """
        for i in range(3):
            global counter
            counter = i
        """,
        ["counter", "line 3"],
    ),
    (
        "nonlocal",
        """
        for i in range(3):
            nonlocal x
        """,
        ["x", "line 3"],
    ),
    (
        "loop_carried_prev",
        """
        prev = None
        for x in xs:
            out[x] = prev
            prev = x
        """,
        ["prev", "line 4"],
    ),
    (
        "read_reduction",
        """
        for x in xs:
            total += x
            y = total
        """,
        ["total", "line 4"],
    ),
    (
        "read_reduction_in_condition",
        """
        for x in xs:
            if total > 10:
                out[x] = 1
            total += x
        """,
        ["total", "line 3"],
    ),
    (
        "augassign_private_before_assign",
        """
        for x in xs:
            acc += x
            acc = 0
        """,
        ["acc", "line 3"],
    ),
    (
        "mutating_call_in_expression",
        """
        for x in xs:
            y = out.pop()
        """,
        ["out", "line 3"],
    ),
    (
        "mutating_call_in_argument",
        """
        for x in xs:
            res[x] = len(out.append(x) or out)
        """,
        ["out", "line 3"],
    ),
    (
        "nested_function_writes_outside",
        """
        for x in xs:
            def put(k, v):
                out[k] = v
            put(x, x)
        """,
        ["out", "line 4"],
    ),
    (
        "lambda_mutates_outside",
        """
        for x in xs:
            f = lambda: out.pop()
        """,
        ["out", "line 3"],
    ),
    (
        "no_top_level_for",
        """
        i = 0
        while i < 3:
            i += 1
        """,
        ["for", "line 2"],
    ),
    ("empty_cell", "", ["for"]),
    (
        "subscript_loop_target",
        """
        for out[i] in xs:
            pass
        """,
        ["out", "line 2"],
    ),
    (
        "attribute_loop_target",
        """
        for obj.attr in xs:
            pass
        """,
        ["obj", "line 2"],
    ),
]


@pytest.mark.parametrize(
    "src",
    [
        "for x in xs:\n    await asyncio.sleep(0)\n    out[x] = x\n",
        "async for x in agen():\n    out[x] = x\n",
        "for x in xs:\n    async with lock:\n        out[x] = x\n",
    ],
)
def test_awaiting_loops_are_marked_async(src):
    """The analysis accepts loops that await and marks them; the magic decides
    (%%threaded runs them as asyncio tasks, %%parallel rejects them)."""
    plan = analyse(ast.parse(src))
    assert plan.is_async
    assert plan.roles()["out"] == "root"


def test_plain_loop_is_not_async():
    assert not analyse(ast.parse("for x in xs:\n    out[x] = x\n")).is_async


@pytest.mark.parametrize("name,src,words", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected(name, src, words):
    with pytest.raises(parloop.LoopAnalysisError) as ei:
        plan_of(src)
    err = ei.value
    assert isinstance(err, ValueError)
    msg = str(err)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_rejection_carries_name_and_line():
    with pytest.raises(parloop.LoopAnalysisError) as ei:
        plan_of("""
            prev = 0
            for x in xs:
                d = x - prev
                prev = x
            """)
    assert ei.value.name == "prev"
    assert ei.value.lineno == 4


def test_analysis_error_is_value_error():
    assert issubclass(parloop.LoopAnalysisError, ValueError)


@pytest.mark.parametrize(
    "src, words",
    [
        # a closure stored outside the iteration would see its own iteration's `i`,
        # serial Python the last one (late binding)
        ("for i in range(10):\n    fns.append(lambda: i)\n", ["late binding", "`i`", "line 2"]),
        (
            "for i in range(10):\n    def g():\n        return i\n    fns.append(g)\n",
            ["late binding", "`i`"],
        ),
        # a seed set in the middle of the iteration: draws before it continue
        # the previous iteration's stream
        ("for i in range(3):\n    x = random.random()\n    random.seed(i)\n", ["seed", "line 3"]),
        # a mutating method inside an expression on an object (not a module)
        ("for i in range(3):\n    y = out.pop()\n", ["`out`", "private=out"]),
    ],
)
def test_rejected_on_purpose(src, words):
    with pytest.raises(parloop.LoopAnalysisError) as e:
        analyse(ast.parse(src))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize(
    "src",
    [
        "for i in range(10):\n    fns.append(lambda i=i: i)\n",  # bound now: fine
        "for i in range(4):\n    key = lambda r: (r - i) ** 2\n    res[i] = sorted(v, key=key)\n",
        "for i in range(3):\n    rev[len(rev) - 1 - i] = i\n",  # read in its own write
        "for i in range(3):\n    n = len(out)\n    out.append(i)\n",  # read before the write
    ],
)
def test_accepted_near_misses(src):
    analyse(ast.parse(src))


# (source, what the plan must say): loops the dependence machinery accepts
DEPENDENT = [
    ("for i in range(3):\n    if i:\n        break\n", lambda p: p.break_lines == [3]),
    (
        "for i in range(3):\n    for j in range(2):\n        break\n    out[i] = j\n",
        lambda p: p.break_lines == [],
    ),
    (
        "for x in xs:\n    if x > 0:\n        pos = x\n    out[x] = pos\n",
        lambda p: set(p.checked) == {"pos"},
    ),
    ("for x in xs:\n    tmp = x\n    del tmp\n", lambda p: p.deleted == {"tmp"}),
    ("for i in range(3):\n    out[0] = i\n    print(out[0])\n", lambda p: p.read_roots == {"out"}),
    (
        "for i in range(3):\n    out.append(i)\n    n = len(out)\n",
        lambda p: p.read_roots == {"out"},
    ),
    (
        "for v in vs:\n    m = max(m, v)\n    lo = min(v, lo)\n    a = a - v\n    s = v + s\n",
        lambda p: p.reductions == {"m": ["max"], "lo": ["rmin"], "a": ["-"], "s": ["r+"]},
    ),
    (
        "for k, s in enumerate(ss):\n    if s >= best:\n        best = s\n        bk = k\n",
        lambda p: (
            [(g.compared, g.cmp, g.names) for g in p.groups] == [("best", ">=", ["best", "bk"])]
        ),
    ),
    (
        "for k, s in enumerate(ss):\n    if best > s:\n        best = s\n        bk = k\n",
        lambda p: [(g.compared, g.cmp) for g in p.groups] == [("best", "<")],
    ),
    (
        "for i in range(3):\n    np.random.seed(i)\n    out[i] = np.random.rand()\n",
        lambda p: p.body_seeds,
    ),
]


@pytest.mark.parametrize("src, check", DEPENDENT)
def test_dependence_plan(src, check):
    plan = analyse(ast.parse(src), plain_roots=frozenset({"np", "random"}))
    assert check(plan), plan


def test_module_calls_are_not_writes():
    """``np.sort(a)`` in an expression is a call through a module, not a
    mutating list method on ``np``; without the module known it is rejected."""
    src = "for j in range(3):\n    out[j] = np.sort(K[j])[0]\n"
    plan = analyse(ast.parse(src), plain_roots=frozenset({"np"}))
    assert plan.roles()["np"] == "input"
    with pytest.raises(parloop.LoopAnalysisError):
        analyse(ast.parse(src))


def test_argmax_needs_the_same_expression():
    """``if s > best: best = other`` is not the argmax shape (best would not
    move one way): `best` stays a checked private or a rejection, never a group."""
    src = "for s in ss:\n    if s > best:\n        best = s * 2\n"
    try:
        plan = analyse(ast.parse(src))
    except parloop.LoopAnalysisError:
        return
    assert not plan.groups
