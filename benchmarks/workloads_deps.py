"""Workloads of the run-time dependence test: loops whose iterations read an
outside object that an earlier iteration wrote.  parloop re-runs such
iterations in the kernel, and runs the rest of the loop serially there when
conflicts dominate.  Two ends of that range:

* ``memo``: a memo fill where 1 % of the keys repeat.  Conflicts are rare, so
  the loop should keep most of the speed-up of the same loop with no
  conflicts at all (goal: memo speed-up ÷ conflict-free speed-up ≥ 0.80).
* ``recurrence``: ``x[i + 1] = f(x[i])``, every iteration depends on the one
  before.  Nothing can run in parallel; the goal is that finding that out
  costs little (≤ 1.3 × serial).

Both must give the serial answer: every parloop run is checked against the
serial run's result, and a run that is rejected, raises or gives another
answer says so in the table (its time is ``nan`` when it did not finish) --
the workloads run before the dependence test exists, too."""

from __future__ import annotations

import contextlib
import io
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from . import work
from .harness import Result, Variant, measure, run_cell

#: iterations of the memo loop, and how many of them repeat an earlier key
MEMO_ITERATIONS, MEMO_REPEATS = 10_000, 100
#: iterations of the recurrence
RECURRENCE_ITERATIONS = 300
#: the memo workload's rounds at most: its serial loop alone takes ~10 s
MEMO_MAX_ROUNDS = 2

MEMO_CELL = """\
for i in range(len(keys)):
    k = keys[i]
    if k not in cache:
        cache[k] = slow(k)
    res[i] = cache[k]
"""

RECURRENCE_CELL = f"""\
for i in range({RECURRENCE_ITERATIONS}):
    x[i + 1] = step(x[i])
"""

PARALLEL = "%%parallel processes=2 progress=off\n"
THREADED = "%%threaded progress=off\n"


_SPIN_1MS: list[int] = []


def _spin_1ms() -> int:
    """The n for which ``work.spin(n)`` takes ~1 ms here, measured once per
    process (both workloads do the same work per iteration).  The largest of
    five short probes: the one the other processes on this shared machine
    disturbed least.  ``work.SPIN`` (W1's ~60 ms) is left as it was."""
    if not _SPIN_1MS:
        saved = work.SPIN
        try:
            _SPIN_1MS.append(max(work.calibrate(0.001) for _ in range(5)))
        finally:
            work.SPIN = saved
    return _SPIN_1MS[0]


def _define(ip, n: int) -> None:
    """``spin`` and the two ~1 ms bodies as notebook cells define them: functions
    of the shell's namespace travel to the engines by value, with the globals
    they read (``spin``, ``SPIN_1MS``)."""
    run_cell(
        ip,
        work.CPU_SOURCE
        + f'''
SPIN_1MS = {n}

def slow(k):
    """~1 ms, then a value that depends on k only (a pure function: a memo
    filled twice for one key holds the same value)."""
    return (k * 7919 + spin(SPIN_1MS)) % 1000003

def step(v):
    """~1 ms, then the next term of the recurrence."""
    spin(SPIN_1MS)
    return v * 1.0001 + 1
''',
    )


def _warm(ip) -> None:
    """Engines started and warm, so no variant pays for the cluster's start."""
    ip.run_cell("out = {}", store_history=False)
    run_cell(ip, PARALLEL + "for i in range(2):\n    out[i] = i")


def _count(run: Any, name: str) -> int | None:
    """The size of ``parloop.last_run.<name>`` (a list of iterations, or a
    number), None where the record has no such field yet."""
    value = getattr(run, name, None)
    if value is None:
        return None
    try:
        return len(value)
    except TypeError:
        return int(value)


def _diff(got: Any, want: Any) -> str:
    """Where a list or dict differs from the serial one ('' where equal)."""
    if got == want:
        return ""
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        return f"{len(bad)} of {len(want)} items differ, the first at [{bad[0]}]"
    if isinstance(got, dict) and isinstance(want, dict):
        missing = len(want.keys() - got.keys())
        extra = len(got.keys() - want.keys())
        changed = sum(1 for k in want.keys() & got.keys() if got[k] != want[k])
        return f"{missing} keys missing, {extra} extra, {changed} values differ"
    return f"{type(got).__name__} of {len(got)} items, not {len(want)}"


def _n(k: int) -> str:
    """10 000, as the other tables write their counts."""
    return f"{k:,}".replace(",", " ")


