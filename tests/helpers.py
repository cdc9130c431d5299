"""Test helpers: run a cell with captured stdout, strict snapshots of
namespace expressions, and the serial-vs-magic differential check."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import sys
import tempfile
import time
from typing import Any, Iterable

__all__ = [
    "run_cell",
    "run_cell_result",
    "reset",
    "snapshot",
    "materialize",
    "deep_diff",
    "differential",
]


def run_cell_result(ip, code: str):
    """Run ``code``; return (stdout, ExecutionResult)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = ip.run_cell(code, store_history=False)
    return buf.getvalue(), res


def run_cell(ip, code: str):
    """Run ``code``; return (stdout, exception or None)."""
    out, res = run_cell_result(ip, code)
    return out, (res.error_before_exec or res.error_in_exec)


def reset(ip) -> None:
    """``%reset -f``, without its two full ``gc.collect()`` passes (50 ms each
    once numpy and pandas are loaded; they change nothing the tests look at)."""
    import gc

    collect = gc.collect
    gc.collect = lambda *a, **k: 0
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ip.run_line_magic("reset", "-f")
    finally:
        gc.collect = collect


def snapshot(ip, exprs: Iterable[str]) -> list[tuple[str, Any]]:
    """Evaluate and pickle each expression at once (later mutation cannot
    change the snapshot); an unbound name is the state ("raised", "NameError")."""
    snap = []
    for expr in exprs:
        try:
            v = eval(expr, ip.user_ns)
        except BaseException as e:  # noqa: BLE001
            snap.append(("raised", type(e).__name__))
            continue
        snap.append(("value", pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL)))
    return snap


def materialize(snap):
    return [(k, pickle.loads(v)) if k == "value" else (k, v) for k, v in snap]


def _has_own_eq(obj: Any) -> bool:
    return type(obj).__eq__ is not object.__eq__


def deep_diff(a: Any, b: Any, path: str = "", depth: int = 0) -> str | None:
    """None when a and b are equal in the strict sense (same types, dict
    order, bit-identical floats, numpy dtype/shape, pandas .equals), else a
    description of the first difference."""
    if depth > 60:
        return None if a == b else f"{path}: differ"
    if type(a) is not type(b):
        return f"{path}: type {type(a).__name__} != {type(b).__name__} ({a!r:.60} vs {b!r:.60})"
    np = sys.modules.get("numpy")
    if np is not None and isinstance(a, np.ndarray):
        if a.dtype != b.dtype:
            return f"{path}: dtype {a.dtype} != {b.dtype}"
        if a.shape != b.shape:
            return f"{path}: shape {a.shape} != {b.shape}"
        if not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
            return f"{path}: arrays differ"
        return None
    if np is not None and isinstance(a, np.generic):
        if a.dtype != b.dtype or not (a == b or (a != a and b != b)):
            return f"{path}: {a!r} != {b!r}"
        return None
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(a, (pd.DataFrame, pd.Series, pd.Index)):
        if not a.equals(b):
            return f"{path}: pandas objects differ"
        if isinstance(a, pd.Series) and a.name != b.name:
            return f"{path}: Series name {a.name!r} != {b.name!r}"
        if not isinstance(a, pd.Index) and not a.index.equals(b.index):
            return f"{path}: index differs"
        return None
    if isinstance(a, float):
        if a != a and b != b:
            return None
        return None if a.hex() == b.hex() else f"{path}: {a!r} != {b!r} (not bit-identical)"
    if isinstance(a, complex):
        same = (a.real.hex(), a.imag.hex()) == (b.real.hex(), b.imag.hex())
        return None if same else f"{path}: {a!r} != {b!r}"
    if isinstance(a, dict):
        ka, kb = list(a), list(b)
        if ka != kb:
            return f"{path}: keys/order {ka!r:.100} != {kb!r:.100}"
        if getattr(a, "default_factory", None) != getattr(b, "default_factory", None):
            return f"{path}: default_factory differs"
        for k in ka:
            d = deep_diff(a[k], b[k], f"{path}[{k!r}]", depth + 1)
            if d:
                return d
        if type(a) is not dict and hasattr(a, "__dict__"):
            return deep_diff(vars(a), vars(b), path + ".__dict__", depth + 1)
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = deep_diff(x, y, f"{path}[{i}]", depth + 1)
            if d:
                return d
        if type(a) not in (list, tuple) and hasattr(a, "__dict__"):
            return deep_diff(vars(a), vars(b), path + ".__dict__", depth + 1)
        return None
    if isinstance(a, (set, frozenset)):
        return None if a == b else f"{path}: sets differ: {sorted(map(repr, a ^ b))!r:.100}"
    if isinstance(a, (str, bytes, int, bool, type(None))):
        return None if a == b else f"{path}: {a!r:.80} != {b!r:.80}"
    if not _has_own_eq(a):
        if hasattr(a, "__dict__") or hasattr(b, "__dict__"):
            return deep_diff(
                getattr(a, "__dict__", None),
                getattr(b, "__dict__", None),
                path + ".__dict__",
                depth + 1,
            )
        slots = [s for k in type(a).__mro__ for s in getattr(k, "__slots__", ())]
        if slots:
            return deep_diff(
                [getattr(a, s, None) for s in slots],
                [getattr(b, s, None) for s in slots],
                path + ".__slots__",
                depth + 1,
            )
        return None
    try:
        return None if a == b else f"{path}: {a!r:.80} != {b!r:.80}"
    except Exception as e:  # noqa: BLE001
        return f"{path}: comparison raised {e!r}"


