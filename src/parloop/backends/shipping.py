"""parloop's own code, sent to the workers of a cluster that lack it.

A Dask cluster is often not the notebook's environment (a Coiled or
dask-gateway image, a Slurm job's conda env): it has distributed and
cloudpickle, and the user's libraries, but not parloop.  What a worker needs
of parloop is small and pure Python -- :mod:`parloop.backends.engines.worker`
and what it imports (the runtime, the log, the fingerprints), none of which
imports IPython, pyzmq or ipyparallel -- so the kernel sends it.

Why a package and not by-value pickling: ``cloudpickle.register_pickle_by_value``
would send the worker's functions, but each task would unpickle them with
fresh module globals, and the worker's state lives in module globals that
must outlast a task (the per-process input store ``worker._STORE``, the
compiled chunk functions, the output router's context variable).  A real
module in the worker's ``sys.modules`` keeps them, as an installed parloop
does.

How: a zip of the running package's ``.py`` files (named by its content
digest, so two versions never share a path), registered with distributed's
own ``UploadFile`` worker plugin: every worker gets it now, and so does every
worker that joins later or is restarted by its nanny.  The plugin puts the
zip on the worker's ``sys.path`` and imports ``parloop`` from it.  Only
workers are sent the package; what parloop runs on the scheduler travels by
value (:mod:`parloop.backends.dask_remote`), so a scheduler inside the
kernel's own process is never touched.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["package_archive", "ship_to_dask"]

_archive: list[Path] = []


def _package_files() -> list[tuple[str, bytes]]:
    """(path inside the zip, contents) of every ``.py`` file of the running
    parloop package, in a stable order."""
    import parloop

    root = Path(parloop.__file__).resolve().parent
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        if "__pycache__" in rel:
            continue
        out.append((rel, path.read_bytes()))
    return out


def package_archive() -> Path:
    """A zip of the running parloop package, made once per process in the
    temp directory as ``parloop-<digest>.zip``."""
    if _archive and _archive[0].exists():
        return _archive[0]
    files = _package_files()
    digest = hashlib.blake2b(digest_size=8)
    for rel, data in files:
        digest.update(rel.encode() + b"\0" + data)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, data in files:
            # a fixed date: the same package makes the same bytes
            info = zipfile.ZipInfo(rel, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    folder = Path(tempfile.gettempdir()) / f"parloop-ship-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    path = folder / f"parloop-{digest.hexdigest()}.zip"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
    _archive[:] = [path]
    return path


def ship_to_dask(client: Any) -> str:
    """Send parloop to every worker of ``client``'s cluster, now and as they
    join (an idempotent plugin name: shipping twice registers it once).
    Returns the plugin's name."""
    from distributed.diagnostics.plugin import UploadFile

    path = package_archive()
    name = f"parloop-package-{path.stem.split('-')[-1]}"
    client.register_plugin(UploadFile(str(path), load=True), name=name)
    return name