def _first_line(text: str, width: int = 90) -> str:
    """One line of a message, short enough for a table cell, no pipes."""
    line = (text.splitlines() or [""])[0].replace("|", "/")
    return line if len(line) <= width else line[: width - 1] + "…"


@dataclass
class Checked:
    """A parloop variant whose every run is checked against the serial run.

    ``reset`` (not timed) puts the loop's inputs and outputs back as they were
    before the loop; ``check`` returns '' when the outputs equal the serial
    ones, else what differs.  A run that raises (LoopAnalysisError: rejected;
    anything else: failed) is timed as ``nan``, and the suite goes on.  The
    magic's output -- a traceback, parloop's report -- is swallowed: the table
    is what the benchmark prints."""

    ip: Any
    cell: str
    reset: str
    check: Callable[[], str]
    #: outcome of each run: '' (serial answer), or what went wrong
    outcomes: list[str] = field(default_factory=list)
    #: counts of ``last_run.reruns`` and ``last_run.conflicts`` after each run
    reruns: list[int | None] = field(default_factory=list)
    conflicts: list[int | None] = field(default_factory=list)

    def run(self) -> float:
        import parloop
        from parloop import LoopAnalysisError

        run_cell(self.ip, self.reset)
        parloop.last_run = None
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                dt = run_cell(self.ip, self.cell)
        except LoopAnalysisError as e:
            dt, outcome = math.nan, f"rejected (LoopAnalysisError: {_first_line(str(e))})"
        except Exception as e:  # noqa: BLE001 - today's parloop may raise anything here
            notes = [n for n in getattr(e, "__notes__", []) if n]
            where = f"; {_first_line(notes[0])}" if notes else ""
            dt = math.nan
            outcome = f"failed ({type(e).__name__}: {_first_line(str(e))}{where})"
        else:
            diff = self.check()
            outcome = f"wrong answer: {diff}" if diff else ""
        self.outcomes.append(outcome)
        self.reruns.append(_count(parloop.last_run, "reruns"))
        self.conflicts.append(_count(parloop.last_run, "conflicts"))
        return dt

    @property
    def correct(self) -> bool:
        return bool(self.outcomes) and not any(self.outcomes)

    def note(self, equal: str) -> str:
        """The table's note: ``equal`` when every run gave the serial answer,
        else each distinct problem once."""
        if self.correct:
            return equal
        seen = list(dict.fromkeys(o for o in self.outcomes if o))
        return "**" + "; ".join(seen) + "**"

    def counts(self) -> str:
        """reruns and conflicts of the last run, as far as the record has them."""

        def one(name: str, values: list[int | None]) -> str:
            v = values[-1] if values else None
            return f"{name} n/a (no `last_run.{name}`)" if v is None else f"{v} {name}"

        return one("reruns", self.reruns) + ", " + one("conflicts", self.conflicts)


def _memo_keys() -> tuple[list[int], list[int]]:
    """(keys with 1 % repeats, all keys distinct), shuffled with a fixed seed:
    9 900 distinct keys plus 100 of them again; the conflict-free loop has
    10 000 distinct keys, so its work differs by the 100 memo hits only."""
    rng = random.Random(20240601)
    distinct = MEMO_ITERATIONS - MEMO_REPEATS
    keys = list(range(distinct)) + rng.sample(range(distinct), MEMO_REPEATS)
    rng.shuffle(keys)
    free = list(range(MEMO_ITERATIONS))
    rng.shuffle(free)
    return keys, free