def _run_variant(ip, setup: str, cell: str):
    reset(ip)
    if setup:
        out, err = run_cell(ip, setup)
        assert err is None, f"setup raised {err!r}"
    out, res = run_cell_result(ip, cell)
    return out, res


def differential(
    ip,
    setup: str,
    cell: str,
    magic_line: str,
    checks: Iterable[str],
    *,
    compare_result: bool = True,
):
    """Run ``setup`` then ``cell`` serially after ``%reset -f``, snapshot
    ``checks``; then the same with ``magic_line`` on top of the cell.  Assert
    that neither raised, that the checks are strictly equal, that stdout is the
    same string and (compare_result) that the cell's displayed value is equal.
    Returns (serial values, magic values) as materialised lists."""
    checks = list(checks)
    s_out, s_res = _run_variant(ip, setup, cell)
    s_err = s_res.error_before_exec or s_res.error_in_exec
    assert s_err is None, f"test broken: serial run raised {s_err!r}"
    s_snap = snapshot(ip, checks)
    s_result = pickle.dumps(s_res.result) if compare_result else None

    m_out, m_res = _run_variant(ip, setup, magic_line + "\n" + cell)
    m_err = m_res.error_before_exec or m_res.error_in_exec
    assert m_err is None, f"magic run raised {type(m_err).__name__}: {m_err}"
    m_snap = snapshot(ip, checks)
    m_result = pickle.dumps(m_res.result) if compare_result else None

    serial, magic = materialize(s_snap), materialize(m_snap)
    for expr, (sk, sv), (mk, mv) in zip(checks, serial, magic):
        assert sk == mk, f"{expr}: serial {sk} {sv!r:.80}, magic {mk} {mv!r:.80}"
        if sk == "value":
            d = deep_diff(sv, mv, expr)
            assert d is None, d
        else:
            assert sv == mv, f"{expr}: serial raised {sv}, magic raised {mv}"
    assert m_out == s_out, f"stdout differs:\nserial: {s_out!r:.300}\nmagic:  {m_out!r:.300}"
    if compare_result:
        d = deep_diff(pickle.loads(s_result), pickle.loads(m_result), "result")
        assert d is None, d
    return serial, magic


def alive(pid: int) -> bool:
    """The process runs (a zombie counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids, timeout: float = 10.0) -> list[int]:
    """Wait until the processes are gone; return those still alive."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not [p for p in pids if alive(p)]:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


