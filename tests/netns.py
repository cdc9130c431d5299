"""Another host on this machine: a Linux network namespace joined to ours by a veth pair.

Tests of "engines elsewhere" need workers that really are elsewhere: a
different network namespace (the kernel's 127.0.0.1 is not theirs, so
parloop's same-host shortcuts must not apply), a different hostname (``unshare
--uts``), a link that can be cut (``ip link set ... down``, a network
partition).  A namespace with a veth pair costs tens of milliseconds to set up
and needs root, which CI has; :func:`unavailable` says why not otherwise, for
``pytest.skip``.

Every name is unique (``parloop-test-<random>``, veth names of at most 15
characters, a random private ``10.x.y.0/30``) so that parallel test runs and
other engineers' namespaces are never touched, and :meth:`Netns.close` removes
exactly what :meth:`Netns.create` made: the processes it started (by pid and
process group, then whatever else still runs inside the namespace, which only
this object's processes can be), the veth pair and the namespace -- also when
the test failed.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from typing import Sequence

__all__ = ["Netns", "unavailable"]

_PREFIX = "parloop-test-"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why network namespaces cannot be used here (None: they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of every interface of the root namespace (to pick a /30 outside them)."""
    out = _ip("-o", "-4", "addr", "show").stdout
    nets = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            nets.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    return nets


class Netns:
    """One network namespace ("the other host") and the veth pair to it.

    ``host_addr`` is the root namespace's end (bind servers there: the
    namespace reaches nothing else of ours), ``ns_addr`` the namespace's end.
    Use as a context manager, or call :meth:`create` and :meth:`close`.
    """

    def __init__(self) -> None:
        tag = secrets.token_hex(4)  # 8 hex digits: "plt" + 8 + "h" is 12 characters
        self.name = _PREFIX + tag
        self.veth_host = f"plt{tag}h"
        self.veth_ns = f"plt{tag}n"
        assert len(self.veth_host) <= 15 and len(self.veth_ns) <= 15  # IFNAMSIZ - 1
        self.host_addr = ""
        self.ns_addr = ""
        self.procs: list[subprocess.Popen] = []
        self.setup_seconds = 0.0
        self._made: list[str] = []  # what exists: "netns", "veth"

    # -- set up ---------------------------------------------------------------
    def _pick_network(self) -> ipaddress.IPv4Network:
        used = _used_networks()
        for _ in range(100):
            net = ipaddress.ip_network(
                f"10.{random.randrange(1, 255)}.{random.randrange(0, 256)}.{4 * random.randrange(64)}/30"
            )
            if not any(net.overlaps(u) for u in used):
                return net
        raise RuntimeError("no free 10.x.y.0/30 network found")

    def create(self) -> "Netns":
        """Make the namespace, the veth pair with one end in it, the
        addresses, and bring the links (and the namespace's own lo) up."""
        t0 = time.perf_counter()
        try:
            _ip("netns", "add", self.name)
            self._made.append("netns")
            _ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
            self._made.append("veth")
            _ip("link", "set", self.veth_ns, "netns", self.name)
            net = self._pick_network()
            host, peer = list(net.hosts())
            self.host_addr, self.ns_addr = str(host), str(peer)
            _ip("addr", "add", f"{host}/30", "dev", self.veth_host)
            _ip("link", "set", self.veth_host, "up")
            _ip("-n", self.name, "addr", "add", f"{peer}/30", "dev", self.veth_ns)
            _ip("-n", self.name, "link", "set", self.veth_ns, "up")
            # the namespace's own loopback: ipyparallel's engine talks to its
            # nanny over 127.0.0.1 -- the namespace's, not the kernel's
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.perf_counter() - t0
        return self

    def __enter__(self) -> "Netns":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- processes ------------------------------------------------------------
    def popen(
        self, argv: Sequence[str], *, hostname: str | None = None, **kwargs
    ) -> subprocess.Popen:
        """Start ``argv`` inside the namespace, under its own UTS namespace
        with ``hostname`` set, in a session of its own (a signal the test
        sends a process group reaches nothing else).

        ``ip netns exec``, ``unshare`` (without ``--fork``) and ``sh -c 'exec
        ...'`` each exec the next, so the Popen's pid is ``argv``'s process.
        """
        wrapper = ["ip", "netns", "exec", self.name, "unshare", "--uts", "sh", "-c"]
        script = 'hostname "$0" && exec "$@"'
        cmd = [*wrapper, script, hostname or self.name[-15:], *argv]
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(cmd, **kwargs)
        self.procs.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen) -> subprocess.Popen:
        """Have :meth:`close` stop ``proc`` (started elsewhere, e.g. a server
        in the root namespace) too, before the link goes."""
        self.procs.append(proc)
        return proc

    # -- faults ---------------------------------------------------------------
    def link(self, up: bool) -> None:
        """Cut (``up=False``) or restore the link: a network partition between
        the namespace and everything else."""
        _ip("link", "set", self.veth_host, "up" if up else "down")

    def ns_pids(self) -> list[int]:
        """Pids of the processes inside the namespace (all of them ours)."""
        if "netns" not in self._made:
            return []
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    # -- tear down ------------------------------------------------------------
    def _tree(self, procs: list[subprocess.Popen]) -> list:
        """The processes to stop, as psutil objects (which refuse to signal a
        pid that a new process has taken since): those we started, their
        descendants, and whatever runs inside the namespace."""
        import psutil

        found: dict[int, psutil.Process] = {}
        roots = [p.pid for p in procs if p.poll() is None] + self.ns_pids()
        for pid in roots:
            try:
                proc = psutil.Process(pid)
                found.setdefault(pid, proc)
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def close(self) -> None:
        """Stop the processes, then delete the veth pair and the namespace.

        CONT (for a process a test stopped) and TERM first, so that servers
        can say goodbye; KILL to what is left after 5 s.  Idempotent.
        """
        import psutil

        procs, self.procs = self.procs, []
        tree = self._tree(procs)
        for proc in tree:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
        _, left = psutil.wait_procs(tree, timeout=5)
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
        for p in procs:
            try:
                p.wait(5)  # reap
            except subprocess.TimeoutExpired:
                pass
        # a process that started inside the namespace meanwhile (none should)
        for proc in self._tree([]):
            try:
                proc.kill()
            except psutil.Error:
                pass
        if "veth" in self._made:
            _ip("link", "del", self.veth_host, check=False)  # deletes both ends
            self._made.remove("veth")
        if "netns" in self._made:
            _ip("netns", "del", self.name, check=False)
            self._made.remove("netns")