def memo(ip, rounds: int) -> Result:
    """A memo fill, 10 000 × ~1 ms, 1 % of the keys repeating: rare conflicts
    must not cost much of the speed-up.  Against the same loop with all keys
    distinct (no conflict, the speed-up to keep), each timed against its own
    serial loop.  At most ``MEMO_MAX_ROUNDS`` rounds (~30 s a round)."""
    n = _spin_1ms()
    _define(ip, n)
    keys, free = _memo_keys()
    ip.push({"MEMO_KEYS": keys, "FREE_KEYS": free}, interactive=False)
    _warm(ip)
    serial_out: dict[str, tuple[list, dict]] = {}

    def reset(which: str) -> str:
        return f"keys = {which}\ncache = {{}}\nres = [None] * len(keys)"

    def serial(which: str):
        def run() -> float:
            run_cell(ip, reset(which))
            dt = run_cell(ip, MEMO_CELL)
            serial_out[which] = (list(ip.user_ns["res"]), dict(ip.user_ns["cache"]))
            return dt

        return run

    def check(which: str) -> Callable[[], str]:
        def run() -> str:
            # the serial variant runs first in every round
            want_res, want_cache = serial_out[which]
            problems = [
                f"{name}: {d}"
                for name, d in (
                    ("res", _diff(ip.user_ns["res"], want_res)),
                    ("cache", _diff(ip.user_ns["cache"], want_cache)),
                )
                if d
            ]
            return "; ".join(problems)

        return run

    par_memo = Checked(ip, PARALLEL + MEMO_CELL, reset("MEMO_KEYS"), check("MEMO_KEYS"))
    par_free = Checked(ip, PARALLEL + MEMO_CELL, reset("FREE_KEYS"), check("FREE_KEYS"))
    variants = [
        Variant(
            "serial",
            serial("MEMO_KEYS"),
            note=f"{_n(MEMO_ITERATIONS - MEMO_REPEATS)} slow() calls, {MEMO_REPEATS} memo hits",
        ),
        Variant("%%parallel processes=2", par_memo.run, True),
        Variant(
            "serial, all keys distinct",
            serial("FREE_KEYS"),
            note=f"{_n(MEMO_ITERATIONS)} slow() calls",
        ),
        Variant("%%parallel processes=2, all keys distinct", par_free.run, True),
    ]
    res = measure(
        f"Memo fill: {_n(MEMO_ITERATIONS)} × ~1 ms (spin({n})), {MEMO_REPEATS} repeated keys",
        variants,
        max(1, min(rounds, MEMO_MAX_ROUNDS)),
    )
    res.notes["%%parallel processes=2"] = par_memo.note("res and cache equal serial")
    res.notes["%%parallel processes=2, all keys distinct"] = par_free.note(
        "res and cache equal serial"
    )

    med = {k: statistics.median(v) for k, v in res.rows.items()}
    s_memo = med["serial"] / med["%%parallel processes=2"]
    s_free = med["serial, all keys distinct"] / med["%%parallel processes=2, all keys distinct"]
    ratio = s_memo / s_free
    if not par_memo.correct or not par_free.correct:
        verdict = "not met: a parloop run did not give the serial answer"
    else:
        verdict = "met" if ratio >= 0.80 else "not met"
    res.extra.append(
        f"\nSpeed-up over its own serial loop: memo {s_memo:.2f}×, all keys distinct "
        f"{s_free:.2f}×; memo ÷ conflict-free = {ratio:.3f} (goal ≥ 0.80: {verdict}).  "
        f"The memo run's `parloop.last_run`: {par_memo.counts()}; "
        f"the conflict-free run's: {par_free.counts()}."
    )
    return res


def recurrence(ip, rounds: int) -> Result:
    """``x[i + 1] = step(x[i])``, 300 × ~1 ms: every iteration depends on the
    one before, so no parallel speed-up exists; what is measured is what the
    magics cost on top of the serial loop while finding that out."""
    n = _spin_1ms()
    _define(ip, n)
    _warm(ip)
    reset = f"x = [0.0] * {RECURRENCE_ITERATIONS + 1}\nx[0] = 1.0"
    serial_x: list[list[float]] = []

    def serial() -> float:
        run_cell(ip, reset)
        dt = run_cell(ip, RECURRENCE_CELL)
        serial_x[:] = [list(ip.user_ns["x"])]
        return dt

    def check() -> str:
        # the serial variant runs first in every round
        return _diff(ip.user_ns["x"], serial_x[0])

    par = Checked(ip, PARALLEL + RECURRENCE_CELL, reset, check)
    thr = Checked(ip, THREADED + RECURRENCE_CELL, reset, check)
    variants = [
        Variant("serial", serial),
        Variant("%%parallel processes=2", par.run, True),
        Variant("%%threaded", thr.run, True),
    ]
    res = measure(
        f"Recurrence: x[i + 1] = step(x[i]), {RECURRENCE_ITERATIONS} × ~1 ms (spin({n}))",
        variants,
        rounds,
    )
    res.notes["%%parallel processes=2"] = par.note("x equals serial")
    res.notes["%%threaded"] = thr.note("x equals serial")

    med = {k: statistics.median(v) for k, v in res.rows.items()}

    def verdict(name: str, c: Checked) -> str:
        times = med[name] / med["serial"]
        ok = "met" if c.correct and times <= 1.3 else "not met"
        why = "" if c.correct else ", not the serial answer"
        return f"{name} {times:.2f}× serial ({ok}{why}; {c.counts()})"

    res.extra.append(
        "\nGoal ≤ 1.3× serial with x equal to serial's: "
        + "; ".join([verdict("%%parallel processes=2", par), verdict("%%threaded", thr)])
        + "."
    )
    return res
