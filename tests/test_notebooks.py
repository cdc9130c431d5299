"""The notebooks in ``notebooks/`` run headless in a real kernel (nbclient), say
what they claim, and leave no ipyparallel process behind once the kernel is
shut down."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
psutil = pytest.importorskip("psutil")  # a dependency of ipyparallel

#: each test runs a notebook in a real kernel (tens of seconds)
pytestmark = pytest.mark.slow

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
RAISES = "raises-exception"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie (an exited child that nobody reaped: where PID 1
    does not reap orphans that is the environment's doing, and it runs nothing)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid}"


def _is_ipyparallel(cmd: str) -> bool:
    return any(w in cmd for w in ("ipyparallel", "ipengine", "ipcontroller"))


class Run:
    """An executed notebook: its cells, and the processes its kernel started."""

    def __init__(self, nb, kernel: psutil.Process | None, seen: dict):
        self.nb = nb
        self.kernel = kernel
        # pid -> (process, its command line, its ancestors' pids): every descendant
        # of the kernel seen after a cell, described while it ran
        self.seen = seen

    def code_cells(self):
        return [c for c in self.nb.cells if c.cell_type == "code"]

    def cell(self, needle: str):
        """The one code cell whose source contains ``needle``."""
        found = [c for c in self.code_cells() if needle in c.source]
        assert len(found) == 1, f"{len(found)} cells contain {needle!r}"
        return found[0]

    def text(self, needle: str) -> str:
        """What the cell containing ``needle`` showed (streams and results)."""
        out = []
        for o in self.cell(needle).get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif o.output_type in ("execute_result", "display_data"):
                out.append(o.get("data", {}).get("text/plain", "") + "\n")
        return "".join(out)

    def lines(self, needle: str) -> list[str]:
        return self.text(needle).splitlines()

    def tagged_error(self):
        """The error of the one cell tagged ``raises-exception``."""
        cells = [c for c in self.code_cells() if RAISES in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{len(cells)} cells are tagged {RAISES}"
        errs = [o for o in cells[0].get("outputs", []) if o.output_type == "error"]
        return errs[0] if errs else None

    def ipyparallel_processes(self) -> list[psutil.Process]:
        """Every ipyparallel process seen under the kernel, and what they started."""
        ipp = {pid for pid, (_, cmd, _) in self.seen.items() if _is_ipyparallel(cmd)}
        return [p for pid, (p, _, up) in self.seen.items() if pid in ipp or up & ipp]

    def describe_seen(self) -> list[str]:
        return [f"pid {pid}: {cmd[:160]}" for pid, (_, cmd, _) in self.seen.items()]


def execute(nb) -> Run:
    """Execute ``nb`` in a fresh ``python3`` kernel (shut down at the end), and
    record the kernel's descendant processes after every cell."""
    seen: dict[int, psutil.Process] = {}
    holder: dict[str, psutil.Process] = {}

    def record(**_):
        pid = getattr(getattr(client.km, "provisioner", None), "pid", None)
        if pid is None:
            return
        try:
            kernel = holder.setdefault("kernel", psutil.Process(pid))
            children = kernel.children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            if child.pid in seen:
                continue
            try:
                with child.oneshot():
                    cmd = " ".join(child.cmdline())
                    up = {a.pid for a in child.parents()}
            except psutil.Error:
                continue  # already gone
            seen[child.pid] = (child, cmd, up)

    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(NB_DIR)}},
        on_cell_executed=record,
    )
    client.execute()  # owns its kernel manager: shuts the kernel down at the end
    return Run(nb, holder.get("kernel"), seen)


def read(name: str):
    return nbformat.read(NB_DIR / name, as_version=4)


def assert_errors_only_where_tagged(run: Run) -> None:
    for i, c in enumerate(run.code_cells()):
        errs = [o for o in c.get("outputs", []) if o.output_type == "error"]
        if RAISES in c.metadata.get("tags", []):
            assert errs, f"code cell {i} is tagged {RAISES} but raised nothing:\n{c.source}"
        else:
            assert not errs, f"code cell {i} raised {errs[0].ename}: {errs[0].evalue}\n{c.source}"


