"""The declared backend interface (parloop.backends.base.Backend) and its
registry: a backend is one class plus one registry line.

The proof is a backend written here, in the tests, against the interface
alone: it runs each chunk in the kernel at once but hands the results back in
*reverse* order, a few chunks at a time -- so the run only matches the serial
loop if the dispatcher relies on nothing but the interface (no name checks,
no probing) and commits in iteration order whatever order results arrive in.
"""

from __future__ import annotations

import contextlib
import io
from concurrent.futures import Future

import pytest

from helpers import reset, run_cell
from parloop import backends
from parloop.backends import Backend, Job, backend_class, register
from parloop.backends.threads import compile_chunk_function
from parloop.options import parse_options
from parloop.run import Cell
from parloop.run import run_cell as run_loop
from parloop.runtime import ChunkResult, run_chunk


class ReversedBackend(Backend):
    """Chunks run in the kernel when submitted; their results come back
    newest first, once ``batch`` are waiting (or no chunk follows)."""

    name = "reversed"
    worker_noun = "slot"
    shares_memory = True
    batch = 3
    shut_down = 0

    @classmethod
    def for_run(cls, opts, plan) -> ReversedBackend:
        return cls()

    @classmethod
    def shutdown(cls) -> None:
        cls.shut_down += 1

    def __init__(self) -> None:
        super().__init__()
        self._job: Job | None = None
        self._fn = None
        self._waiting: list[tuple[Future, ChunkResult]] = []
        self._tailed = False
        self.cancelled_after: int | None = None
        self.submitted: list[int] = []
        self.order: list[int] = []

    def worker_count(self) -> int:
        return 2

    def max_in_flight(self) -> int:
        return self.batch

    def prepare(self, job: Job) -> None:
        self._job = job
        self._fn = compile_chunk_function(job, job.ns)

    def submit(self, items: list, start: int) -> Future[ChunkResult]:
        job = self._job
        assert job is not None and self._fn is not None
        self.submitted.append(start)
        res = run_chunk(
            self._fn,
            items,
            start,
            job.on_error,
            job.private,
            job.seed,
            worker=f"slot {len(self.submitted) % 2}",
            shape=job.shape,
        )
        fut: Future[ChunkResult] = Future()
        self._waiting.append((fut, res))
        if len(self._waiting) >= self.batch:
            self._release()
        return fut

    def _release(self) -> None:
        for fut, res in reversed(self._waiting):
            self.order.append(res.start)
            fut.set_result(res)
        self._waiting.clear()

    def poll(self) -> None:
        if self._tailed:
            self._release()

    def tail(self) -> None:
        self._tailed = True

    def cancel_after(self, index: int) -> None:
        self.cancelled_after = index
        self._release()

    def interrupt(self) -> None:
        self._release()

    def finish(self) -> None:
        self._release()


@pytest.fixture
def reversed_backend():
    register("reversed", ReversedBackend)
    made: list[ReversedBackend] = []

    def make(opts, plan):
        backend = backend_class("reversed").for_run(opts, plan)
        made.append(backend)  # type: ignore[arg-type]
        return backend

    yield make, made
    backends.BACKENDS.pop("reversed", None)
    backends._used.pop("reversed", None)


def _run(ip, make, source: str, options: str = "chunksize=2"):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_loop(
            Cell(source=source, filename="<reversed>"),
            ip.user_ns,
            parse_options(options, "threaded"),
            make,
            None,
        )
    return out.getvalue()


CELL = """\
for i in range(23):
    y = (i * 7) % 5
    out[i] = y * y
    trail.append((i, y))
    total += y
    if y == 3:
        print("three at", i)
"""
SETUP = "out = {}; trail = []; total = 0"


def test_a_backend_written_against_the_interface_gives_the_serial_answer(ip, reversed_backend):
    make, made = reversed_backend
    reset(ip)
    run_cell(ip, SETUP)
    serial_out, err = run_cell(ip, CELL)
    assert err is None
    serial = {k: ip.user_ns[k] for k in ("out", "trail", "total", "y", "i")}

    reset(ip)
    run_cell(ip, SETUP)
    printed = _run(ip, make, CELL)
    assert {k: ip.user_ns[k] for k in serial} == serial
    assert printed == serial_out
    (backend,) = made
    # results really came back out of order, and the run's record names it
    assert backend.order != sorted(backend.order)
    assert sorted(backend.order) == backend.submitted
    import parloop

    assert parloop.last_run.backend == "reversed"
    assert set(parloop.last_run.by_worker) == {"slot 0", "slot 1"}


def test_an_error_names_its_iteration_and_stops_what_follows(ip, reversed_backend):
    make, made = reversed_backend
    reset(ip)
    run_cell(ip, "out = {}")
    with pytest.raises(ZeroDivisionError) as info:
        _run(ip, make, "for i in range(20):\n    out[i] = 1 / (i - 9)\n")
    assert "iteration 9 of 20" in "".join(info.value.__notes__)
    # serial stops at 9: everything before it, nothing after
    assert ip.user_ns["out"] == {i: 1 / (i - 9) for i in range(9)}
    assert made[0].cancelled_after == 9


def test_the_registry_knows_the_backends_and_stops_what_was_used(reversed_backend, monkeypatch):
    assert {"threads", "serial", "tasks", "engines"} <= set(backends.BACKENDS)
    # only this backend counts as used (the session's pool and cluster stay up)
    monkeypatch.setattr(backends, "_used", {})
    assert backend_class("reversed") is ReversedBackend
    before = ReversedBackend.shut_down
    backends.shutdown_all()
    assert ReversedBackend.shut_down == before + 1


def test_an_incomplete_backend_cannot_be_made():
    class Partial(Backend):
        name = "partial"

        @classmethod
        def for_run(cls, opts, plan):
            return cls()

    with pytest.raises(TypeError, match="abstract"):
        Partial()  # type: ignore[abstract]