class LiveSpy:
    """A live view that records, at every update, each worker's row
    ``{name: (iterations shown done, iterations done in its running chunk,
    the iteration it is on)}`` (the live view's inputs, no rendering).

    With ``gate`` (a folder) and ``size`` (the chunk size), every reading of
    a worker part-way through chunk k also creates the file ``seen-k`` there:
    what :func:`run_live_mid_chunk`'s loop waits for."""

    wants_live = True

    def __init__(self, gate: str | None = None, size: int = 0):
        self.rows: list[dict[str, tuple[int, int, int | None]]] = []
        self.gate, self.size = gate, size
        self.notes: list[str] = []

    def start(self, record, live) -> None: ...

    def close(self, record, live) -> None:
        self.notes = list(record.notes)

    def update(self, record, live) -> None:
        row = {k: (w.shown_done, w.partial, w.current) for k, w in live.workers.items()}
        self.rows.append(row)
        if self.gate is None:
            return
        for _, partial, current in row.values():
            if 0 < partial < self.size and current is not None:
                open(os.path.join(self.gate, f"seen-{current // self.size}"), "a").close()


def engine_call(keys, fname, *args):
    """On an engine: resolve a broadcast's inputs, call one of them, send the
    result back with transport.dumps() (travels by value: engines cannot
    import the tests)."""
    from parloop.backends.engines import transport, worker

    ns = worker.engine_resolve(keys)
    return transport.dumps(ns[fname](*args))


engine_call.__module__ = "__main__"  # what ipyparallel.interactive does


#: a notebook function for run_live_mid_chunk's loop: iteration ``size // 2``
#: of chunk k waits (for a minute at most) until the live view has seen a
#: worker part-way through chunk k.  The test waits on what the kernel saw,
#: not on time: a busy CI machine once let a whole 2 s chunk pass unseen.
GATED_LOOP_SETUP = """\
import os, time
def wait_until_seen(i, gate, size):
    time.sleep(0.01)
    if i % size == size // 2:
        flag = os.path.join(gate, f"seen-{i // size}")
        t = time.monotonic()
        while not os.path.exists(flag) and time.monotonic() - t < 60:
            time.sleep(0.01)
out = {}
"""


def run_live_mid_chunk(ip, magic: str, options: str, noun: str, size: int = 20) -> LiveSpy:
    """Two chunks of ``size`` iterations under a live view (``options`` sets
    ``chunksize=size``): the serial answer, and the view caught ``noun`` rows
    part-way through each chunk (progress per iteration, not per chunk).

    Each chunk waits half-way until the view has seen it there (or a minute
    has passed), so a slow machine cannot make the view miss a chunk: only
    reports that never arrive can."""
    gate = tempfile.mkdtemp(prefix="pl-gate-")
    try:
        run_cell(ip, GATED_LOOP_SETUP + f"gate = {gate!r}\n")
        t0 = time.monotonic()
        spy = run_live(
            ip,
            f"for i in range({2 * size}):\n    wait_until_seen(i, gate, {size})\n    out[i] = i\n",
            magic,
            options,
            LiveSpy(gate, size),
        )
        took = time.monotonic() - t0
    finally:
        shutil.rmtree(gate, ignore_errors=True)
    assert ip.user_ns["out"] == {i: i for i in range(2 * size)}
    mid = sorted(
        {
            (name, partial, current)
            for row in spy.rows
            for name, (_, partial, current) in row.items()
            if 0 < partial < size and current is not None
        }
    )
    assert all(name.startswith(f"{noun} ") for name, _, _ in mid), mid
    seen = {current // size for _, _, current in mid}
    assert seen == {0, 1}, (
        f"chunks seen part-way: {sorted(seen)} of [0, 1] in {took:.1f} s "
        f"({len(spy.rows)} readings): {mid}; the run's notes: {spy.notes}"
    )
    return spy


def run_live(ip, source: str, magic: str, options: str, spy: LiveSpy | None = None) -> LiveSpy:
    """Run a loop through parloop.run.run_cell with a LiveSpy as its view."""
    from parloop.backends import make_backend
    from parloop.options import parse_options
    from parloop.run import Cell
    from parloop.run import run_cell as run_loop

    spy = spy or LiveSpy()
    run_loop(
        Cell(source=source, filename=f"<live {magic}>"),
        ip.user_ns,
        parse_options(options, magic),
        make_backend,
        spy,
    )
    return spy


def stop_processes(procs) -> None:
    """Stop processes this test started (``subprocess.Popen``s), by pid: TERM
    lets a controller stop its scheduler processes; whatever is left of their
    recorded trees is then killed."""
    import subprocess

    import psutil

    tree = []
    for p in procs:
        try:
            tree += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    _, left = psutil.wait_procs(tree, timeout=5)
    for child in left:
        child.kill()
