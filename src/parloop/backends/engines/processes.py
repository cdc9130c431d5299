"""Every process parloop starts for its cluster, so that none outlives the kernel.

Two guarantees (docs/design.md §7):

* Nothing is left when the kernel exits normally: :class:`ProcessLedger` records
  the pid (with its create time, so that a reused pid is never mistaken for
  ours) of the controller, of every engine and of their children, and
  :meth:`ProcessLedger.kill_leftovers` -- after the cluster's own stop, also at
  atexit -- waits until every recorded process has exited, SIGKILLs
  stragglers and reaps them.
* Nothing is left when the kernel dies without running atexit (killed,
  crashed, out of memory): every process is started by :func:`launch_command`,
  a small ``python -c`` wrapper that sets Linux's ``PR_SET_PDEATHSIG`` before
  exec-ing ``python -m ipyparallel.…`` (~20 ms), so the controller and the
  engines get SIGTERM when the thread that started them ends.

psutil is a dependency of ipyparallel, so it is always there.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

__all__ = ["ProcessLedger", "alive", "launch_command"]

log = logging.getLogger("parloop.cluster")


def create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def alive(pid: int, ctime: float | None = None) -> bool:
    """Is ``pid`` a running (not zombie) process, and the one created at ``ctime``?"""
    import psutil

    try:
        p = psutil.Process(pid)
        if ctime is not None and abs(p.create_time() - ctime) > 0.01:
            return False  # the pid was reused by an unrelated process
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError):
        return False


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except (psutil.Error, OSError):
        return []


def reap(pid: int) -> None:
    """Collect the exit status of a child of ours, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


# The command that starts the controller and every engine: `python -m MODULE ARGS`,
# after asking Linux to SIGTERM the process when the kernel dies (prctl
# PR_SET_PDEATHSIG, kept across exec).  A kernel that is killed, crashes or runs
# out of memory -- so that atexit never runs -- then leaves no cluster behind:
# on SIGTERM the controller stops its scheduler processes and engines exit.
# The signal fires when the *thread* that started the process ends: parloop
# starts them from its event loop thread (parloop.aioloop), which lives as long
# as the kernel.
_EXEC_WATCHING_PARENT = """\
import os, signal, sys
if sys.platform.startswith("linux"):
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except Exception:
        pass
    if os.getppid() != int(sys.argv[1]):
        sys.exit("parloop: the kernel exited while its cluster was starting")
os.execv(sys.executable, [sys.executable, "-m", *sys.argv[2:]])
"""


def launch_command(module: str) -> list[str]:
    """``python -m module`` (the kernel's interpreter) that dies with the kernel."""
    return [sys.executable, "-c", _EXEC_WATCHING_PARENT, str(os.getpid()), module]


class ProcessLedger:
    """The processes a managed cluster started: pid -> create time.

    Thread-safe with a lock of its own: the event loop thread records pids
    while the caller that waits for it holds the cluster manager's lock.
    """

    def __init__(self) -> None:
        self._procs: dict[int, float | None] = {}
        self._lock = threading.Lock()

    def record(self, pid: int) -> None:
        if pid and pid > 0 and pid not in self._procs:
            ct = create_time(pid)
            with self._lock:
                self._procs.setdefault(pid, ct)

    def __contains__(self, pid: object) -> bool:
        return pid in self._procs

    def recorded(self) -> list[tuple[int, float | None]]:
        with self._lock:
            return list(self._procs.items())

    def alive(self, pid: int) -> bool:
        """Is ``pid`` running -- and, if it is recorded, still the process we started?"""
        return alive(pid, self._procs.get(pid))

    def snapshot_descendants(self) -> None:
        """Add children of our processes (controller schedulers, engine nannies) to the record."""
        for pid, ct in self.recorded():
            if alive(pid, ct):
                for child in descendants(pid):
                    self.record(child)

    def live(self) -> list[int]:
        """The recorded processes (and their children) still running, by pid."""
        self.snapshot_descendants()
        return sorted(p for p, ct in self.recorded() if alive(p, ct))

    def kill_leftovers(self, grace: float = 10.0) -> None:
        """Wait for every recorded process to exit; SIGKILL what is left after ``grace`` s."""
        self.snapshot_descendants()
        end = time.monotonic() + grace
        for sig in (None, signal.SIGKILL):
            if sig is not None:
                for pid, ct in self.recorded():
                    if alive(pid, ct):
                        log.warning("parloop: killing leftover process %d", pid)
                        try:
                            os.kill(pid, sig)
                        except OSError:
                            pass
                end = time.monotonic() + 5
            while True:
                for pid, _ in self.recorded():
                    reap(pid)
                left = [p for p, ct in self.recorded() if alive(p, ct)]
                if not left or time.monotonic() > end:
                    break
                time.sleep(0.02)
            if not left:
                break
        with self._lock:
            self._procs = {p: ct for p, ct in self._procs.items() if alive(p, ct)}