def assert_nothing_survives(run: Run, timeout: float = 10.0) -> None:
    """The kernel and every ipyparallel process it started are gone."""
    watched = run.ipyparallel_processes() + ([run.kernel] if run.kernel else [])
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in watched if _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, "still running after the kernel was shut down:\n" + "\n".join(
        _describe(p) for p in left
    )


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_quickstart_notebook():
    run = execute(read("quickstart.ipynb"))
    assert_errors_only_where_tagged(run)

    # the threaded loop gave the serial result (the cell asserts it) and chose threads
    assert "threads chosen:" in run.text("assert results == serial")
    assert "threaded:" in run.text("%%threaded\nt0 = time.perf_counter()")
    # prints in iteration order
    pages = [ln.split()[1] for ln in run.lines("%%threaded threads=8") if ln.startswith("page ")]
    assert pages == [str(p) for p in range(10)]
    # the failing iteration keeps its type, and iterations 0-6 were applied
    err = run.tagged_error()
    assert err is not None and err.ename == "BadPage"
    assert run.lines("print(sorted(parsed) == list(range(7)))") == ["True"]
    # a loop-carried name is rejected before anything runs
    assert run.text("except parloop.LoopAnalysisError").startswith("rejected:")
    assert_nothing_survives(run)


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_parallel_notebook():
    run = execute(read("parallel.ipynb"))
    assert_errors_only_where_tagged(run)

    # spawn was really in effect, and a ProcessPoolExecutor fails on a cell function
    assert "start method: spawn" in run.text("mp.set_start_method")
    assert run.text("ProcessPoolExecutor(2)").startswith("ProcessPoolExecutor failed:")
    # %%parallel: the serial results, prints in iteration order
    printed = [int(ln.split()[0]) for ln in run.lines("steps.append(s)")]
    assert printed == [27, 97, 871, 6171, 77031, 837799]
    assert run.lines("print(steps == serial)")[0] == "True"
    # notebook classes: isinstance holds, keys in order, equal to serial
    assert run.lines("isinstance(o, Orbit)")[:3] == ["True", "True", "True"]
    # a notebook exception class: same type, earlier iterations applied, `except` catches
    err = run.tagged_error()
    assert err is not None and err.ename == "OrbitTooLong"
    assert run.lines("print(short, short == serial[:2])")[0].endswith("True")
    caught = run.lines("except OrbitTooLong")
    assert caught[0].startswith("caught OrbitTooLong:") and caught[-1] == "True"
    assert "iteration 2" in caught[1]
    # the CPU-bound loop: same answer; the speedup is printed, not asserted
    timing = run.lines("t_parallel = time.perf_counter() - t0")
    assert timing[0] == "True"
    assert any(ln.startswith("speedup:") for ln in timing)
    # %parallel_status while the cluster runs, then %parallel_stop
    statuses = [c for c in run.code_cells() if c.source.strip() == "%parallel_status"]
    assert len(statuses) == 2
    first = "".join(o.get("text", "") for o in statuses[0].outputs)
    second = "".join(o.get("text", "") for o in statuses[1].outputs)
    assert "managed local cluster), 2 engine(s)" in first
    assert "stopped the managed cluster" in run.text("%parallel_stop")
    assert "no ipyparallel cluster in use" in second

    # the cluster really ran under this kernel, and nothing of it is left
    assert len(run.ipyparallel_processes()) >= 3, run.describe_seen()
    assert_nothing_survives(run)


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_kernel_shutdown_stops_a_running_cluster():
    """No %parallel_stop: shutting the kernel down must take the engines and
    the controller with it."""
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(
        cells=[
            new_code_cell("%load_ext parloop"),
            new_code_cell(
                "%%parallel processes=2 progress=off\n"
                "squares = []\n"
                "for i in range(8):\n"
                "    squares.append(i * i)\n"
            ),
            new_code_cell("print(squares == [i * i for i in range(8)])"),
            new_code_cell("%parallel_status"),
        ]
    )
    run = execute(nb)
    assert_errors_only_where_tagged(run)
    assert run.lines("print(squares ==") == ["True"]
    assert "2 engine(s)" in run.text("%parallel_status")
    assert len(run.ipyparallel_processes()) >= 3, run.describe_seen()
    assert_nothing_survives(run)
