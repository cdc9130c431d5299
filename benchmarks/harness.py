"""Timing machinery shared by the workloads: a real IPython shell with parloop
loaded, alternating rounds, medians, and a note of how busy the machine was."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


def shell():
    """A real in-process IPython shell with parloop loaded."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=cfg)
    ip.run_cell("%load_ext parloop", store_history=False)
    return ip


def run_cell(ip, code: str) -> float:
    """Run a cell, raise what it raised, return its wall time."""
    t0 = time.perf_counter()
    res = ip.run_cell(code, store_history=False, silent=True)
    dt = time.perf_counter() - t0
    err = res.error_before_exec or res.error_in_exec
    if err is not None:
        raise err
    return dt


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


class MachineLoad:
    """CPU that *other* processes used while a block ran, in cores: these
    machines are shared, and a busy run must be flagged, not hidden."""

    def __enter__(self) -> "MachineLoad":
        self.b0, self.t0 = _cpu_jiffies()
        self.own0 = _own_cpu()
        self.w0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        b1, t1 = _cpu_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.perf_counter() - self.w0
        busy = (b1 - self.b0) / hz
        own = _own_cpu() - self.own0
        self.other_cores = max(busy - own, 0.0) / wall if wall > 0 else 0.0


def _own_cpu() -> float:
    """CPU seconds of this process and its children (engines included)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    try:
        import psutil

        me = psutil.Process()
        for child in me.children(recursive=True):
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
    except ImportError:
        pass
    return total


@dataclass
class Variant:
    name: str
    run: Callable[[], float]  # returns seconds (its own measurement)
    is_parloop: bool = False
    note: str = ""
    #: run in the first ``max_runs`` rounds only (a slow peer that would make
    #: the suite take minutes); the table's "runs" column says how many it got
    max_runs: int | None = None


@dataclass
class Result:
    workload: str
    rows: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    parloop: set[str] = field(default_factory=set)
    other_cores: float = 0.0
    extra: list[str] = field(default_factory=list)


def measure(workload: str, variants: list[Variant], rounds: int) -> Result:
    """Run the variants alternately, ``rounds`` times each."""
    res = Result(workload)
    with MachineLoad() as load:
        for _ in range(rounds):
            for v in variants:
                runs = res.rows.setdefault(v.name, [])
                if v.max_runs is None or len(runs) < v.max_runs:
                    runs.append(v.run())
    res.other_cores = load.other_cores
    for v in variants:
        if v.note:
            res.notes[v.name] = v.note
        if v.is_parloop:
            res.parloop.add(v.name)
    return res


def table(results: list[Result], baseline: str = "serial") -> str:
    """Markdown: median seconds, ratio to serial, ratio to the best peer."""
    cores = os.cpu_count()
    lines = [
        f"Machine: {cores} cores (`os.cpu_count()`), Python "
        f"{'.'.join(map(str, __import__('sys').version_info[:3]))}.",
        "",
    ]
    for r in results:
        med = {k: statistics.median(v) for k, v in r.rows.items()}
        peers = [k for k in med if k not in r.parloop and k != baseline]
        best_peer = min(peers, key=lambda k: med[k]) if peers else None
        busy = (
            " **(machine busy: other processes used %.2f cores)**" % r.other_cores
            if r.other_cores > 0.25
            else f" (other processes: {r.other_cores:.2f} cores)"
        )
        lines.append(f"### {r.workload}{busy}")
        lines.append("")
        lines.append("| variant | median s | runs | ÷ serial | ÷ best peer | note |")
        lines.append("|---|---:|---:|---:|---:|---|")
        for k, m in med.items():
            vs_serial = f"{m / med[baseline]:.3f}" if baseline in med else ""
            vs_peer = f"{m / med[best_peer]:.3f}" if best_peer and k in r.parloop else ""
            lines.append(
                f"| {k} | {m:.4f} | {len(r.rows[k])} | {vs_serial} | {vs_peer} | "
                f"{r.notes.get(k, '')} |"
            )
        lines.extend(r.extra)
        lines.append("")
    return "\n".join(lines)
