"""Clusters parloop did not start (``profile=`` / ``cluster_id=``): connected to, never stopped.

Someone started them (``ipcluster start``, a batch system) and they may have
engines on other hosts.  parloop finds the controller through the profile's
``security/ipcontroller[-CLUSTER_ID]-client.json``, keeps one client per
(profile, cluster_id) and connects again when that file changes (a restarted
controller).  Their processes are not parloop's: nothing here signals or stops
them.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from .engine_info import EngineInfoCache

__all__ = ["ExternalClusters"]


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


class ExternalClusters:
    """The clients of the external clusters used so far, one per (profile dir, cluster_id).

    ``lock`` is the cluster manager's (reentrant).
    """

    def __init__(self, lock: threading.RLock, engines: EngineInfoCache) -> None:
        self._lock = lock
        self._engines = engines
        # (profile dir, cluster_id) -> (client, url file, its mtime when connecting)
        self._clients: dict[tuple[str, str], tuple[Any, str, float]] = {}

    def client(
        self, processes: int | None, profile: str | None, cluster_id: str | None, timeout: float
    ):
        """A client of the cluster of ``profile`` (a profile name or directory)
        and ``cluster_id`` with at least ``processes`` (default 1) engines.

        Raises ``RuntimeError`` when it cannot be reached, or has too few
        engines, within ``timeout`` seconds.
        """
        import ipyparallel as ipp
        from IPython.paths import get_ipython_dir

        if profile and (os.sep in profile or os.path.isdir(profile)):
            profile_dir = os.path.abspath(os.path.expanduser(profile))
        else:
            profile_dir = os.path.join(get_ipython_dir(), f"profile_{profile or 'default'}")
        name = f"profile={profile or 'default'!r}" + (
            f", cluster_id={cluster_id!r}" if cluster_id else ""
        )
        client_json = (
            f"ipcontroller-{cluster_id}-client.json" if cluster_id else "ipcontroller-client.json"
        )
        url_file = os.path.join(profile_dir, "security", client_json)
        key = (profile_dir, cluster_id or "")
        deadline = time.monotonic() + timeout
        with self._lock:
            cached = self._clients.get(key)
            if cached is not None:
                client, old_file, mtime = cached
                if not getattr(client, "_closed", False) and _mtime(url_file) == mtime:
                    try:
                        client.wait_for_engines(
                            processes or 1, timeout=max(0.5, timeout), interactive=False
                        )
                    except Exception as e:
                        raise RuntimeError(
                            f"the ipyparallel cluster ({name}) has {len(client.ids)} engines: {e}"
                        ) from e
                    return client
                self._engines.drop(client)
                try:
                    client.close(linger=0)
                except Exception:  # noqa: BLE001 - closing a client that may be gone
                    pass
                del self._clients[key]
        # Wait for the connection file ourselves: ipyparallel.Client would print
        # "Waiting for connection file" into the cell's output.
        while not os.path.exists(url_file):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no ipyparallel cluster found for {name}: {url_file} does not exist. "
                    f"Start one (e.g. `ipcluster start --profile={profile or 'default'}"
                    + (f" --cluster-id={cluster_id}" if cluster_id else "")
                    + "`) or leave out profile/cluster_id to use a local cluster."
                )
            time.sleep(0.1)
        mtime = _mtime(url_file)
        try:
            client = ipp.Client(
                url_file,
                profile_dir=profile_dir,
                cluster_id=cluster_id or None,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        except Exception as e:
            raise RuntimeError(f"cannot connect to the ipyparallel cluster ({name}): {e}") from e
        want = processes or 1
        try:
            client.wait_for_engines(
                want, timeout=max(0.5, deadline - time.monotonic()), interactive=False
            )
        except Exception as e:
            n = len(client.ids)
            client.close(linger=0)
            raise RuntimeError(
                f"the ipyparallel cluster ({name}) has {n} engines registered; "
                f"{want} did not come up within {timeout} s ({e})"
            ) from e
        with self._lock:
            self._clients[key] = (client, url_file, mtime)
        return client
